"""Mamba's selective scan (Gu & Dao, arXiv 2312.00752), as fla 0.6.0's Mamba layer computes it.

Per sequence, each of D channels keeps a state h ∈ R^N (S4D: a diagonal A [D, N], A < 0), with an
input-dependent step Δ_t [D] and input-dependent B_t, C_t [N] shared by the channels:
    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) B_tᵀ          [D, N]
    y_t = h_t C_t                                          [D]
(the layer adds D ⊙ u_t and the gate itself). States are [N_seq, D, N] float32, fla's `recurrent_state`.

Why lmlab has its own: the library kernels are mamba-ssm's CUDA ones (not installed on lmlab's GPU image,
and none for CPU); fla and transformers fall back to a PyTorch loop that keeps exp(Δ A), Δ B u and every
state, [B, T, D, N] each, for backward (340M at 8 x 2048 tokens: 2.1 GB per tensor and layer, out of memory
on an 80 GB card).

Implementations: `selective_scan_recurrent_torch` (the specification, step by step; also decoding's path),
`selective_scan_triton` (CUDA's path for every call of more than one token: `selective_scan_triton.py`) and
`selective_scan_chunk_torch`: the sequence in chunks, each a log-depth (Hillis-Steele) scan in which
only ever-smaller decays are multiplied (never exp of a positive number: stable for any Δ), the state
carried from chunk to chunk. Each chunk runs under activation checkpointing, so backward keeps only the
chunk start states ([N_chunks, D, N] per sequence) and recomputes one chunk at a time: memory stays at a
few chunks' [B, C, D, N] whatever the length. Shapes depend only on the input's sizes (cu_seqlens is read
on the device): torch.compile captures one graph for every document layout.

Packed documents (`cu_seqlens`, the [B, T] rows as one stream): nothing decays into a token from before
its document's start, and a document with an initial state starts from it (its first token's update
reads it instead of the carried state).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.kernels import dispatch
from lmlab.kernels.documents import document_positions
from lmlab.kernels.recurrent_common import (
    document_starts,
    keep_initial_if_empty,
    recompute_in_backward,
    triton_health_check,
    use_recurrent,
)
from lmlab.kernels.selective_scan_triton import selective_scan_triton

OP = "selective_scan"
CHUNK_SIZE = 64


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan on u, Δ [B,T,D] (Δ > 0), A [D,N], B, C [B,T,N]; returns (y [B,T,D] in u's dtype,
    final states [N_seq,D,N] float32 or None). With `cu_seqlens` the rows are one packed stream; states are
    per document."""
    _check_inputs(u, delta, A, B, C, initial_state, cu_seqlens)
    rows = u.shape[:2]
    if cu_seqlens is not None:
        u, delta, B, C = (x.flatten(0, 1)[None] for x in (u, delta, B, C))
    name = dispatch.choose(OP, u, backend)
    # Decoding steps and short prompts without gradients run the step-by-step twin, except that on Triton only
    # single steps do: a few-token call from a state (evaluation's continuations of a shared context) would
    # cost a Python loop of T steps a layer there.
    if use_recurrent(u, delta, A, B, C, initial_state) and (name != "triton" or u.shape[1] == 1):
        kernel = selective_scan_recurrent_torch
    elif name == "triton":
        kernel = selective_scan_triton
    else:
        kernel = selective_scan_chunk_torch
    y, final_state = kernel(u, delta, A, B, C, initial_state=initial_state, output_final_state=output_final_state,
                            cu_seqlens=cu_seqlens)
    return y.reshape(*rows, -1), final_state


