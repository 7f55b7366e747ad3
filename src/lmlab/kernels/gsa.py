"""Gated slot attention (GSA, Zhang et al., arXiv 2409.07146), fla 0.6.0 semantics.

For each sequence and head, M memory slots with a forget gate exp(g_t) ∈ (0, 1]^M (g_t <= 0, log) and
slot writes s_t ∈ R^M (fla's layer passes s = 1 − exp(g)), two GLA-style passes with a softmax between:
    key pass     Hk_t = Hk_{t-1} diag(exp(g_t)) + k_t s_tᵀ        [K, M]
                 p_t  = softmax(Hk_tᵀ (scale · q_t))               [M]
    value pass   Hv_t = diag(exp(g_t)) Hv_{t-1} + s_t v_tᵀ        [M, V]
                 o_t  = Hv_tᵀ p_t
The value pass is GLA with q = p, k = s, gk = g and scale 1: lmlab's GLA kernels run it. The key pass
decays the state's value side (the slots), which GLA's chunk form does not cover, so its chunkwise form
is written here (fla has a kernel of its own for this pass too). States are fla's pair
(Hk [N,H,K,M], Hv [N,H,M,V]), float32.
Implementations: `gsa_recurrent_torch` (the specification, step by step), `gsa_chunk_torch` (chunkwise,
below), fla's Triton `fused_recurrent_gsa` and `chunk_gsa` (the latter through lmlab's custom ops,
`fla_chunk.chunk_gsa`); `gsa` dispatches.

Chunkwise key pass. On the transposed state R = Hkᵀ [M, K] the update is GLA's (R_t = diag(exp(g_t))
R_{t-1} + s_t k_tᵀ, decay on R's rows), so the chunk carry, packed documents and final states are
`recurrent_common`'s; only the read differs, o_t = R_t q_t. With b_t = Σ_{s<=t} g_s inside a chunk:
    o_t = exp(b_t) ⊙ (R_0 q_t) + Σ_{j<=t} (q_t·k_j) s_j ⊙ exp(b_t − b_j)
The sum is computed without overflow as GLA's scores are: for keys before the query's sub-chunk,
exp(b_t − b_j) = exp(b_t − b_r) exp(b_r − b_j) with r the sub-chunk's first position (both <= 1); the
diagonal sub-chunks take their [c, c, M] decays explicitly.
"""
from __future__ import annotations

import math

import torch

from lmlab.kernels import dispatch
from lmlab.kernels.gla import SUB_CHUNK, _gla_chunk
from lmlab.kernels.recurrent_common import (
    CHUNK_SIZE,
    AnyState,
    Docs,
    Kernel,
    State,
    call_kernel,
    carry_weights,
    causal_mask,
    dispatch_op,
    fla_health_check,
    first_state,
    from_chunks,
    read_start_states,
    recurrent_torch,
    scan_chunks,
    to_chunks,
)

OP = "gsa"
GSAState = tuple[torch.Tensor, torch.Tensor] | None  # (Hk [N,H,K,M], Hv [N,H,M,V])


def _intra_chunk_reads(A: torch.Tensor, s: torch.Tensor, b: torch.Tensor, sub: int) -> torch.Tensor:
    """Σ_{j<=t} A_tj s_j ⊙ exp(b_t − b_j) for A [..., C, C] (zero above the diagonal), s and b
    (cumulative from the chunk's start, so non-increasing) [..., C, M]; returns [..., C, M]."""
    *lead, C, M = s.shape
    n_sub = C // sub
    ref = b[..., ::sub, :]  # [..., NS, M]: b at the first position of each sub-chunk
    first = torch.arange(0, C, sub, device=s.device)
    # keys strictly before each query sub-chunk, decayed to that sub-chunk's first position
    before = torch.arange(C, device=s.device) < first[:, None]  # [NS, C]
    s_ref = s[..., None, :, :] * torch.where(before[..., None], ref[..., :, None, :] - b[..., None, :, :],
                                             float("-inf")).exp()  # [..., NS, C, M]
    A_sub = A.reshape(*lead, n_sub, sub, C)
    b_sub, s_sub = b.reshape(*lead, n_sub, sub, M), s.reshape(*lead, n_sub, sub, M)
    reads = (A_sub @ s_ref) * (b_sub - ref[..., None, :]).exp()  # [..., NS, sub, M]
    # diagonal sub-chunks, exactly (picked with an identity matrix, as gla places them, not Tensor.diagonal)
    eye = torch.eye(n_sub, device=s.device, dtype=s.dtype)
    A_diag = torch.einsum("...atcj,ac->...atj", A_sub.reshape(*lead, n_sub, sub, n_sub, sub), eye)
    decay = torch.where(causal_mask(sub, s.device)[..., None], b_sub[..., :, None, :] - b_sub[..., None, :, :],
                        float("-inf")).exp()  # [..., NS, sub, sub, M]
    reads = reads + torch.einsum("...tj,...jm,...tjm->...tm", A_diag, s_sub, decay)
    return reads.reshape(*lead, C, M)


