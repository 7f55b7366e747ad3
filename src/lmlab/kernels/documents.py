"""Packed documents (`cu_seqlens`, as in fla and flash-attn): the per-token lookups the kernels and the
models share."""
from __future__ import annotations

import torch


def document_index(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The index of the document holding each packed token position (N_docs past the last document).

    The lookup runs on `cu_seqlens` exactly as given, sliced but never cast: torch 2.11's inductor cannot
    lower searchsorted over boundaries computed inside the compiled graph, a cast or an arange included
    (CUDA: "NotImplementedError: SliceView", measured on an H200; later versions realize them first).
    """
    return torch.searchsorted(cu_seqlens[1:], positions.to(cu_seqlens.dtype), right=True)
