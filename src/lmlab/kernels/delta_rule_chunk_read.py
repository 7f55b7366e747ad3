"""The delta rule read at chunk starts: the fast-weight memory of Delayed-Chunk HQLT.

The state S ∈ R^{K×V} follows the delta rule (`lmlab.kernels.delta_rule`),
    S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ,
but token t reads it as it was when t's chunk began, with no intra-chunk term:
    o_t = R_tᵀ (scale · q_t),   R_t = S after all tokens before b(t) = t − (pos(t) mod W).
Chunks are W positions aligned to the token positions (position p is in chunk p // W); positions count a
document's real tokens (left padding: 0; packed documents restart at 0) and continue across decoding calls,
so a call may begin inside a chunk: its first tokens read `initial_read_state`. The step-by-step
specification keeps the pair (S, R) and sets R := S at every position divisible by W.

Chunked form: on a fixed grid of C = W tokens, `recurrent_common.delta_chunk_states` gives the corrected
values U and each chunk's start state, and the state after token j of a chunk is start + Σ_{i<=j} k_i U_iᵀ.
As pos(t) mod W < C, b(t) lies in t's grid chunk n or in chunk n − 1, so all reads are one batched two-block
product: the queries of chunk n against the keys and U of chunks n − 1 and n (2C columns, masked to i in
b(t)'s chunk, i < b(t), same document), plus q_tᵀ times the start state of chunk n or n − 1, picked per token.

Backends: the two PyTorch kernels, and on CUDA fla's delta-rule kernels with a zero intra-chunk term where
W = 64 (fla's chunk size):
- `positions=None` and no states (training and full-sequence scoring): fla's grid is the chunk grid, with
  autograd (`fla_chunk.chunk_delta_rule_chunk_read`);
- otherwise (evaluation's cached calls: left-padded contexts and prompts, continuations from a decoding
  state), dense rows without gradients of more than one token: each row is laid on fla's grid so that a
  column's position modulo 64 is its token's (`delta_rule_chunk_read_fla_grid`). Single decoding steps keep
  the step-by-step kernel.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lmlab.kernels import dispatch
from lmlab.kernels.delta_rule import fla_delta_rule_health_check
from lmlab.kernels.documents import document_positions
from lmlab.kernels.recurrent_common import (
    Docs,
    State,
    call_kernel,
    causal_mask,
    delta_chunk_states,
    document_starts,
    first_state,
    from_chunks,
    needs_grad,
    to_chunks,
    use_recurrent,
)

OP = "delta_rule_chunk_read"
FLA_CHUNK_SIZE = 64

Result = tuple[torch.Tensor, State, State]  # (o, final state S, final read state R)


def delta_rule_chunk_read(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    positions: torch.Tensor | None,
    *,
    chunk_size: int,
    scale: float | None = None,
    initial_state: State = None,
    initial_read_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> Result:
    """Chunk-read delta rule on q, k [B,T,H,K], v [B,T,H,V], beta [B,T,H] and token positions [B or 1, T]
    (chunks of W = `chunk_size` positions; None: each row, or packed document, starts at position 0);
    states [B,H,K,V] float32. With `cu_seqlens` the rows are one packed stream and every document starts
    from zero states (no initial or final states)."""
    rows = q.shape[:2]
    if cu_seqlens is not None:  # one packed stream [1, B*T]
        q, k, v, beta = (x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v, beta))
    aligned = positions is None and initial_state is None and initial_read_state is None and not output_final_state
    unfit = _fla_unfit(q, k, v, beta, initial_state, initial_read_state, chunk_size, aligned, cu_seqlens)
    if dispatch.choose(OP, q, backend, unfit=unfit) == "fla":
        if aligned:
            from lmlab.kernels.fla_chunk import chunk_delta_rule_chunk_read

            o, _ = chunk_delta_rule_chunk_read(q, k, v, beta, scale=scale, cu_seqlens=cu_seqlens)
            return o.reshape(*rows, *o.shape[2:]), None, None
        return delta_rule_chunk_read_fla_grid(q, k, v, beta, positions, scale=scale, initial_state=initial_state,
                                              initial_read_state=initial_read_state,
                                              output_final_state=output_final_state)
    if positions is None:  # each row, or packed document, from position 0
        flat = torch.arange(rows[0] * rows[1], device=q.device)
        positions = (flat % rows[1] if cu_seqlens is None else document_positions(cu_seqlens, flat)[1]).view(rows)
    positions = positions.expand(rows).reshape(q.shape[:2])
    step_by_step = use_recurrent(q, k, v, beta, initial_state, initial_read_state)
    kernel = delta_rule_chunk_read_recurrent_torch if step_by_step else delta_rule_chunk_read_chunk_torch
    o, S, R = kernel(q, k, v, beta, positions, chunk_size=chunk_size, scale=scale, initial_state=initial_state,
                     initial_read_state=initial_read_state, output_final_state=output_final_state,
                     cu_seqlens=cu_seqlens)
    return o.reshape(*rows, *o.shape[2:]), S, R


def _fla_unfit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, initial_state: State,
               initial_read_state: State, chunk_size: int, aligned: bool,
               cu_seqlens: torch.Tensor | None) -> dict[str, str]:
    """`dispatch.choose`'s `unfit`: why fla's kernels do not cover this call, if they do not."""
    if chunk_size != FLA_CHUNK_SIZE:
        return {"fla": f"chunks of {chunk_size} tokens (fla's are {FLA_CHUNK_SIZE})"}
    if aligned:
        return {}
    if cu_seqlens is not None:
        return {"fla": "packed documents with positions"}
    if needs_grad(q, k, v, beta, initial_state, initial_read_state):
        return {"fla": "gradients with positions or states"}
    if q.shape[1] == 1:
        return {"fla": "a single decoding step (the step-by-step kernel's)"}
    return {}


def delta_rule_chunk_read_fla_grid(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    positions: torch.Tensor | None,
    *,
    scale: float | None = None,
    initial_state: State = None,
    initial_read_state: State = None,
    output_final_state: bool = False,
) -> Result:
    """The chunk-read delta rule (W = 64) on fla's kernels for dense rows with positions and states, without
    autograd. Positions rise by at most one a token (padding repeats a neighbour's); padding carries zero
    q, k, v and β, as the models give it.

    Row r is laid on a grid of T + 63 columns, token t at column positions[t] − positions[0] + positions[0]
    mod 64, so that fla's chunks of 64 columns are the chunks of positions; padding shares a real token's
    column and adds zeros to it. Tokens of the chunk the call begins in read `initial_read_state` when the
    call begins inside it (an earlier call began that chunk), which is the grid's first read; every later
    chunk reads the state at its start, as fla computes it."""
    from lmlab.kernels.fla_chunk import chunk_read_reads

    (B, T, H, K), C = q.shape, FLA_CHUNK_SIZE
    positions = (torch.arange(T, device=q.device)[None] if positions is None else positions).expand(B, T)
    first = positions[:, :1]
    column = positions - first + first % C  # [B, T]
    grid = [x.new_zeros(B, T + C - 1, *x.shape[2:]).scatter_add_(1, column.view(B, T, *[1] * (x.dim() - 2))
                                                                  .expand_as(x), x) for x in (q, k, v, beta)]
    first_read = initial_read_state
    if first_read is not None:  # a call beginning at a chunk start reads the initial state there
        first_read = torch.where((first % C != 0).view(B, 1, 1, 1), first_read,
                                 0 if initial_state is None else initial_state)
    o, S, reads = chunk_read_reads(*grid, scale=K ** -0.5 if scale is None else scale, initial_state=initial_state,
                                   first_read_state=first_read, output_final_state=output_final_state)
    # a padding token shares its column's output: zero it (with no intra-chunk term o_t is linear in q_t, so a
    # token whose q is zero reads zero)
    o = o.gather(1, column.view(B, T, 1, 1).expand(B, T, *o.shape[2:])) * (q != 0).any(-1, keepdim=True)
    R = reads[torch.arange(B, device=q.device), column[:, -1] // C].float() if output_final_state else None
    return o.to(v.dtype), S, R


def delta_rule_chunk_read_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    positions: torch.Tensor,
    *,
    chunk_size: int,
    scale: float | None = None,
    initial_state: State = None,
    initial_read_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> Result:
    """Step-by-step chunk-read delta rule: the specification, and the fast path for decoding."""
    return _call(_recurrent, q, k, v, beta, positions, chunk_size, scale, initial_state, initial_read_state,
                 output_final_state, cu_seqlens)


def delta_rule_chunk_read_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    positions: torch.Tensor,
    *,
    chunk_size: int,
    scale: float | None = None,
    initial_state: State = None,
    initial_read_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> Result:
    """Chunked chunk-read delta rule (WY representation and the two-block read), float32 inside."""
    return _call(_chunked, q, k, v, beta, positions, chunk_size, scale, initial_state, initial_read_state,
                 output_final_state, cu_seqlens, recompute=True)


def _call(kernel: Callable[..., Result], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
          positions: torch.Tensor, chunk_size: int, scale: float | None, initial_state: State,
          initial_read_state: State, output_final_state: bool, cu_seqlens: torch.Tensor | None,
          recompute: bool = False) -> Result:
    if cu_seqlens is not None and (initial_state is not None or initial_read_state is not None):
        raise ValueError("the chunk-read delta rule takes no initial states with cu_seqlens")
    if cu_seqlens is not None and output_final_state:
        raise ValueError("the chunk-read delta rule returns no final states with cu_seqlens")
    if initial_read_state is None:
        initial_read_state = initial_state
    # initial_read_state goes with the sequences so that `recompute` keeps it for backward
    sequences = dict(q=q, k=k, v=v, beta=beta, positions=positions, initial_read_state=initial_read_state)
    return call_kernel(kernel, sequences, initial_state, scale=scale, cu_seqlens=cu_seqlens,
                       output_final_state=output_final_state, chunk_size=chunk_size, recompute=recompute)


def _recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, positions: torch.Tensor,
               initial_read_state: State, *, scale: float, chunk_size: int, initial_state: State,
               output_final_state: bool, cu_seqlens: torch.Tensor | None) -> Result:
    B, T, H, K = k.shape
    V, dtype = v.shape[-1], v.dtype
    q, k, v, beta = q.float() * scale, k.float(), v.float(), beta.float()
    S, R = (q.new_zeros(B, H, K, V) if x is None else x.float() for x in (initial_state, initial_read_state))
    chunk_start = (positions % chunk_size == 0).view(*positions.shape, 1, 1, 1)
    if cu_seqlens is not None:
        _, begins = document_starts(cu_seqlens, T)
    outputs = []
    for t in range(T):
        if cu_seqlens is not None:  # every document starts from zeros
            S, R = (torch.where(begins[t], 0, x) for x in (S, R))
        R = torch.where(chunk_start[:, t], S, R)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], R))
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
    o = torch.stack(outputs, dim=1).to(dtype)
    return (o, S, R) if output_final_state else (o, None, None)


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, positions: torch.Tensor,
             initial_read_state: State, *, scale: float, chunk_size: int, initial_state: State,
             output_final_state: bool, cu_seqlens: torch.Tensor | None) -> Result:
    (B, T), dtype, C = k.shape[:2], v.dtype, chunk_size
    docs = None if cu_seqlens is None else Docs(cu_seqlens, T, C)
    q, k, v = (to_chunks(x, C) for x in (q, k, v))  # [NC,B,H,C,D]
    q = q * scale
    beta = to_chunks(beta, C)[..., None]
    mask = causal_mask(C, q.device) if docs is None else docs.pairs  # no decay: the mask is the decay matrix
    U, starts, S = delta_chunk_states(k, v, beta, torch.zeros_like(beta), mask, docs, initial_state)
    # Chunk −1 is "before this call": no tokens, start state initial_read_state (zeros with documents).
    starts = torch.cat([first_state(k, v, initial_read_state, docs)[None], starts])  # chunk n: starts[n + 1]

    # b(t), the first token of t's chunk in this call: [NC,B or 1,1,C] (padding past T: position 0, dropped)
    NC = q.shape[0]
    index = torch.arange(NC * C, device=q.device)
    b = (index - F.pad(positions, (0, NC * C - T)) % C).view(-1, NC, 1, C).transpose(0, 1)
    b_chunk = b.div(C, rounding_mode="floor")
    previous = b_chunk < torch.arange(NC, device=q.device).view(-1, 1, 1, 1)  # b(t) in chunk n − 1
    # column j of chunk n's two blocks is token (n − 1) C + j; chunk −1's keys and U are zeros
    col = (index[::C] - C).view(NC, 1, 1, 1, 1) + torch.arange(2 * C, device=q.device)
    pairs = (col.div(C, rounding_mode="floor") == b_chunk[..., None]) & (col < b[..., None])  # [NC,B,1,C,2C]
    start_reads = torch.where(previous[..., None], q @ starts[:-1], q @ starts[1:])
    if docs is not None:  # only a document that began before b(t)'s chunk reads that chunk's start state
        pairs = pairs & (two_blocks(docs.doc[..., None]).transpose(-1, -2) == docs.doc[..., None])
        start_reads = start_reads * (docs.cu[docs.doc] < b_chunk * C)[..., None]
    o = start_reads + ((q @ two_blocks(k).transpose(-1, -2)) * pairs) @ two_blocks(U)

    R = None
    if output_final_state:  # what the last token read: the start state of b's chunk plus its tokens before b
        last = b[(T - 1) // C, :, 0, (T - 1) % C].expand(B)
        first, row = last.div(C, rounding_mode="floor"), torch.arange(B, device=q.device)
        chunk = first.clamp_min(0)  # for chunk −1 (no tokens) chunk 0, where `before` is all False
        before = (chunk[:, None] * C + torch.arange(C, device=q.device) < last[:, None])[:, None, :, None]
        R = starts[first + 1, row] + (k[chunk, row] * before).transpose(-1, -2) @ U[chunk, row]
    return from_chunks(o, T, dtype), (S if output_final_state else None), R


def two_blocks(x: torch.Tensor) -> torch.Tensor:
    """[NC,...,C,D] -> [NC,...,2C,D]: chunk n − 1 (zeros for chunk 0) and chunk n along the token axis."""
    return torch.cat([torch.cat([torch.zeros_like(x[:1]), x[:-1]]), x], dim=-2)


dispatch.register_health_check(OP, fla_delta_rule_health_check)