def selective_scan_recurrent_torch(
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
    """Step by step, float32 (the specification; the module docstring's equations)."""
    Bsz, T, D = u.shape
    dtype = u.dtype
    with torch.autocast(u.device.type, enabled=False):
        A, u, delta, B, C = (x.float() for x in (A, u, delta, B, C))
        initial = None if initial_state is None else initial_state.float()
        h = u.new_zeros(Bsz, D, A.shape[1]) if initial is None or cu_seqlens is not None else initial
        if cu_seqlens is not None:
            doc, begins = document_starts(cu_seqlens, T)
        outputs, states = [], []
        for t in range(T):
            if cu_seqlens is not None:  # a document starts here: its initial state (or zeros) replaces h
                h = torch.where(begins[t], 0 if initial is None else initial[doc[t:t + 1]], h)
            h = (delta[:, t, :, None] * A).exp() * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
            outputs.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
            if cu_seqlens is not None and output_final_state:
                states.append(h)
        y = torch.stack(outputs, dim=1) if outputs else u.new_zeros(Bsz, 0, D)
        if cu_seqlens is not None and output_final_state:  # each document's state after its last token
            ends = (cu_seqlens[1:].long() - 1).clamp_min(0)
            h = keep_initial_if_empty(torch.stack(states or [h])[ends, 0], cu_seqlens, initial)
    return y.to(dtype), (h if output_final_state else None)


def selective_scan_chunk_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk by chunk, a log-depth scan inside each, float32 (module docstring)."""
    Bsz, T, D = u.shape
    dtype = u.dtype
    with torch.autocast(u.device.type, enabled=False):
        # the chunks cast their own slices to float32: backward keeps the inputs as they came (bf16 in training)
        A = A.float()
        initial = None if initial_state is None else initial_state.float()
        h = initial if initial is not None and cu_seqlens is None else A.new_zeros(Bsz, D, A.shape[1])
        if cu_seqlens is not None:
            doc, offset = document_positions(cu_seqlens, torch.arange(T, device=u.device))
            starts = (offset == 0)[None]
            ends = cu_seqlens[1:].long() - 1  # each document's last token (the one before it, if empty)
            final = h.new_zeros(len(cu_seqlens) - 1, D, A.shape[1]) if output_final_state else None
        outputs = []
        for first in range(0, T, chunk_size):
            chunk = slice(first, min(first + chunk_size, T))
            packed = () if cu_seqlens is None else (starts[:, chunk], initial, doc[chunk])
            y, h_all = recompute_in_backward(_scan_chunk, h, u[:, chunk], delta[:, chunk], A, B[:, chunk],
                                             C[:, chunk], *packed)
            outputs.append(y)
            h = h_all[:, -1].clone()  # not a view: the chunk's states must not stay alive for backward
            if cu_seqlens is not None and output_final_state:  # the documents that end in this chunk
                here = ((ends >= first) & (ends < chunk.stop))[:, None, None]
                final = torch.where(here, h_all[0].index_select(0, (ends - first).clamp(0, h_all.shape[1] - 1)),
                                    final)
        y = torch.cat(outputs, dim=1) if outputs else A.new_zeros(Bsz, 0, D)
        if cu_seqlens is not None and output_final_state:
            h = keep_initial_if_empty(final, cu_seqlens, initial)
    return y.to(dtype), (h if output_final_state else None)


def _scan_chunk(
    h: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    starts: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
    doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk from the state h [S,D,N] before it: y [S,c,D] and the state after every token [S,c,D,N].

    Packed documents: `starts` [1,c] marks document starts, `doc` [c] each token's document, `initial`
    [N_docs,D,N] their initial states (or None). Hillis-Steele: after the round of offset s, x_t holds
    Σ exp(A Σ_{(j,t]} Δ) ⊙ Δ_j u_j B_j over the 2s tokens j <= t before it (its own document's), and
    R_t = Σ Δ over those tokens, so the decay from the next block of tokens to t is exp(A R_t) <= 1."""
    c = u.shape[1]
    u, delta, B, C = (t.float() for t in (u, delta, B, C))
    x = (delta * u)[..., None] * B[:, :, None, :]  # [S,c,D,N]
    segment = None
    if starts is not None:
        segment = starts.cumsum(1)  # documents begun in the chunk up to each token: 0 reads the carried state
        if initial is not None:  # a document's first token reads its initial state
            begin = (delta[..., None] * A).exp() * initial[doc.clamp_max(len(initial) - 1)]
            x = x + torch.where(starts[..., None, None], begin, 0)
    R = delta
    s = 1
    while s < c:
        decay = (R[:, s:, :, None] * A).exp()
        if segment is not None:  # nothing decays in across a document start
            decay = torch.where((segment[:, s:] == segment[:, :-s])[..., None, None], decay, 0)
        x = x + F.pad(decay * x[:, :-s], (0, 0, 0, 0, s, 0))
        R = R + F.pad(R[:, :-s], (0, 0, s, 0))
        s *= 2
    carried = (R[..., None] * A).exp()  # R_t now sums Δ over the whole chunk up to t
    if segment is not None:
        carried = torch.where((segment == 0)[..., None, None], carried, 0)
    h_all = x + carried * h[:, None]
    return torch.einsum("scdn,scn->scd", h_all, C), h_all


def _check_inputs(u, delta, A, B, C, initial_state, cu_seqlens) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"expected u and delta [B,T,D]; got {tuple(u.shape)}, {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[2]:
        raise ValueError(f"expected A [D,N] with D = {u.shape[2]}; got {tuple(A.shape)}")
    if B.shape != C.shape or B.shape != (*u.shape[:2], A.shape[1]):
        raise ValueError(f"expected B and C [B,T,N] = {(*u.shape[:2], A.shape[1])}; got {tuple(B.shape)}, "
                         f"{tuple(C.shape)}")
    sequences = u.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (sequences, *A.shape):
        raise ValueError(f"expected an initial state [{sequences},{A.shape[0]},{A.shape[1]}]; got "
                         f"{tuple(initial_state.shape)}")


dispatch.register_health_check(OP, triton_health_check, backend="triton")
