"""lmlab's Triton selective scan for CUDA: the chunked (training, prefill) path of `selective_scan.selective_scan`.

Its PyTorch twins and specification are `selective_scan_recurrent_torch` and `selective_scan_chunk_torch`
(same inputs, outputs and dtypes). Why a kernel of our own: the library kernels are mamba-ssm's CUDA ones,
which are not installed on lmlab's GPU image; fla and transformers have only PyTorch fallbacks, and lmlab's
PyTorch chunk scan materialises [B, 64, D, N] tensors several times per chunk. Registered with
`torch.library.triton_op` (as `conv_triton`), so torch.compile keeps it inside the block's graph.

Layout: tokens flattened to [T, D] / [T, N], every sequence a document of `cu_seqlens` (dense rows are
documents of equal length). One program per (document, block of D channels) runs the document's tokens in
order with the [BLOCK_D, N] state in registers, float32. Forward keeps the state at every chunk boundary
(every CHUNK_SIZE tokens of the flattened stream) that falls inside a document. Backward runs each
document's chunks in reverse: it recomputes the chunk's states from the kept one into a per-program scratch
buffer, then walks the chunk backwards carrying dL/dh. Reductions over channels (dB, dC) and over tokens
(dA) are written as per-program partial sums, then summed: deterministic, unlike atomic adds.
Only exp(Δ A) with A < 0 is evaluated: never the exponential of a positive number.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lmlab.kernels.recurrent_common import triton_source_tag

_SOURCE_TAG = triton_source_tag(__file__)  # edits must miss torch.compile's caches (conv_triton)
CHUNK_SIZE = 64  # tokens between kept states: backward's recompute length
BLOCK_D = 32  # channels per program
# Backward programs per block of channels, each looping over documents: bounds the scratch buffer
# (LANES x D x N x CHUNK_SIZE float32; 64 MiB at D = 2048, N = 16) whatever the number of documents.
LANES = 8
NUM_WARPS = 4


@triton.jit
def _load_step(u, delta, B, C, t, o_d, o_n, m_d, m_n, stride_u, stride_delta, stride_b, stride_c):
    """Token t's u, Δ [BLOCK_D] and B, C [BLOCK_N], float32."""
    u_t = tl.load(u + t * stride_u + o_d, mask=m_d, other=0).to(tl.float32)
    d_t = tl.load(delta + t * stride_delta + o_d, mask=m_d, other=0).to(tl.float32)
    b_t = tl.load(B + t * stride_b + o_n, mask=m_n, other=0).to(tl.float32)
    c_t = tl.load(C + t * stride_c + o_n, mask=m_n, other=0).to(tl.float32)
    return u_t, d_t, b_t, c_t


