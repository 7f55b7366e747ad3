"""The delta rule (DeltaNet), fla 0.6.0 semantics.

For each sequence and head, with a state S ∈ R^{K×V} (S_0 = initial_state or 0):
    S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ        (= (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ)
    o_t = S_tᵀ (scale · q_t),   scale = K^{-1/2} by default
q and k are expected L2-normalised by the caller. Implementations: `delta_rule_recurrent_torch` (the
specification, step by step), `delta_rule_chunk_torch` (chunkwise WY form, see
`recurrent_common.delta_chunk_torch`), fla's Triton kernels; `delta_rule` dispatches.
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

OP = "delta_rule"


def delta_rule_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """Step-by-step delta rule: the reference, and the fast path for decoding a few tokens."""
    return call_kernel(
        recurrent_torch, dict(q=q, k=k, v=v, beta=beta), initial_state, cu_seqlens=cu_seqlens,
        scale=scale, output_final_state=output_final_state,
    )


def delta_rule_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, State]:
    """Chunkwise-parallel delta rule (WY representation), float32 inside."""
    return call_kernel(
        delta_chunk_torch, dict(q=q, k=k, v=v, beta=beta), initial_state, cu_seqlens=cu_seqlens,
        scale=scale, output_final_state=output_final_state, chunk_size=chunk_size, recompute=True,
    )


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, State]:
    """Delta rule on q, k [B,T,H,K], v [B,T,H,V], beta [B,T,H]; states [N,H,K,V] float32."""
    return dispatch_op(OP, (delta_rule_recurrent_torch, delta_rule_chunk_torch), _fla_kernels, q, k, v,
                       dict(beta=beta), scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)


def _fla_kernels() -> tuple[Kernel, Kernel]:
    from fla.ops.delta_rule import fused_recurrent_delta_rule

    from lmlab.kernels.fla_chunk import chunk_delta_rule

    return fused_recurrent_delta_rule, chunk_delta_rule


def fla_delta_rule_health_check(x: torch.Tensor) -> str | None:
    """Whether fla's delta-rule kernels run on x (the chunk-read delta rule's too)."""
    reason = fla_health_check(x)
    if reason is None and x.dtype == torch.float32:
        reason = "fla's delta-rule kernels do not support float32 inputs"
    return reason


dispatch.register_health_check(OP, fla_delta_rule_health_check)
