"""Causal depthwise short convolution (fla's ShortConvolution), with decoding state and packed documents.

Layouts follow fla 0.6.0 so caches are interchangeable: weight `[D, 1, W]` (nn.Conv1d depthwise), state
`[N, D, W]` holding the last W inputs, oldest first (fla's update kernel shifts the state left by one
and writes the new input at index W-1, then convolves the whole state with the weight).

The PyTorch version (the specification) is a sum of W shifted copies of the input, masked at sequence
starts; it computes in float32 and returns x's dtype, as fla's. On CUDA, "auto" runs lmlab's Triton kernel
(`conv_triton`) for convolutions from zeros (training, prompt processing), and fla's kernel in eager code
for the ones continuing from a state (decoding); inside compiled code fla's kernel would split the graph
and cost its Python overhead on every call, so convolutions from a state run the PyTorch version there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.kernels import dispatch
from lmlab.kernels.conv_triton import short_conv_triton
from lmlab.kernels.documents import document_positions
from lmlab.kernels.recurrent_common import recompute_in_backward, triton_health_check

_ACTIVATIONS = (None, "silu", "swish")


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y[t] = act(bias + sum_i weight[:, 0, i] * x[t - W + 1 + i]) per channel; x `[B, T, D]`.

    Inputs before the start of a sequence (or document, with `cu_seqlens`: packed documents over the B*T
    tokens of the B rows one after the other) come from `initial_state` (`[N, D, W]`, N = B or the number
    of documents), zeros without it. Returns (y, final_state or None).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; choose one of {_ACTIVATIONS}")
    rows = x.shape
    if cu_seqlens is not None:
        x = x.flatten(0, 1)[None]
    name = dispatch.choose("short_conv" if initial_state is None else "short_conv_from_state", x, backend)
    if name == "triton":
        tokens = x.flatten(0, 1)
        _, positions = _token_positions(tokens.shape[0], rows[1], cu_seqlens, x.device)
        y = short_conv_triton(tokens, weight.squeeze(1), bias, positions.to(torch.int32), activation)
        final_state = _final_states(tokens, weight.shape[-1], None, cu_seqlens, rows[1]) if output_final_state else None
        return y.reshape(rows), final_state
    if name == "fla":
        from fla.modules.causal_conv1d import causal_conv1d
        y, final_state = causal_conv1d(x, weight.squeeze(1), bias, initial_state=initial_state,
                                       output_final_state=output_final_state, activation=activation,
                                       cu_seqlens=cu_seqlens)
        return y.reshape(rows), final_state
    # Backward keeps only the inputs and recomputes the sums, as fla's kernel does: keeping the float32 sums
    # for the activation's backward took twice x's bytes per convolution (gated_deltanet_340M at 16 x 2048
    # tokens: 81 GiB peak instead of 64, measured on an H200); recomputing them is a few element-wise passes.
    y, final_state = recompute_in_backward(_conv_packed, x.flatten(0, 1), weight, bias, initial_state,
                                           output_final_state, cu_seqlens, rows[1], activation)
    return y.reshape(rows), final_state


def _conv_packed(x, weight, bias, initial_state, output_final_state, cu_seqlens, row_length, activation):
    """act(sum of W shifted copies of x [T, D]) in x's dtype, each tap masked to stay inside its token's
    document (each row of `row_length` tokens is one document without `cu_seqlens`)."""
    T, D = x.shape
    W = weight.shape[-1]
    doc, offset = _token_positions(T, row_length, cu_seqlens, x.device)
    y = x.new_zeros(T, D, dtype=torch.float32) if bias is None else bias.float().expand(T, D)
    for lag in range(W):  # tap with weight index W-1-lag reads the input `lag` steps back
        shifted = F.pad(x, (0, 0, lag, 0))[:T]
        inside = (offset >= lag)[:, None]
        if initial_state is None:
            source = torch.where(inside, shifted, 0)
        else:
            # Before the document start, read the state: position -j of a document is state index W-j.
            state_idx = (offset - lag + W).clamp(0, W - 1)
            source = torch.where(inside, shifted, initial_state[doc, :, state_idx].to(x.dtype))
        y = y + source.float() * weight[:, 0, W - 1 - lag].float()
    final_state = _final_states(x, W, initial_state, cu_seqlens, row_length) if output_final_state else None
    return (y if activation is None else F.silu(y)).to(x.dtype), final_state


def _token_positions(T, row_length, cu_seqlens, device):
    """(document index, position inside the document) of each of the T packed tokens; without `cu_seqlens`
    each row of `row_length` tokens is one document."""
    pos = torch.arange(T, device=device)
    if cu_seqlens is None:
        return pos // row_length, pos % row_length
    return document_positions(cu_seqlens, pos)


def _final_states(x, W, initial_state, cu_seqlens, row_length):
    """The last W inputs of each document of x `[T, D]`, completed from its initial state (or zeros) when
    shorter."""
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, x.shape[0] + 1, row_length, device=x.device)
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    rel = (ends - starts)[:, None] - W + torch.arange(W, device=x.device)  # [N, W] position in document
    tokens = x[(starts[:, None] + rel).clamp(min=0)]  # [N, W, D]
    if initial_state is None:
        before = torch.zeros_like(tokens)
    else:
        idx = (rel + W).clamp(0, W - 1)  # [N, W]
        idx = idx[:, None, :].expand(-1, x.shape[1], -1)
        before = initial_state.to(x.dtype).gather(-1, idx).transpose(1, 2)
    return torch.where((rel >= 0)[..., None], tokens, before).transpose(1, 2).contiguous()


def _fla_conv_unavailable(x: torch.Tensor) -> str | None:
    if not x.is_cuda:
        return "input is not on a CUDA device"
    return dispatch.fla_unavailable_reason()


dispatch.register_health_check("short_conv", triton_health_check, backend="triton")
dispatch.register_health_check("short_conv", _fla_conv_unavailable, eager_only=True)
dispatch.register_health_check("short_conv_from_state", _fla_conv_unavailable, eager_only=True)
