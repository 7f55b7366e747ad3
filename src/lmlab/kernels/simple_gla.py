"""Gated linear attention with one decay per head (fla's "simple GLA"), which is Mamba2's SSD.

For each sequence and head, with a state S ∈ R^{K×V} (S_0 = initial_state or 0) and a log-decay g_t <= 0:
    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ
    o_t = S_tᵀ (scale · q_t),   scale = K^{-1/2} by default
Mamba2's scalar-decay SSD (Dao & Gu, arXiv 2405.21060) is this recurrence with q = C, k = B, v = Δ·x,
g = Δ·A and scale 1 (Mamba keeps the state transposed, [V, K]): `lmlab.models.mamba2`.

It is GLA whose decay is the same for every key dim, so lmlab writes no kernel of its own for it: the
step-by-step twin is the shared recurrence with a per-head decay (`recurrent_common.recurrent_torch`, the
specification) and the chunkwise one is GLA's with g as a one-wide gk (`gla_chunk_torch`, whose intra-chunk
scores for one decay per head are a plain masked product). On CUDA the dispatcher runs fla's Triton
kernels for exactly this op, `chunk_simple_gla` (through lmlab's custom op, `fla_chunk`: one compiled graph
per block) and `fused_recurrent_simple_gla`. transformers' and fla's Mamba2 layers reach fast SSD kernels only
through mamba-ssm, which the GPU machines do not have; fla's simple-GLA kernels compute the same recurrence.
"""
from __future__ import annotations

import torch

from lmlab.kernels import dispatch
from lmlab.kernels.gla import gla_chunk_torch
from lmlab.kernels.recurrent_common import (
    CHUNK_SIZE,
    Kernel,
    State,
    call_kernel,
    dispatch_op,
    fla_health_check,
    recurrent_torch,
)

OP = "simple_gla"


def simple_gla_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """Step-by-step simple GLA: the reference, and the fast path for decoding a few tokens."""
    return call_kernel(recurrent_torch, dict(q=q, k=k, v=v, g=g), initial_state, cu_seqlens=cu_seqlens,
                       scale=scale, output_final_state=output_final_state)


def simple_gla_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, State]:
    """Chunkwise-parallel simple GLA, float32 inside."""
    return gla_chunk_torch(q, k, v, g[..., None], scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, State]:
    """Simple GLA on q, k [B,T,H,K], v [B,T,H,V] and per-head log-decays g [B,T,H]; states [N,H,K,V] float32."""
    return dispatch_op(OP, (simple_gla_recurrent_torch, simple_gla_chunk_torch), _fla_kernels, q, k, v, dict(g=g),
                       scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens, backend=backend)


def _fla_kernels() -> tuple[Kernel, Kernel]:
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    from lmlab.kernels.fla_chunk import chunk_simple_gla

    return fused_recurrent_simple_gla, chunk_simple_gla


dispatch.register_health_check(OP, fla_health_check)
