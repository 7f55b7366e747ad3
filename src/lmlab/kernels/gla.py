"""Gated linear attention (GLA), fla 0.6.0 semantics.

For each sequence and head, with a state S ∈ R^{K×V} (S_0 = initial_state or 0) and a per-key-dim
log-decay gk_t ∈ R^K (<= 0):
    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ
    o_t = S_tᵀ (scale · q_t),   scale = K^{-1/2} by default
Implementations: `gla_recurrent_torch` (the specification, step by step), `gla_chunk_torch`
(chunkwise, below), fla's Triton kernels; `gla` dispatches.

Chunkwise form: inside a chunk with start state S0 and cumulative log-decay b_t = Σ_{s<=t} gk_s,
    o_t = (q_t ⊙ exp(b_t))ᵀ S0 + Σ_{j<=t} A_tj v_j,   A_tj = Σ_d q_td k_jd exp(b_td − b_jd)
    S_C = diag(exp(b_C)) S0 + Σ_j (k_j ⊙ exp(b_C − b_j)) v_jᵀ
Every exponent there is <= 0 except inside A, which is computed without overflow as fla does: the
chunk is cut into sub-chunks; for keys before a query's sub-chunk, A = (q ⊙ exp(b − b_r)) (k ⊙ exp(b_r − b))ᵀ
with r the first position of the query's sub-chunk (both factors <= 1); on the diagonal sub-chunks the
[c, c, K] products are formed explicitly. A one-wide gk [B,T,H,1] (one decay per head: `simple_gla`, Mamba2's
SSD) needs none of that: its decay factors out of the dot product, A_tj = exp(b_t − b_j) q_tᵀ k_j.
Packed documents (varlen): see `recurrent_common`.
"""
from __future__ import annotations

import math

import torch

from lmlab.kernels import dispatch
from lmlab.kernels.recurrent_common import (
    CHUNK_SIZE,
    Docs,
    Kernel,
    State,
    call_kernel,
    carry_weights,
    causal_mask,
    decay_matrix,
    dispatch_op,
    fla_health_check,
    first_state,
    from_chunks,
    read_start_states,
    recurrent_torch,
    scan_chunks,
    to_chunks,
)

OP = "gla"
SUB_CHUNK = 16


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, sub: int) -> torch.Tensor:
    """A_tj = Σ_d q_td k_jd exp(b_td − b_jd) for j <= t, else 0; inputs [..., C, K], output [..., C, C]."""
    *lead, C, K = q.shape
    n_sub = C // sub
    ref = b[..., ::sub, :]  # [..., NS, K]: b at the first position of each sub-chunk
    first = torch.arange(0, C, sub, device=q.device)
    # keys strictly before each query sub-chunk, rescaled to that sub-chunk's reference point
    before = torch.arange(C, device=q.device) < first[:, None]  # [NS, C]
    k_exp = torch.where(before[..., None], ref[..., :, None, :] - b[..., None, :, :], float("-inf")).exp()
    k_ref = k[..., None, :, :] * k_exp  # [..., NS, C, K]
    q_sub = q.reshape(*lead, n_sub, sub, K)
    q_ref = q_sub * (b.reshape(*lead, n_sub, sub, K) - ref[..., None, :]).exp()
    scores = q_ref @ k_ref.transpose(-1, -2)  # [..., NS, sub, C]
    # diagonal sub-chunks, exactly
    b_sub = b.reshape(*lead, n_sub, sub, K)
    k_sub = k.reshape(*lead, n_sub, sub, K)
    diag_exp = torch.where(
        causal_mask(sub, q.device)[..., None], b_sub[..., :, None, :] - b_sub[..., None, :, :], float("-inf")
    ).exp()
    diag = torch.einsum("...tk,...jk,...tjk->...tj", q_sub, k_sub, diag_exp)  # [..., NS, sub, sub]
    eye = torch.eye(n_sub, device=q.device, dtype=q.dtype)
    scores = scores.reshape(*lead, n_sub, sub, n_sub, sub) + torch.einsum("...atj,ac->...atcj", diag, eye)
    return scores.reshape(*lead, C, C)


def _gla_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float,
    initial_state: State = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    T, dtype = k.shape[1], v.dtype
    docs = None if cu_seqlens is None else Docs(cu_seqlens, T, chunk_size)
    q, k, v = (to_chunks(x, chunk_size) for x in (q * scale, k, v))  # [NC,B,H,C,D]
    b = to_chunks(gk, chunk_size).cumsum(-2)
    # from the chunk's start: the sub-chunk rescaling needs b non-increasing (differences within a
    # document are the same from either start)
    if b.shape[-1] == 1:  # one decay per head
        scores = (q @ k.transpose(-1, -2)) * decay_matrix(b[..., 0], causal_mask(chunk_size, q.device))
    else:
        scores = _intra_chunk_scores(q, k, b, math.gcd(SUB_CHUNK, chunk_size))
    if docs is not None:
        scores, b = scores * docs.pairs, docs.restart(b)
    q_decayed = q * b.exp()
    key_weights, chunk_decay = carry_weights(b, docs)
    kv = (k * key_weights).transpose(-1, -2) @ v  # [NC,B,H,K,V]
    if docs is not None and initial_state is not None:
        kv = kv + docs.initial_carry(b, initial_state)

    kv, chunk_decay = kv.unbind(0), chunk_decay.unbind(0)  # see delta_chunk_torch

    def step(S: torch.Tensor, i: int) -> tuple[torch.Tensor, None]:
        return S * chunk_decay[i] + kv[i], None

    starts, _, S = scan_chunks(first_state(q, v, initial_state, docs), step, q.shape[0])
    o = read_start_states(q_decayed, starts, docs, initial_state) + scores @ v
    if docs is not None and output_final_state:
        S = docs.final_states(starts, v, k, b, initial_state)
    return from_chunks(o, T, dtype), (S if output_final_state else None)


def gla_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """Step-by-step GLA: the reference, and the fast path for decoding a few tokens."""
    return call_kernel(
        recurrent_torch, dict(q=q, k=k, v=v, gk=gk), initial_state, cu_seqlens=cu_seqlens,
        scale=scale, output_final_state=output_final_state,
    )


def gla_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, State]:
    """Chunkwise-parallel GLA, float32 inside; gk [B,T,H,K], or [B,T,H,1] for one decay per head."""
    return call_kernel(
        _gla_chunk, dict(q=q, k=k, v=v, gk=gk), initial_state, cu_seqlens=cu_seqlens,
        scale=scale, output_final_state=output_final_state, chunk_size=chunk_size, recompute=True,
    )


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, State]:
    """GLA on q, k, gk [B,T,H,K], v [B,T,H,V]; states [N,H,K,V] float32."""
    return dispatch_op(OP, (gla_recurrent_torch, gla_chunk_torch), _fla_kernels, q, k, v, dict(gk=gk),
                       scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens, backend=backend)


def _fla_kernels() -> tuple[Kernel, Kernel]:
    from fla.ops.gla import fused_recurrent_gla

    from lmlab.kernels.fla_chunk import chunk_gla

    return fused_recurrent_gla, chunk_gla


dispatch.register_health_check(OP, fla_health_check)
