"""lmlab's Triton short convolution for CUDA: the training path of `conv.short_conv` (no initial state).

Its PyTorch twin and specification is `conv._conv_packed`. Why a kernel of our own: inductor's kernels for the
PyTorch version ran several times below the H200's memory bandwidth (gated_deltanet_340M: ≈ 280 ms of a
1.62 s step, bench/NOTES.md step 8), and fla's kernel costs ≈ 1 ms of Python per call forward + backward
and splits the compiled graph. Registered with `torch.library.triton_op`, so torch.compile keeps it inside
the block's graph and launches it from the compiled code, without Python wrappers.

Tokens are flattened to `[T, D]` (rows one after the other); `positions[t]` is token t's position inside its
document (its row without packed documents), so a tap reading `lag` tokens back is used only where
`positions[t] >= lag`. Backward keeps only x (as fla's kernel): it recomputes the pre-activation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lmlab.kernels.recurrent_common import triton_source_tag

_SOURCE_TAG = triton_source_tag(__file__)
# (tokens, channels) per program of each kernel, the fastest of 24 (tokens 32-256, channels 32-128, 4 or 8
# warps) on an H200 at 16 x 2048 tokens, D 1024-3072 (bench/NOTES.md, step 11). The gradient pass writes one
# weight-gradient partial sum per block of its tokens: taller blocks mean fewer column sums per token.
FWD_BLOCKS = (32, 128)
GATE_BLOCKS = (128, 64)
INPUT_BLOCKS = (32, 128)
NUM_WARPS = 4


@triton.jit
def _preactivation(x, weight, bias, o_t, o_d, pos, m_t, m_d, stride_x, W: tl.constexpr, BT: tl.constexpr,
                   BD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """bias + sum over taps of weight[:, W-1-lag] * x[t - lag], taps masked to the token's document."""
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + o_d, mask=m_d, other=0).to(tl.float32)[None, :]
    for lag in tl.static_range(W):
        tap = tl.load(weight + o_d * W + (W - 1 - lag), mask=m_d, other=0).to(tl.float32)
        m = (m_t & (pos >= lag))[:, None] & m_d[None, :]
        x_lag = tl.load(x + (o_t - lag)[:, None] * stride_x + o_d[None, :], mask=m, other=0).to(tl.float32)
        acc += x_lag * tap[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(x, weight, bias, positions, y, T, D, stride_x, W: tl.constexpr, BT: tl.constexpr,
                     BD: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    o_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_t, m_d = o_t < T, o_d < D
    pos = tl.load(positions + o_t, mask=m_t, other=0)
    acc = _preactivation(x, weight, bias, o_t, o_d, pos, m_t, m_d, stride_x, W, BT, BD, HAS_BIAS)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + o_t[:, None] * D + o_d[None, :], acc.to(y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def _conv_bwd_gate_kernel(x, weight, bias, positions, dy, g, dw_blocks, db_blocks, T, D, stride_x, stride_dy,
                          W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
                          SILU: tl.constexpr):
    """g = dy * act'(pre-activation), recomputed from x, and this block's partial sums of the weight and bias
    gradients (sums of g times the inputs each tap read)."""
    i_t = tl.program_id(0)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_t, m_d = o_t < T, o_d < D
    pos = tl.load(positions + o_t, mask=m_t, other=0)
    b_g = tl.load(dy + o_t[:, None] * stride_dy + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                  other=0).to(tl.float32)
    if SILU:
        z = _preactivation(x, weight, bias, o_t, o_d, pos, m_t, m_d, stride_x, W, BT, BD, HAS_BIAS)
        sig = tl.sigmoid(z)
        b_g = b_g * sig * (1 + z * (1 - sig))
    tl.store(g + o_t[:, None] * D + o_d[None, :], b_g.to(g.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
    if HAS_BIAS:
        tl.store(db_blocks + i_t * D + o_d, tl.sum(b_g, 0), mask=m_d)
    for lag in tl.static_range(W):
        m = (m_t & (pos >= lag))[:, None] & m_d[None, :]
        x_lag = tl.load(x + (o_t - lag)[:, None] * stride_x + o_d[None, :], mask=m, other=0).to(tl.float32)
        tl.store(dw_blocks + (i_t * D + o_d) * W + (W - 1 - lag), tl.sum(b_g * x_lag, 0), mask=m_d)


@triton.jit
def _conv_bwd_input_kernel(g, weight, positions, dx, T, D, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dx[t] = sum over lags of weight[:, W-1-lag] * g[t + lag], where token t + lag's tap reached back into
    t's document."""
    o_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_t, m_d = o_t < T, o_d < D
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for lag in tl.static_range(W):
        o_s = o_t + lag
        m_s = (o_s < T) & (tl.load(positions + o_s, mask=o_s < T, other=0) >= lag)
        tap = tl.load(weight + o_d * W + (W - 1 - lag), mask=m_d, other=0).to(tl.float32)
        g_s = tl.load(g + o_s[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0)
        acc += g_s.to(tl.float32) * tap[None, :]
    tl.store(dx + o_t[:, None] * D + o_d[None, :], acc.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


def _grid(T: int, D: int, blocks: tuple[int, int]) -> tuple[int, int]:
    return triton.cdiv(T, blocks[0]), triton.cdiv(D, blocks[1])


@triton_op(f"lmlab::short_conv_fwd_{_SOURCE_TAG}", mutates_args={})
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
              silu: bool) -> torch.Tensor:
    T, D = x.shape
    y = torch.empty((T, D), dtype=x.dtype, device=x.device)
    wrap_triton(_conv_fwd_kernel)[_grid(T, D, FWD_BLOCKS)](
        x, weight, weight if bias is None else bias, positions, y, T, D, x.stride(0), W=weight.shape[1],
        BT=FWD_BLOCKS[0], BD=FWD_BLOCKS[1], HAS_BIAS=bias is not None, SILU=silu, num_warps=NUM_WARPS)
    return y


@triton_op(f"lmlab::short_conv_bwd_{_SOURCE_TAG}", mutates_args={})
def _conv_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
              silu: bool, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Two passes: the gradient at each output first (its pre-activation recomputed once per token), then
    # dx from W shifted reads of it. (One pass recomputing the pre-activation at every shift ran ≈ 6x the
    # forward's time on an H200.) g is kept in x's dtype, as fla's backward keeps the pre-activation.
    T, D = x.shape
    W = weight.shape[1]
    blocks = triton.cdiv(T, GATE_BLOCKS[0])
    g = torch.empty((T, D), dtype=x.dtype, device=x.device)
    # Partial sums per token block, then one sum over blocks: deterministic, unlike atomic adds.
    dw_blocks = torch.empty((blocks, D, W), dtype=torch.float32, device=x.device)
    db_blocks = torch.empty((blocks, D), dtype=torch.float32, device=x.device)
    wrap_triton(_conv_bwd_gate_kernel)[_grid(T, D, GATE_BLOCKS)](
        x, weight, weight if bias is None else bias, positions, dy, g, dw_blocks, db_blocks, T, D, x.stride(0),
        dy.stride(0), W=W, BT=GATE_BLOCKS[0], BD=GATE_BLOCKS[1], HAS_BIAS=bias is not None, SILU=silu,
        num_warps=NUM_WARPS)
    dx = torch.empty((T, D), dtype=x.dtype, device=x.device)
    wrap_triton(_conv_bwd_input_kernel)[_grid(T, D, INPUT_BLOCKS)](
        g, weight, positions, dx, T, D, W=W, BT=INPUT_BLOCKS[0], BD=INPUT_BLOCKS[1], num_warps=NUM_WARPS)
    return dx, dw_blocks.sum(0).to(weight.dtype), db_blocks.sum(0)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, positions, silu = inputs
    ctx.save_for_backward(x, weight, bias, positions)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias, positions = ctx.saved_tensors
    dx, dw, db = _conv_bwd(x, weight, bias, positions, ctx.silu, dy if dy.stride(1) == 1 else dy.contiguous())
    return dx, dw, None if bias is None else db.to(bias.dtype), None, None


_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


def short_conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                      activation: str | None) -> torch.Tensor:
    """act(causal depthwise conv) of x `[T, D]` (channels contiguous) with weight `[D, W]`, each tap kept
    inside its token's document (`positions`: int32 `[T]`, position inside the document)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    return _conv_fwd(x, weight.contiguous(), bias, positions, activation is not None)
