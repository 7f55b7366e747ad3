"""Packed documents (`cu_seqlens`, as in fla and flash-attn): the per-token lookups the kernels and the
models share."""
from __future__ import annotations

import torch


def document_index(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The index of the document holding each packed token position (N_docs past the last document).

    Searches the whole `cu_seqlens` as given (its first entry is 0, so each position counts it once): torch
    2.11's inductor lowers searchsorted wrongly on CUDA for boundaries that are not a whole graph input,
    measured on an H200: a slice such as `cu_seqlens[1:]` is read from its storage's start (every index off
    by one, silently), and boundaries computed in the graph (a cast, an arange) fail to compile
    ("NotImplementedError: SliceView"). Later versions handle both.
    """
    return torch.searchsorted(cu_seqlens, positions.to(cu_seqlens.dtype), right=True) - 1


def document_positions(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(document index, position inside that document) of each packed token position."""
    doc = document_index(cu_seqlens, positions)
    return doc, positions - cu_seqlens[doc]
