"""lmlab's Triton local attention for CUDA: the "triton" backend of `local_attention.local_attention` for
windows of at most 64 tokens and as many queries as keys (training's blocks; HQLT's paper window is 64).

Its PyTorch twin and specification is `local_attention.local_attention_reference` (same semantics: the last
`window` tokens of the query's own document, told apart by positions; `chunked` for Delayed-Chunk).
Why a kernel of our own: at W = 64 the layer moves ≈ 0.8 GB forward + backward (340M layer, 16 × 2048
tokens), ≈ 0.25 ms of an H100's bandwidth, where FlexAttention took 0.66 ms (its 128-token tiles do twice
the masked work, and 64-token tiles do not compile on Hopper with torch 2.11), fla's sliding-window kernel
1.34 ms and the blocked SDPA path more (bench/NOTES.md, HQLT entries).

Queries and keys go in blocks of 64 tokens: block j's queries see keys of blocks j − 1 and j only. Each
kernel takes one [64, 128] tile: the forward and the dq kernel a query block against its two key blocks, the
dk/dv kernel a key block against its two query blocks (the dq kernel also writes delta = rowsum(o · do) for
it). Softmax in base 2, statistics in float32; nothing is saved but q, k, v, o and one statistic per query.
At the 340M layer's size on an H100, in training's profile: forward < 0.15 ms, dq 0.19, dk/dv 0.20 (one
backward program per block for dq, dk and dv together, sharing the diagonal pair's probabilities, took 0.74:
three [64, D] float32 accumulators at once); FlexAttention 0.19 forward and 0.47 backward.
`scale` is a compile-time constant: under torch.compile a Python float argument reaches the kernel typed
fp64, which made every score operation fp64 (2× slower, eighteenth GPU session).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lmlab.kernels.recurrent_common import triton_source_tag

_SOURCE_TAG = triton_source_tag(__file__)
BLOCK = 64  # tokens per query/key block, hence the largest window this kernel takes
NUM_WARPS = 4  # each kernel; 8 made the forward slower on an H100 (0.25 against 0.15 ms at the 340M layer)


@triton.jit
def _allowed(t, s, pos_t, pos_s, valid, W: tl.constexpr, CHUNKED: tl.constexpr):
    """Query index t sees key index s (the spec's test); arguments broadcast to the tile ([n, 1] and [1, m])."""
    dist = t - s
    ok = valid & (dist >= 0) & (dist < W) & ((pos_t - pos_s) == dist)
    if CHUNKED:
        ok = ok & ((pos_t // W) == (pos_s // W))
    return ok


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: exact products, as the PyTorch path (no TF32)
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fwd_kernel(q, k, v, q_pos, k_pos, o, lse, T, q_pos_stride, k_pos_stride, scale: tl.constexpr,
                H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, CHUNKED: tl.constexpr, IEEE: tl.constexpr,
                BLOCK: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t = i_m * BLOCK + tl.arange(0, BLOCK)  # queries
    s = i_m * BLOCK - BLOCK + tl.arange(0, 2 * BLOCK)  # keys: the block before and the queries' own
    d = tl.arange(0, D)
    base = i_b.to(tl.int64) * T * H * D + i_h * D
    m_t, m_s = t < T, (s >= 0) & (s < T)
    b_q = tl.load(q + base + t[:, None] * (H * D) + d[None, :], mask=m_t[:, None], other=0)
    b_k = tl.load(k + base + s[:, None] * (H * D) + d[None, :], mask=m_s[:, None], other=0)
    b_v = tl.load(v + base + s[:, None] * (H * D) + d[None, :], mask=m_s[:, None], other=0)
    pos_t = tl.load(q_pos + i_b * q_pos_stride + t, mask=m_t, other=0)
    pos_s = tl.load(k_pos + i_b * k_pos_stride + s, mask=m_s, other=0)
    ok = _allowed(t[:, None], s[None, :], pos_t[:, None], pos_s[None, :], m_t[:, None] & m_s[None, :], W, CHUNKED)
    # scores in base 2 (times log2(e)): exp2 is the hardware's exponential
    scores = tl.where(ok, _dot(b_q, tl.trans(b_k), IEEE) * (scale * 1.4426950408889634), float("-inf"))
    row_max = tl.maximum(tl.max(scores, 1), -1e30)  # rows past T see nothing: keep them finite
    p = tl.exp2(scores - row_max[:, None])
    row_sum = tl.maximum(tl.sum(p, 1), 1e-30)
    out = _dot(p.to(b_v.dtype), b_v, IEEE) / row_sum[:, None]
    tl.store(o + base + t[:, None] * (H * D) + d[None, :], out.to(o.dtype.element_ty), mask=m_t[:, None])
    tl.store(lse + i_bh.to(tl.int64) * T + t, row_max + tl.log2(row_sum), mask=m_t)


@triton.jit
def _bwd_dq_kernel(q, k, v, o, do, lse, q_pos, k_pos, dq, delta, T, q_pos_stride, k_pos_stride,
                   scale: tl.constexpr, H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, CHUNKED: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK: tl.constexpr):
    """dq of a block of queries from the [64, 128] tile of keys they see; writes delta = rowsum(o · do), which
    the dk/dv kernel reads."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t = i_m * BLOCK + tl.arange(0, BLOCK)
    s = i_m * BLOCK - BLOCK + tl.arange(0, 2 * BLOCK)
    d = tl.arange(0, D)
    base = i_b.to(tl.int64) * T * H * D + i_h * D
    m_t, m_s = t < T, (s >= 0) & (s < T)
    o_t, o_s = base + t[:, None] * (H * D) + d[None, :], base + s[:, None] * (H * D) + d[None, :]
    b_q = tl.load(q + o_t, mask=m_t[:, None], other=0)
    b_do = tl.load(do + o_t, mask=m_t[:, None], other=0)
    b_delta = tl.sum(tl.load(o + o_t, mask=m_t[:, None], other=0).to(tl.float32) * b_do.to(tl.float32), 1)
    b_lse = tl.load(lse + i_bh.to(tl.int64) * T + t, mask=m_t, other=0)
    b_k = tl.load(k + o_s, mask=m_s[:, None], other=0)
    b_v = tl.load(v + o_s, mask=m_s[:, None], other=0)
    pos_t = tl.load(q_pos + i_b * q_pos_stride + t, mask=m_t, other=0)
    pos_s = tl.load(k_pos + i_b * k_pos_stride + s, mask=m_s, other=0)
    ok = _allowed(t[:, None], s[None, :], pos_t[:, None], pos_s[None, :], m_t[:, None] & m_s[None, :], W, CHUNKED)
    scores = _dot(b_q, tl.trans(b_k), IEEE) * (scale * 1.4426950408889634)
    p = tl.where(ok, tl.exp2(scores - b_lse[:, None]), 0.0)
    ds = p * (_dot(b_do, tl.trans(b_v), IEEE) - b_delta[:, None])
    b_dq = _dot(ds.to(b_k.dtype), b_k, IEEE) * scale
    tl.store(dq + o_t, b_dq.to(dq.dtype.element_ty), mask=m_t[:, None])
    tl.store(delta + i_bh.to(tl.int64) * T + t, b_delta, mask=m_t)


@triton.jit
def _bwd_dkv_kernel(q, k, v, do, lse, delta, q_pos, k_pos, dk, dv, T, q_pos_stride, k_pos_stride,
                    scale: tl.constexpr, H: tl.constexpr, D: tl.constexpr, W: tl.constexpr, CHUNKED: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK: tl.constexpr):
    """dk and dv of a block of keys from the [64, 128] tile of queries that see them (theirs and the next)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    s = i_m * BLOCK + tl.arange(0, BLOCK)
    t = i_m * BLOCK + tl.arange(0, 2 * BLOCK)
    d = tl.arange(0, D)
    base = i_b.to(tl.int64) * T * H * D + i_h * D
    m_s, m_t = s < T, t < T
    o_s, o_t = base + s[:, None] * (H * D) + d[None, :], base + t[:, None] * (H * D) + d[None, :]
    b_k = tl.load(k + o_s, mask=m_s[:, None], other=0)
    b_v = tl.load(v + o_s, mask=m_s[:, None], other=0)
    b_q = tl.load(q + o_t, mask=m_t[:, None], other=0)
    b_do = tl.load(do + o_t, mask=m_t[:, None], other=0)
    b_lse = tl.load(lse + i_bh.to(tl.int64) * T + t, mask=m_t, other=0)
    b_delta = tl.load(delta + i_bh.to(tl.int64) * T + t, mask=m_t, other=0)
    pos_s = tl.load(k_pos + i_b * k_pos_stride + s, mask=m_s, other=0)
    pos_t = tl.load(q_pos + i_b * q_pos_stride + t, mask=m_t, other=0)
    # transposed tiles: [keys, queries]
    ok = _allowed(t[None, :], s[:, None], pos_t[None, :], pos_s[:, None], m_s[:, None] & m_t[None, :], W, CHUNKED)
    scores = _dot(b_k, tl.trans(b_q), IEEE) * (scale * 1.4426950408889634)
    p = tl.where(ok, tl.exp2(scores - b_lse[None, :]), 0.0)
    b_dv = _dot(p.to(b_do.dtype), b_do, IEEE)
    ds = p * (_dot(b_v, tl.trans(b_do), IEEE) - b_delta[None, :])
    b_dk = _dot(ds.to(b_q.dtype), b_q, IEEE) * scale
    tl.store(dk + o_s, b_dk.to(dk.dtype.element_ty), mask=m_s[:, None])
    tl.store(dv + o_s, b_dv.to(dv.dtype.element_ty), mask=m_s[:, None])


def _launch_sizes(q: torch.Tensor, window: int, chunked: bool, scale: float) -> dict:
    """The kernels' compile-time arguments."""
    H, D = q.shape[2:]
    return dict(scale=scale, H=H, D=D, W=window, CHUNKED=chunked, IEEE=q.dtype == torch.float32, BLOCK=BLOCK)


@triton_op(f"lmlab::local_attention_fwd_{_SOURCE_TAG}", mutates_args={})
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                   k_positions: torch.Tensor, window: int, chunked: bool, scale: float,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B,T,H,D] in q's dtype, base-2 log-sum-exp of the scaled scores [B,H,T] float32, kept for backward)."""
    B, T, H, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    wrap_triton(_fwd_kernel)[(triton.cdiv(T, BLOCK), B * H)](
        q, k, v, q_positions, k_positions, o, lse, T, q_positions.stride(0), k_positions.stride(0),
        **_launch_sizes(q, window, chunked, scale), num_warps=NUM_WARPS)
    return o, lse


@triton_op(f"lmlab::local_attention_bwd_{_SOURCE_TAG}", mutates_args={})
def _attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                   do: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor, window: int,
                   chunked: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, H, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    grid, sizes = (triton.cdiv(T, BLOCK), B * H), _launch_sizes(q, window, chunked, scale)
    wrap_triton(_bwd_dq_kernel)[grid](q, k, v, o, do, lse, q_positions, k_positions, dq, delta, T,
                                      q_positions.stride(0), k_positions.stride(0), **sizes, num_warps=NUM_WARPS)
    wrap_triton(_bwd_dkv_kernel)[grid](q, k, v, do, lse, delta, q_positions, k_positions, dk, dv, T,
                                       q_positions.stride(0), k_positions.stride(0), **sizes, num_warps=NUM_WARPS)
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, q_positions, k_positions, window, chunked, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], q_positions, k_positions)
    ctx.settings = window, chunked, scale
    ctx.set_materialize_grads(False)


def _backward(ctx, do, _):
    q, k, v, o, lse, q_positions, k_positions = ctx.saved_tensors
    if do is None:
        return (None,) * 8
    dq, dk, dv = _attention_bwd(q, k, v, o, lse, do.contiguous(), q_positions, k_positions, *ctx.settings)
    return dq, dk, dv, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_unfit_reason(q: torch.Tensor, k: torch.Tensor, window: int) -> str | None:
    """Why this kernel cannot take these inputs (sizes only), or None."""
    D = q.shape[-1]
    if window > BLOCK:
        return f"window {window} > {BLOCK}"
    if q.shape[1] != k.shape[1]:
        return "fewer queries than keys (decoding)"
    if D < 16 or D > 128 or D & (D - 1):
        return f"head size {D} is not a power of two in 16..128"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}"
    return None


def local_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                           k_positions: torch.Tensor, *, window: int, chunked: bool = False,
                           scale: float | None = None) -> torch.Tensor:
    """Local attention `[B, T, H, D]` (q, k, v of one shape, `triton_unfit_reason` None); positions
    `[B or 1, T]`, broadcast over the batch by a zero stride."""
    B, T = q.shape[:2]
    q, k, v = (x.contiguous() for x in (q, k, v))
    q_positions, k_positions = (p.to(torch.int32).expand(B, T) for p in (q_positions, k_positions))
    q_positions, k_positions = (p if p.stride(1) == 1 else p.contiguous() for p in (q_positions, k_positions))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_fwd(q, k, v, q_positions, k_positions, window, chunked, scale)[0]
