"""lmlab's Triton selective scan for CUDA: the chunked (training, prefill) path of `selective_scan.selective_scan`.

Its PyTorch twins and specification are `selective_scan_recurrent_torch` and `selective_scan_chunk_torch`
(same inputs, outputs and dtypes). Why a kernel of our own: the library kernels are mamba-ssm's CUDA ones,
which are not installed on lmlab's GPU image; fla and transformers have only PyTorch fallbacks, and lmlab's
PyTorch chunk scan materialises [B, 64, D, N] tensors several times per chunk. Registered with
`torch.library.triton_op` (as `conv_triton`), so torch.compile keeps it inside the block's graph.

Layout: tokens flattened to [T, D] / [T, N], every sequence a document of `cu_seqlens` (dense rows are
documents of equal length). Each document is cut into chunks of CHUNK_SIZE tokens (its last one partial): no
chunk holds two documents' tokens. The recurrence h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) B_tᵀ is linear in
h, so a chunk's states are its states from a zero start plus its decay, exp(A ΣΔ), applied to the state it
starts from. That makes both passes parallel over chunks as well as channels: every kernel but the combine
runs one program per (chunk, block of BLOCK_D channels), which walks the chunk's tokens in order with the
[BLOCK_D, N] float32 state in registers (the old kernel walked whole documents: 2048 dependent steps).

Forward
1. `_fwd_local_kernel`: each chunk's end state from a zero start, and its ΣΔ.
2. `_combine_kernel`, per (document, block of channels), along the document's chunks: each chunk's true
   start state (the initial state or zeros before the first), kept for backward, and the final state.
3. `_fwd_output_kernel`: each chunk again from its start state, y_t = h_t C_t.
Backward: G_t = dL/dh_t follows the same recurrence backwards in time, independent of h,
G_t = dy_t C_tᵀ + exp(Δ_{t+1} A) ⊙ G_{t+1} (plus dL/d final state at a document's last token), and
du_t = Δ_t G_t B_t,  dΔ_t = u_t G_t B_t + Σ_n A ⊙ exp(Δ_t A) ⊙ h_{t-1} ⊙ G_t,
dA = Σ_t Δ_t exp(Δ_t A) ⊙ h_{t-1} ⊙ G_t,  dB_t = Σ_d Δ_t u_t G_t,  dC_t = Σ_d dy_t h_t,
d initial state = exp(Δ_first A) ⊙ G_first.
1. `_bwd_local_kernel`: each chunk's dL/d(state before it) from the dy inside it, and its ΣΔ.
2. `_combine_kernel` backwards along each document: the gradient entering each chunk from later chunks, and
   the initial state's.
3. `_bwd_chunk_kernel`: forward from the kept start state (dC; the state before every UNROLL tokens to a
   small scratch), then backwards UNROLL tokens at a time: their states recomputed into registers from the
   scratch (never recovered by undoing a step, which would divide by the decay), G_t carried from the
   entering gradient; du, dΔ, and partial sums of dA (one per chunk) and dB, dC (one per block of channels),
   summed afterwards: deterministic, unlike atomic adds.
Only exp of non-positive numbers is evaluated (A < 0, Δ > 0): never the exponential of a positive number.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lmlab.kernels.recurrent_common import triton_source_tag

_SOURCE_TAG = triton_source_tag(__file__)  # edits must miss torch.compile's caches (conv_triton)
# 64-token chunks: the states kept for backward stay at [T/64, D, N] float32 (33 MiB a layer at mamba_340M)
# and a 2048-token document needs 32 sequential combine steps.
CHUNK_SIZE = 64
# One warp per program and 32 channels: the [32, N = 16] state is 16 floats a thread (4 channels x 4 of N, the
# layout Triton gives A's 16-byte rows), so the sums over N (y, du, dΔ) and over channels (dB, dC) are adds in
# registers and 2-3 shuffles, never shared memory; 25-32 such programs (60-80 registers a thread) share an
# SM to hide the loads' latency. At mamba_340M the grid is 264 chunks x 64 blocks.
BLOCK_D = 32
NUM_WARPS = 1
UNROLL = 4  # tokens a loop iteration: their loads are issued together (each alone is latency-bound)
# Backward's chunk programs, each looping over (chunk, block) items with its own scratch rows
# (CHUNK_SIZE / UNROLL states, 32 KiB): 8 fit a SM with its ~230 registers a thread, 132 SMs on an H100.
BWD_PROGRAMS = 1024


@triton.jit
def _at(t, stop, cols, m_c):
    """Where row t's cols exist: m_c, if t < stop (compared per column: Triton's interpreter mis-broadcasts a
    scalar mask)."""
    return m_c & (cols * 0 + t < stop)


@triton.jit
def _token(x, t, stop, cols, m_c, stride):
    """Row t of x at cols, float32 (zeros from stop on: a step past the chunk's end then changes nothing)."""
    mask = m_c & (cols * 0 + t < stop)  # _at's, inline: each call costs Triton's interpreter ~0.2 ms
    return tl.load(x + t * stride + cols, mask=mask, other=0).to(tl.float32)


@triton.jit
def _chunk(i, chunk_doc, cu_chunks, cu_seqlens, CHUNK: tl.constexpr):
    """Chunk i's tokens [start, stop) (start >= stop for the spare chunks past the last one, which then read and
    write nothing that is used)."""
    doc = tl.load(chunk_doc + i)
    start = tl.load(cu_seqlens + doc).to(tl.int64) + (i - tl.load(cu_chunks + doc)) * CHUNK
    return start, tl.minimum(start + CHUNK, tl.load(cu_seqlens + doc + 1).to(tl.int64))


@triton.jit
def _channels(A, block, D, N, BD: tl.constexpr, BN: tl.constexpr):
    """A block of channels: offsets and masks of d [BD] and n [BN], and A * log2(e) [BD, BN] (for exp2)."""
    o_d = block * BD + tl.arange(0, BD)
    o_n = tl.arange(0, BN)
    m_d, m_n = o_d < D, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    a2 = tl.load(A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0).to(tl.float32) * 1.4426950408889634
    return o_d, o_n, m_d, m_n, m_dn, a2


@triton.jit
def _fwd_local_kernel(u, delta, A, B, chunk_doc, cu_chunks, cu_seqlens, local, delta_sum, D, N, stride_u,
                      stride_delta, stride_b, CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                      U: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    start, stop = _chunk(i, chunk_doc, cu_chunks, cu_seqlens, CHUNK)
    o_d, o_n, m_d, m_n, m_dn, a2 = _channels(A, tl.program_id(1), D, N, BD, BN)
    h = tl.zeros([BD, BN], dtype=tl.float32)
    total = tl.zeros([BD], dtype=tl.float32)
    for first in range(start, stop, U):
        for k in tl.static_range(U):  # unrolled: the compiler issues the U tokens' loads together
            t = first + k
            dt = _token(delta, t, stop, o_d, m_d, stride_delta)
            x = (dt * _token(u, t, stop, o_d, m_d, stride_u))[:, None] * _token(B, t, stop, o_n, m_n,
                                                                                   stride_b)[None, :]
            h = tl.exp2(dt[:, None] * a2) * h + x
            total += dt
    tl.store(local + (i * D + o_d[:, None]) * N + o_n[None, :], h, mask=m_dn)
    tl.store(delta_sum + i * D + o_d, total, mask=m_d)


@triton.jit
def _combine_kernel(local, delta_sum, A, init, cu_chunks, out, D, N, BD: tl.constexpr, BN: tl.constexpr,
                    HAS_INIT: tl.constexpr, HAS_OUT: tl.constexpr, REVERSE: tl.constexpr):
    """Per (document, block of channels), along the document's chunks (from its last if REVERSE): replaces each
    chunk's own contribution in `local` by what enters the chunk from the ones before it, starting from `init`
    (or zeros); `out` gets what leaves the document. A chunk passes on exp(A ΣΔ) ⊙ what entered + its own."""
    doc = tl.program_id(0)
    o_d, o_n, m_d, m_n, m_dn, a2 = _channels(A, tl.program_id(1), D, N, BD, BN)
    o_dn = o_d[:, None] * N + o_n[None, :]
    first = tl.load(cu_chunks + doc)
    count = tl.load(cu_chunks + doc + 1) - first
    carry = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_INIT:
        carry = tl.load(init + doc * D * N + o_dn, mask=m_dn, other=0).to(tl.float32)
    for k in range(count):
        c = (first + (count - 1 - k if REVERSE else k)).to(tl.int64)
        own = tl.load(local + c * D * N + o_dn, mask=m_dn, other=0)
        decay = tl.exp2(tl.load(delta_sum + c * D + o_d, mask=m_d, other=0)[:, None] * a2)
        tl.store(local + c * D * N + o_dn, carry, mask=m_dn)
        carry = decay * carry + own
    if HAS_OUT:
        tl.store(out + doc * D * N + o_dn, carry.to(out.dtype.element_ty), mask=m_dn)


@triton.jit
def _fwd_output_kernel(u, delta, A, B, C, chunk_doc, cu_chunks, cu_seqlens, states, y, D, N, stride_u,
                       stride_delta, stride_b, stride_c, CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                       U: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    start, stop = _chunk(i, chunk_doc, cu_chunks, cu_seqlens, CHUNK)
    o_d, o_n, m_d, m_n, m_dn, a2 = _channels(A, tl.program_id(1), D, N, BD, BN)
    h = tl.load(states + (i * D + o_d[:, None]) * N + o_n[None, :], mask=m_dn, other=0)
    h = tl.where(start < stop, h, 0)  # a spare chunk's entry was never written
    for first in range(start, stop, U):
        for k in tl.static_range(U):
            t = first + k
            dt = _token(delta, t, stop, o_d, m_d, stride_delta)
            x = (dt * _token(u, t, stop, o_d, m_d, stride_u))[:, None] * _token(B, t, stop, o_n, m_n,
                                                                                   stride_b)[None, :]
            h = tl.exp2(dt[:, None] * a2) * h + x
            y_t = tl.sum(h * _token(C, t, stop, o_n, m_n, stride_c)[None, :], 1)
            tl.store(y + t * D + o_d, y_t.to(y.dtype.element_ty), mask=_at(t, stop, o_d, m_d))


@triton.jit
def _bwd_local_kernel(delta, A, C, dy, chunk_doc, cu_chunks, cu_seqlens, local, delta_sum, D, N, stride_delta,
                      stride_c, CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, U: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    start, stop = _chunk(i, chunk_doc, cu_chunks, cu_seqlens, CHUNK)
    o_d, o_n, m_d, m_n, m_dn, a2 = _channels(A, tl.program_id(1), D, N, BD, BN)
    dh = tl.zeros([BD, BN], dtype=tl.float32)  # dL/d(state before token t) from the dy of t and later tokens
    total = tl.zeros([BD], dtype=tl.float32)
    steps = (tl.maximum(stop - start, 0) + U - 1) // U
    for j in range(steps):
        first = start + (steps - 1 - j) * U
        for k in tl.static_range(U):
            t = first + U - 1 - k
            dt = _token(delta, t, stop, o_d, m_d, stride_delta)
            g = _token(dy, t, stop, o_d, m_d, D)
            dh = tl.exp2(dt[:, None] * a2) * (dh + g[:, None] * _token(C, t, stop, o_n, m_n, stride_c)[None, :])
            total += dt
    tl.store(local + (i * D + o_d[:, None]) * N + o_n[None, :], dh, mask=m_dn)
    tl.store(delta_sum + i * D + o_d, total, mask=m_d)


@triton.jit
def _advance(h, a2, u, delta, B, t, stop, o_d, m_d, o_n, m_n, stride_u, stride_delta, stride_b):
    """Token t's step from the state h before it: (exp(Δ_t A) ⊙ h, the state after it)."""
    dt = _token(delta, t, stop, o_d, m_d, stride_delta)
    kept = tl.exp2(dt[:, None] * a2) * h
    x = (dt * _token(u, t, stop, o_d, m_d, stride_u))[:, None] * _token(B, t, stop, o_n, m_n, stride_b)[None, :]
    return kept, kept + x


@triton.jit
def _retreat(dh, dA, kept, a2, u, delta, B, C, dy, du, ddelta, dB_part, block, T, D, N, t, stop, o_d, m_d, o_n,
             m_n, stride_u, stride_delta, stride_b, stride_c):
    """Token t's gradients, given dh = dL/dh_t from later tokens and kept = exp(Δ_t A) ⊙ h_{t-1}: stores du_t,
    dΔ_t and this block's part of dB_t; returns (dL/dh_{t-1} from t and later tokens, dA's sum so far)."""
    dt = _token(delta, t, stop, o_d, m_d, stride_delta)
    ut = _token(u, t, stop, o_d, m_d, stride_u)
    b = _token(B, t, stop, o_n, m_n, stride_b)
    dh += _token(dy, t, stop, o_d, m_d, D)[:, None] * _token(C, t, stop, o_n, m_n, stride_c)[None, :]
    d_decay = dh * kept  # dL/d(Δ_t A) through the decay
    dh_b = tl.sum(dh * b[None, :], 1)  # dL/d(Δ_t u_t)
    m_td = _at(t, stop, o_d, m_d)
    tl.store(du + t * D + o_d, (dh_b * dt).to(du.dtype.element_ty), mask=m_td)
    ddelta_t = dh_b * ut + tl.sum(d_decay * a2, 1) * 0.6931471805599453  # a2 = A log2(e)
    tl.store(ddelta + t * D + o_d, ddelta_t.to(ddelta.dtype.element_ty), mask=m_td)
    tl.store(dB_part + (block * T + t) * N + o_n, tl.sum(dh * (dt * ut)[:, None], 0), mask=_at(t, stop, o_n, m_n))
    return tl.exp2(dt[:, None] * a2) * dh, dA + d_decay * dt[:, None]


@triton.jit
def _bwd_chunk_kernel(u, delta, A, B, C, dy, chunk_doc, cu_chunks, cu_seqlens, states, dh_after, scratch, du,
                      ddelta, dA_part, dB_part, dC_part, n_chunks, T, D, N, stride_u, stride_delta, stride_b,
                      stride_c, CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, U: tl.constexpr):
    tl.static_assert(U == 4, "the backward walk keeps 4 tokens' states in named registers")
    # each program walks several (chunk, block of channels) items and keeps its sub-chunk start states in its
    # own scratch rows, so the scratch is bounded by the grid, not by T
    scratch += tl.program_id(0).to(tl.int64) * (CHUNK // U) * BD * BN
    o_scratch = tl.arange(0, BD)[:, None] * BN + tl.arange(0, BN)[None, :]
    n_blocks = tl.cdiv(D, BD)
    for item in range(tl.program_id(0), n_chunks * n_blocks, tl.num_programs(0)):
        i = (item // n_blocks).to(tl.int64)
        block = item % n_blocks
        start, stop = _chunk(i, chunk_doc, cu_chunks, cu_seqlens, CHUNK)
        o_d, o_n, m_d, m_n, m_dn, a2 = _channels(A, block, D, N, BD, BN)
        o_dn = (i * D + o_d[:, None]) * N + o_n[None, :]
        # forward from the kept start state: each sub-chunk's start state to the scratch, dC's part on the way
        h = tl.where(start < stop, tl.load(states + o_dn, mask=m_dn, other=0), 0)  # spare chunks: never written
        tl.debug_barrier()  # the previous item's reads of the scratch are done
        for first in range(start, stop, U):
            tl.store(scratch + (first - start) // U * BD * BN + o_scratch, h)
            for k in tl.static_range(U):
                t = first + k
                _, h = _advance(h, a2, u, delta, B, t, stop, o_d, m_d, o_n, m_n, stride_u, stride_delta, stride_b)
                g = _token(dy, t, stop, o_d, m_d, D)
                tl.store(dC_part + (block * T + t) * N + o_n, tl.sum(g[:, None] * h, 0), mask=_at(t, stop, o_n, m_n))
        tl.debug_barrier()  # threads may read start states that other threads stored
        # backward, U tokens at a time: their states recomputed from the sub-chunk's start state, kept in
        # registers (never recovered by undoing a step: that would divide by the decay)
        dh = tl.where(start < stop, tl.load(dh_after + o_dn, mask=m_dn, other=0), 0)
        dA = tl.zeros([BD, BN], dtype=tl.float32)
        steps = (tl.maximum(stop - start, 0) + U - 1) // U
        for j in range(steps):
            first = start + (steps - 1 - j) * U
            h = tl.load(scratch + (steps - 1 - j) * BD * BN + o_scratch)
            kept0, h = _advance(h, a2, u, delta, B, first, stop, o_d, m_d, o_n, m_n, stride_u, stride_delta,
                                stride_b)
            kept1, h = _advance(h, a2, u, delta, B, first + 1, stop, o_d, m_d, o_n, m_n, stride_u,
                                stride_delta, stride_b)
            kept2, h = _advance(h, a2, u, delta, B, first + 2, stop, o_d, m_d, o_n, m_n, stride_u,
                                stride_delta, stride_b)
            kept3, _ = _advance(h, a2, u, delta, B, first + 3, stop, o_d, m_d, o_n, m_n, stride_u,
                                stride_delta, stride_b)
            dh, dA = _retreat(dh, dA, kept3, a2, u, delta, B, C, dy, du, ddelta, dB_part, block, T, D, N, first + 3,
                              stop, o_d, m_d, o_n, m_n, stride_u, stride_delta, stride_b, stride_c)
            dh, dA = _retreat(dh, dA, kept2, a2, u, delta, B, C, dy, du, ddelta, dB_part, block, T, D, N, first + 2,
                              stop, o_d, m_d, o_n, m_n, stride_u, stride_delta, stride_b, stride_c)
            dh, dA = _retreat(dh, dA, kept1, a2, u, delta, B, C, dy, du, ddelta, dB_part, block, T, D, N, first + 1,
                              stop, o_d, m_d, o_n, m_n, stride_u, stride_delta, stride_b, stride_c)
            dh, dA = _retreat(dh, dA, kept0, a2, u, delta, B, C, dy, du, ddelta, dB_part, block, T, D, N, first,
                              stop, o_d, m_d, o_n, m_n, stride_u, stride_delta, stride_b, stride_c)
        tl.store(dA_part + o_dn, dA, mask=m_dn)


def _chunk_index(cu_seqlens: torch.Tensor, chunk_size: int, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each document's first chunk (cu_chunks [N_seq + 1]) and each of the n_chunks programs' document
    (chunk_doc [n_chunks]; the last document for the spare programs past the last chunk), int32, on the device."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    cu_chunks = torch.cat([cu_seqlens.new_zeros(1), ((lengths + chunk_size - 1) // chunk_size).cumsum(0)])
    cu_chunks = cu_chunks.to(torch.int32)
    programs = torch.arange(n_chunks, dtype=torch.int32, device=cu_seqlens.device)
    chunk_doc = torch.searchsorted(cu_chunks, programs, right=True, out_int32=True) - 1  # skips empty documents
    return chunk_doc.clamp_(max=len(cu_seqlens) - 2), cu_chunks


def _n_chunks(T: int, n_seq: int, chunk_size: int) -> int:
    """A bound on the chunks of any n_seq documents of T tokens together (each adds at most one partial chunk),
    from the sizes alone: the grid and the kept states' shape never depend on the document layout."""
    return T // chunk_size + n_seq


@triton_op(f"lmlab::selective_scan_fwd_{_SOURCE_TAG}", mutates_args={})
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor, chunk_size: int, block_d: int,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [T,D] in u's dtype, final states [N_seq,D,N] float32, each chunk's start state, kept for backward)."""
    T, D = u.shape
    N = A.shape[1]
    n_seq = cu_seqlens.shape[0] - 1
    BN = triton.next_power_of_2(N)
    n_chunks = _n_chunks(T, n_seq, chunk_size)
    chunk_doc, cu_chunks = _chunk_index(cu_seqlens, chunk_size, n_chunks)
    y = torch.empty((T, D), dtype=u.dtype, device=u.device)
    final = torch.empty((n_seq, D, N), dtype=torch.float32, device=u.device)
    states = torch.empty((n_chunks, D, N), dtype=torch.float32, device=u.device)
    delta_sum = torch.empty((n_chunks, D), dtype=torch.float32, device=u.device)
    grid = (n_chunks, triton.cdiv(D, block_d))
    sizes = dict(CHUNK=chunk_size, BD=block_d, BN=BN, U=UNROLL, num_warps=NUM_WARPS)
    wrap_triton(_fwd_local_kernel)[grid](u, delta, A, B, chunk_doc, cu_chunks, cu_seqlens, states, delta_sum, D, N,
                                         u.stride(0), delta.stride(0), B.stride(0), **sizes)
    wrap_triton(_combine_kernel)[(n_seq, triton.cdiv(D, block_d))](
        states, delta_sum, A, final if initial_state is None else initial_state, cu_chunks, final, D, N, BD=block_d,
        BN=BN, HAS_INIT=initial_state is not None, HAS_OUT=True, REVERSE=False, num_warps=NUM_WARPS)
    wrap_triton(_fwd_output_kernel)[grid](u, delta, A, B, C, chunk_doc, cu_chunks, cu_seqlens, states, y, D, N,
                                          u.stride(0), delta.stride(0), B.stride(0), C.stride(0), **sizes)
    return y, final, states


@triton_op(f"lmlab::selective_scan_bwd_{_SOURCE_TAG}", mutates_args={})
def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor, states: torch.Tensor, dy: torch.Tensor,
              dht: torch.Tensor | None, chunk_size: int, block_d: int,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dΔ, dA, dB, dC, d initial_state), each in its input's dtype (an empty tensor without initial state)."""
    T, D = u.shape
    N = A.shape[1]
    n_seq = cu_seqlens.shape[0] - 1
    BN = triton.next_power_of_2(N)
    n_chunks = states.shape[0]
    chunk_doc, cu_chunks = _chunk_index(cu_seqlens, chunk_size, n_chunks)
    grid = (n_chunks, triton.cdiv(D, block_d))
    sizes = dict(CHUNK=chunk_size, BD=block_d, BN=BN, U=UNROLL, num_warps=NUM_WARPS)
    f32 = dict(dtype=torch.float32, device=u.device)
    dh_after = torch.empty((n_chunks, D, N), **f32)
    delta_sum = torch.empty((n_chunks, D), **f32)
    dh0 = torch.empty((n_seq, D, N) if initial_state is not None else (0,), **f32)
    du = torch.empty((T, D), dtype=u.dtype, device=u.device)
    ddelta = torch.empty((T, D), dtype=delta.dtype, device=u.device)
    dA_part = torch.empty((n_chunks, D, N), **f32)
    dB_part, dC_part = torch.empty((2, grid[1], T, N), **f32)
    wrap_triton(_bwd_local_kernel)[grid](delta, A, C, dy, chunk_doc, cu_chunks, cu_seqlens, dh_after, delta_sum,
                                         D, N, delta.stride(0), C.stride(0), **sizes)
    wrap_triton(_combine_kernel)[(n_seq, grid[1])](
        dh_after, delta_sum, A, dh0 if dht is None else dht, cu_chunks, dh0, D, N, BD=block_d, BN=BN,
        HAS_INIT=dht is not None, HAS_OUT=initial_state is not None, REVERSE=True, num_warps=NUM_WARPS)
    programs = min(n_chunks * grid[1], BWD_PROGRAMS)
    scratch = torch.empty((programs, chunk_size // UNROLL, block_d, BN), **f32)
    wrap_triton(_bwd_chunk_kernel)[(programs,)](
        u, delta, A, B, C, dy, chunk_doc, cu_chunks, cu_seqlens, states, dh_after, scratch, du, ddelta, dA_part,
        dB_part, dC_part, n_chunks, T, D, N, u.stride(0), delta.stride(0), B.stride(0), C.stride(0), **sizes)
    dh0 = dh0 if initial_state is None else dh0.to(initial_state.dtype)
    return (du, ddelta, dA_part.sum(0).to(A.dtype), dB_part.sum(0).to(B.dtype), dC_part.sum(0).to(C.dtype), dh0)


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, initial_state, cu_seqlens, chunk_size, block_d = inputs
    ctx.save_for_backward(u, delta, A, B, C, initial_state, cu_seqlens, output[2])
    ctx.sizes = chunk_size, block_d
    ctx.set_materialize_grads(False)  # no zero tensor for an unused final state's gradient


def _backward(ctx, dy, dht, _):
    u, delta, A, B, C, initial_state, cu_seqlens, states = ctx.saved_tensors
    dy = torch.zeros_like(u) if dy is None else dy.contiguous()
    du, ddelta, dA, dB, dC, dh0 = _scan_bwd(u, delta, A, B, C, initial_state, cu_seqlens, states, dy,
                                           None if dht is None else dht.contiguous(), *ctx.sizes)
    return du, ddelta, dA, dB, dC, (None if initial_state is None else dh0), None, None, None


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan on CUDA, as `selective_scan_chunk_torch`: u, Δ [S,T,D], A [D,N], B, C [S,T,N]
    -> (y [S,T,D] in u's dtype, final states [N_seq,D,N] float32 or None). With `cu_seqlens` S is 1."""
    S, T, D = u.shape
    if cu_seqlens is None:  # each row is one document
        cu_seqlens = torch.arange(S + 1, dtype=torch.int32, device=u.device) * T
    u, delta, B, C = (x.reshape(S * T, x.shape[-1]) for x in (u, delta, B, C))
    u, delta, B, C = (x if x.stride(1) == 1 else x.contiguous() for x in (u, delta, B, C))
    y, final, _ = _scan_fwd(u, delta, A.contiguous(), B, C,
                            None if initial_state is None else initial_state.contiguous(), cu_seqlens,
                            CHUNK_SIZE, BLOCK_D)
    return y.view(S, T, D), (final if output_final_state else None)