@triton.jit
def _scan_fwd_kernel(u, delta, A, B, C, h0, cu_seqlens, y, final, chunk_states, D, N, stride_u, stride_delta,
                     stride_b, stride_c, CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                     HAS_H0: tl.constexpr):
    seq = tl.program_id(0)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    o_n = tl.arange(0, BN)
    m_d, m_n = o_d < D, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    a = tl.load(A + o_dn, mask=m_dn, other=0).to(tl.float32)
    bos = tl.load(cu_seqlens + seq).to(tl.int64)
    eos = tl.load(cu_seqlens + seq + 1).to(tl.int64)
    h = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0 + seq * D * N + o_dn, mask=m_dn, other=0).to(tl.float32)
    for t in range(bos, eos):
        if (t % CHUNK == 0) & (t > bos):  # a chunk starts inside the document: keep its state for backward
            tl.store(chunk_states + (t // CHUNK) * D * N + o_dn, h, mask=m_dn)
        u_t, d_t, b_t, c_t = _load_step(u, delta, B, C, t, o_d, o_n, m_d, m_n, stride_u, stride_delta, stride_b,
                                        stride_c)
        h = tl.exp(d_t[:, None] * a) * h + (d_t * u_t)[:, None] * b_t[None, :]
        tl.store(y + t * D + o_d, tl.sum(h * c_t[None, :], 1).to(y.dtype.element_ty), mask=m_d)
    tl.store(final + seq * D * N + o_dn, h, mask=m_dn)


@triton.jit
def _scan_bwd_kernel(u, delta, A, B, C, h0, cu_seqlens, chunk_states, dy, dht, scratch, du, ddelta, dA_part,
                     dB_part, dC_part, dh0, n_seq, T, D, N, stride_u, stride_delta, stride_b, stride_c,
                     CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_H0: tl.constexpr,
                     HAS_DHT: tl.constexpr):
    lane, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    o_n = tl.arange(0, BN)
    m_d, m_n = o_d < D, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    a = tl.load(A + o_dn, mask=m_dn, other=0).to(tl.float32)
    # this program's scratch: the states of one chunk, [CHUNK, BD, BN]
    scratch += (lane * tl.num_programs(1) + i_d).to(tl.int64) * CHUNK * BD * BN
    o_scratch = tl.arange(0, BD)[:, None] * BN + o_n[None, :]
    dA_acc = tl.zeros([BD, BN], dtype=tl.float32)
    for seq in range(lane, n_seq, tl.num_programs(0)):
        bos = tl.load(cu_seqlens + seq).to(tl.int64)
        eos = tl.load(cu_seqlens + seq + 1).to(tl.int64)
        h_first = tl.zeros([BD, BN], dtype=tl.float32)
        if HAS_H0:
            h_first = tl.load(h0 + seq * D * N + o_dn, mask=m_dn, other=0).to(tl.float32)
        dh = tl.zeros([BD, BN], dtype=tl.float32)  # dL/dh after the token being processed
        if HAS_DHT:
            dh = tl.load(dht + seq * D * N + o_dn, mask=m_dn, other=0).to(tl.float32)
        last_chunk = (eos - 1) // CHUNK
        n_chunks = tl.where(eos > bos, last_chunk - bos // CHUNK + 1, 0)
        for i in range(n_chunks):
            c = last_chunk - i
            start = tl.maximum(bos, c * CHUNK)
            stop = tl.minimum(eos, c * CHUNK + CHUNK)
            # the kept state, unless the document starts in this chunk (then that entry was never written)
            kept = tl.load(chunk_states + c * D * N + o_dn, mask=m_dn, other=0)
            h_start = tl.where(start > bos, kept, h_first)
            h = h_start
            tl.debug_barrier()  # the previous chunk's reads of the scratch are done
            for t in range(start, stop):
                u_t, d_t, b_t, c_t = _load_step(u, delta, B, C, t, o_d, o_n, m_d, m_n, stride_u, stride_delta,
                                                stride_b, stride_c)
                h = tl.exp(d_t[:, None] * a) * h + (d_t * u_t)[:, None] * b_t[None, :]
                tl.store(scratch + (t - start) * BD * BN + o_scratch, h)
            tl.debug_barrier()  # threads may read states that other threads stored
            for j in range(stop - start):
                t = stop - 1 - j
                h_t = tl.load(scratch + (t - start) * BD * BN + o_scratch)
                prev = tl.load(scratch + tl.maximum(t - start - 1, 0) * BD * BN + o_scratch)
                h_prev = tl.where(t > start, prev, h_start)
                u_t, d_t, b_t, c_t = _load_step(u, delta, B, C, t, o_d, o_n, m_d, m_n, stride_u, stride_delta,
                                                stride_b, stride_c)
                g = tl.load(dy + t * D + o_d, mask=m_d, other=0).to(tl.float32)
                tl.store(dC_part + (i_d * T + t) * N + o_n, tl.sum(g[:, None] * h_t, 0), mask=m_n)
                dh += g[:, None] * c_t[None, :]
                decay = tl.exp(d_t[:, None] * a)
                d_decay = dh * h_prev * decay  # dL/d(Δ A) through the decay
                dh_b = tl.sum(dh * b_t[None, :], 1)  # dL/d(Δ u)
                tl.store(du + t * D + o_d, (dh_b * d_t).to(du.dtype.element_ty), mask=m_d)
                tl.store(ddelta + t * D + o_d, (dh_b * u_t + tl.sum(d_decay * a, 1)).to(ddelta.dtype.element_ty),
                         mask=m_d)
                tl.store(dB_part + (i_d * T + t) * N + o_n, tl.sum(dh * (d_t * u_t)[:, None], 0), mask=m_n)
                dA_acc += d_decay * d_t[:, None]
                dh = dh * decay  # on to the state before token t
        if HAS_H0:
            tl.store(dh0 + seq * D * N + o_dn, dh.to(dh0.dtype.element_ty), mask=m_dn)
    tl.store(dA_part + lane * D * N + o_dn, dA_acc, mask=m_dn)


@triton_op(f"lmlab::selective_scan_fwd_{_SOURCE_TAG}", mutates_args={})
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor, chunk_size: int, block_d: int,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [T,D] in u's dtype, final states [N_seq,D,N] float32, the states kept for backward)."""
    T, D = u.shape
    N = A.shape[1]
    n_seq = cu_seqlens.shape[0] - 1
    y = torch.empty((T, D), dtype=u.dtype, device=u.device)
    final = torch.empty((n_seq, D, N), dtype=torch.float32, device=u.device)
    chunk_states = torch.empty((triton.cdiv(T, chunk_size), D, N), dtype=torch.float32, device=u.device)
    wrap_triton(_scan_fwd_kernel)[(n_seq, triton.cdiv(D, block_d))](
        u, delta, A, B, C, final if initial_state is None else initial_state, cu_seqlens, y, final, chunk_states,
        D, N, u.stride(0), delta.stride(0), B.stride(0), C.stride(0), CHUNK=chunk_size, BD=block_d,
        BN=triton.next_power_of_2(N), HAS_H0=initial_state is not None, num_warps=NUM_WARPS)
    return y, final, chunk_states


@triton_op(f"lmlab::selective_scan_bwd_{_SOURCE_TAG}", mutates_args={})
def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor, chunk_states: torch.Tensor,
              dy: torch.Tensor, dht: torch.Tensor | None, chunk_size: int, block_d: int,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dΔ, dA, dB, dC, d initial_state), each in its input's dtype (an empty tensor without initial state)."""
    T, D = u.shape
    N = A.shape[1]
    n_seq = cu_seqlens.shape[0] - 1
    BN = triton.next_power_of_2(N)
    grid = (min(n_seq, LANES), triton.cdiv(D, block_d))
    f32 = dict(dtype=torch.float32, device=u.device)
    scratch = torch.empty((grid[0] * grid[1] * chunk_size * block_d * BN,), **f32)
    du = torch.empty((T, D), dtype=u.dtype, device=u.device)
    ddelta = torch.empty((T, D), dtype=delta.dtype, device=u.device)
    dA_part = torch.empty((grid[0], D, N), **f32)
    dB_part, dC_part = torch.empty((2, grid[1], T, N), **f32)
    dh0 = torch.empty((n_seq, D, N) if initial_state is not None else (0,), **f32)
    wrap_triton(_scan_bwd_kernel)[grid](
        u, delta, A, B, C, dh0 if initial_state is None else initial_state, cu_seqlens, chunk_states, dy,
        dh0 if dht is None else dht, scratch, du, ddelta, dA_part, dB_part, dC_part, dh0, n_seq, T, D, N,
        u.stride(0), delta.stride(0), B.stride(0), C.stride(0), CHUNK=chunk_size, BD=block_d, BN=BN,
        HAS_H0=initial_state is not None, HAS_DHT=dht is not None, num_warps=NUM_WARPS)
    dh0 = dh0 if initial_state is None else dh0.to(initial_state.dtype)
    return (du, ddelta, dA_part.sum(0).to(A.dtype), dB_part.sum(0).to(B.dtype), dC_part.sum(0).to(C.dtype), dh0)


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, initial_state, cu_seqlens, chunk_size, block_d = inputs
    ctx.save_for_backward(u, delta, A, B, C, initial_state, cu_seqlens, output[2])
    ctx.chunk_size, ctx.block_d = chunk_size, block_d
    ctx.set_materialize_grads(False)  # no zero tensor for an unused final state's gradient


def _backward(ctx, dy, dht, _):
    u, delta, A, B, C, initial_state, cu_seqlens, chunk_states = ctx.saved_tensors
    dy = torch.zeros_like(u) if dy is None else dy.contiguous()
    du, ddelta, dA, dB, dC, dh0 = _scan_bwd(u, delta, A, B, C, initial_state, cu_seqlens, chunk_states, dy,
                                           None if dht is None else dht.contiguous(), ctx.chunk_size, ctx.block_d)
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