def _key_pass_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: State,
    output_final_state: bool,
    chunk_size: int,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, State]:
    """The key pass, chunkwise (module docstring): slot scores [B,T,H,M] float32 and Hk [N,H,K,M]."""
    T = k.shape[1]
    docs = None if cu_seqlens is None else Docs(cu_seqlens, T, chunk_size)
    q, k, s = (to_chunks(x, chunk_size) for x in (q * scale, k, s))  # [NC,B,H,C,D]
    b = to_chunks(g, chunk_size).cumsum(-2)
    mask = causal_mask(chunk_size, q.device) if docs is None else docs.pairs
    reads = _intra_chunk_reads((q @ k.transpose(-1, -2)) * mask, s, b, math.gcd(SUB_CHUNK, chunk_size))
    if docs is not None:
        b = docs.restart(b)
    R0 = None if initial_state is None else initial_state.transpose(-1, -2)  # [N,H,M,K]
    key_weights, chunk_decay = carry_weights(b, docs)
    sk = (s * key_weights).transpose(-1, -2) @ k  # [NC,B,H,M,K]
    if docs is not None and R0 is not None:
        sk = sk + docs.initial_carry(b, R0)

    sk, chunk_decay = sk.unbind(0), chunk_decay.unbind(0)  # see delta_chunk_states

    def step(R: torch.Tensor, i: int) -> tuple[torch.Tensor, None]:
        return R * chunk_decay[i] + sk[i], None

    starts, _, R = scan_chunks(first_state(s, k, R0, docs), step, q.shape[0])
    reads = reads + read_start_states(q, starts.transpose(-1, -2), docs, initial_state) * b.exp()
    if docs is not None and output_final_state:
        R = docs.final_states(starts, k, s, b, R0)
    return from_chunks(reads, T, torch.float32), (R.transpose(-1, -2) if output_final_state else None)


def _gsa_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: GSAState = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GSAState]:
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    scores, hk = _key_pass_chunk(q, k, s, g, scale=scale, initial_state=hk0, output_final_state=output_final_state,
                                 chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    o, hv = _gla_chunk(scores.softmax(-1), s, v, g, scale=1.0, initial_state=hv0,
                       output_final_state=output_final_state, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    return o, ((hk, hv) if output_final_state else None)


def _gsa_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: GSAState = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GSAState]:
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    passes = dict(output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    scores, hk = recurrent_torch(q, k, s.float(), gv=g, scale=scale, initial_state=hk0, **passes)  # float32 scores
    o, hv = recurrent_torch(scores.softmax(-1), s, v, gk=g, scale=1.0, initial_state=hv0, **passes)
    return o, ((hk, hv) if output_final_state else None)


def gsa_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: GSAState = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GSAState]:
    """Step-by-step GSA: the reference, and the fast path for decoding a few tokens."""
    return call_kernel(_gsa_recurrent, dict(q=q, k=k, v=v, s=s, g=g), initial_state, cu_seqlens=cu_seqlens,
                       scale=scale, output_final_state=output_final_state)


def gsa_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: GSAState = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, GSAState]:
    """Chunkwise-parallel GSA, float32 inside; only the inputs are kept for backward (`call_kernel`)."""
    return call_kernel(_gsa_chunk, dict(q=q, k=k, v=v, s=s, g=g), initial_state, cu_seqlens=cu_seqlens,
                       scale=scale, output_final_state=output_final_state, chunk_size=chunk_size, recompute=True)


def gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: GSAState = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, GSAState]:
    """GSA on q, k [B,T,H,K], v [B,T,H,V], s, g [B,T,H,M]; scale defaults to K^-1/2 (fla's op; its GSA
    layer passes 1). States: (Hk [N,H,K,M], Hv [N,H,M,V]) float32."""
    return dispatch_op(OP, (gsa_recurrent_torch, gsa_chunk_torch), _fla_kernels, q, k, v, dict(s=s, g=g),
                       scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens, backend=backend)


def _fla_kernels() -> tuple[Kernel, Kernel]:
    """fla's kernels with lmlab's state convention (a tuple, or None without output_final_state): the chunked
    one through lmlab's custom ops (`fla_chunk.chunk_gsa`: one compiled graph per block, where fla's own
    `chunk_gsa` is torch.compiler.disable'd), fla's `fused_recurrent_gsa` as it is: `dispatch_op` calls it only
    for a few tokens without gradients (decoding), so it needs no backward."""
    from fla.ops.gsa import fused_recurrent_gsa

    from lmlab.kernels.fla_chunk import chunk_gsa

    def recurrent(q, k, v, s, g, *, scale, initial_state, output_final_state,
                  cu_seqlens) -> tuple[torch.Tensor, AnyState]:
        o, final_state = fused_recurrent_gsa(q, k, v, s, g, scale=scale, initial_state=initial_state,
                                             output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return o, (tuple(final_state) if output_final_state else None)

    return recurrent, chunk_gsa


dispatch.register_health_check(OP, fla_health_check)
