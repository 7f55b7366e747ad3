"""The gated delta rule (Gated DeltaNet), fla 0.6.0 semantics.

For each sequence and head, with a state S ∈ R^{K×V} (S_0 = initial_state or 0) and a log-decay g_t <= 0:
    S'_t = exp(g_t) S_{t-1}
    S_t  = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ
    o_t  = S_tᵀ (scale · q_t),   scale = K^{-1/2} by default
q and k are expected L2-normalised by the caller. Implementations: `gated_delta_rule_recurrent_torch`
(the specification, step by step), `gated_delta_rule_chunk_torch` (chunkwise WY form, see
`recurrent_common.delta_chunk_torch`), fla's Triton kernels; `gated_delta_rule` dispatches.
"""
from __future__ import annotations

import torch

from lmlab.kernels import dispatch
from lmlab.kernels.recurrent_common import (
    CHUNK_SIZE,
    Kernel,
    State,
    call_kernel,
    delta_chunk_torch,
    dispatch_op,
    fla_health_check,
    recurrent_torch,
)

OP = "gated_delta_rule"


def gated_delta_rule_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """Step-by-step gated delta rule: the reference, and the fast path for decoding a few tokens."""
    return call_kernel(
        recurrent_torch, dict(q=q, k=k, v=v, beta=beta, g=g), initial_state, cu_seqlens=cu_seqlens,
        scale=scale, output_final_state=output_final_state,
    )


def gated_delta_rule_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, State]:
    """Chunkwise-parallel gated delta rule (WY representation), float32 inside."""
    return call_kernel(
        delta_chunk_torch, dict(q=q, k=k, v=v, beta=beta, g=g), initial_state, cu_seqlens=cu_seqlens,
        scale=scale, output_final_state=output_final_state, chunk_size=chunk_size, recompute=True,
    )


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, State]:
    """Gated delta rule on q, k [B,T,H,K], v [B,T,H,V], g, beta [B,T,H]; states [N,H,K,V] float32."""
    return dispatch_op(OP, (gated_delta_rule_recurrent_torch, gated_delta_rule_chunk_torch), _fla_kernels,
                       q, k, v, dict(g=g, beta=beta), scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)


def _fla_kernels() -> tuple[Kernel, Kernel]:
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    from lmlab.kernels.fla_chunk import chunk_gated_delta_rule

    return fused_recurrent_gated_delta_rule, chunk_gated_delta_rule


dispatch.register_health_check(OP, fla_health_check)
