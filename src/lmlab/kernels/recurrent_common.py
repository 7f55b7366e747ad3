"""Shared machinery of the linear-recurrence kernels (delta rule, gated delta rule, GLA, GSA).

These ops keep a matrix state S [K, V] per (sequence, head), updated once per token, and read it
with the query: o_t = S_tᵀ (scale · q_t). They differ only in the update:
  GLA              S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ
  GSA's key pass   S_t = S_{t-1} diag(exp(gv_t)) + k_t v_tᵀ   (the decay on the value side: `lmlab.kernels.gsa`)
  gated delta rule S_t = exp(g_t) S_{t-1} + β_t k_t (v_t − exp(g_t) S_{t-1}ᵀ k_t)ᵀ
  delta rule       the gated delta rule with g = 0
`recurrent_torch` runs that definition step by step (the specification); the chunkwise kernels live in
`delta_chunk_torch` (both delta rules) and `lmlab.kernels.gla`.

Varlen (`cu_seqlens`; the ops take [B, T] rows as one packed stream, the kernels see it as [1, B*T])
reads `cu_seqlens` only on the device, so shapes depend on the input's length and the number of
documents alone: torch.compile captures one graph for every document layout. The step-by-step kernel
resets its state at every document start. The chunked kernels keep the packed [1, N] layout in fixed
chunks (`Docs`): intra-chunk terms are masked to pairs of the same document, cumulative decays restart
at document starts, only tokens whose document began in an earlier chunk read the carried state (the
others read their document's initial state, or nothing), and only the chunk's last document carries on
into the next chunk. Each document's final state is rebuilt from its last chunk.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from packaging.version import Version
from torch.utils.checkpoint import checkpoint

from lmlab.kernels import dispatch
from lmlab.kernels.documents import document_positions

CHUNK_SIZE = 64
# Up to this many tokens without gradients (decoding, short prefills) the step-by-step kernels are used:
# for a handful of tokens they beat the chunked ones, as in fla's models.
RECURRENT_MAX_T = 64

State = torch.Tensor | None
AnyState = State | tuple[torch.Tensor, ...]  # an op's state: GSA's is a pair
# A kernel: (q, k, v, *per-token inputs, scale, initial_state, output_final_state, ...) -> (o, final state)
Kernel = Callable[..., tuple[torch.Tensor, AnyState]]
Out = TypeVar("Out")


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def recompute_in_backward(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), keeping only its tensor arguments for backward, which reruns fn (torch.utils.checkpoint;
    under torch.compile, part of the compiled backward), when gradients are needed. Arguments go in
    positionally: checkpoint keeps tensors passed that way as saved tensors (visible to
    saved_tensors_hooks), keyword ones only by reference. `fn` must draw no random numbers."""
    if needs_grad(*(a for a in args if isinstance(a, torch.Tensor))):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def use_recurrent(q: torch.Tensor, *inputs: torch.Tensor | None) -> bool:
    """Whether the step-by-step kernel is the better choice for this call (few tokens, inference)."""
    return q.shape[1] <= RECURRENT_MAX_T and not needs_grad(q, *inputs)


def dispatch_op(
    op: str,
    torch_kernels: tuple[Kernel, Kernel],
    fla_kernels: Callable[[], tuple[Kernel, Kernel]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_inputs: dict[str, torch.Tensor],
    *,
    scale: float | None,
    initial_state: AnyState,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    backend: str | None,
) -> tuple[torch.Tensor, AnyState]:
    """Run `op` on the backend `dispatch.choose` picks: its step-by-step kernel where `use_recurrent`
    says so (never with gradients: fla's fused_recurrent kernels have no backward), else its chunked one.

    Kernels come as (step-by-step, chunked) pairs, called as kernel(q, k, v, **extra_inputs, scale=...);
    `extra_inputs` are the op's other per-token inputs (beta, g, gk); `fla_kernels` imports fla's pair.
    With `cu_seqlens` the B rows are one packed stream, which the kernels take as [1, B*T].
    """
    rows = q.shape[:2]
    if cu_seqlens is not None:
        q, k, v, *extras = (x.flatten(0, 1)[None] for x in (q, k, v, *extra_inputs.values()))
        extra_inputs = dict(zip(extra_inputs, extras))
    states = initial_state if isinstance(initial_state, tuple) else (initial_state,)
    recurrent = use_recurrent(q, k, v, *extra_inputs.values(), *states)
    kernels = fla_kernels() if dispatch.choose(op, q, backend) == "fla" else torch_kernels
    o, final_state = kernels[0 if recurrent else 1](
        q, k, v, **extra_inputs, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    return o.reshape(*rows, *o.shape[2:]), final_state


def fla_health_check(x: torch.Tensor) -> str | None:
    """The reason fla's Triton kernels cannot run on `x`, or None."""
    if not x.is_cuda:
        return "input is not on a CUDA device"
    return dispatch.fla_unavailable_reason()


def triton_health_check(x: torch.Tensor) -> str | None:
    """The reason lmlab's own Triton kernels cannot run on `x`, or None."""
    return None if x.is_cuda else "input is not on a CUDA device"


def triton_source_tag(path: str) -> str:
    """A hash of a Triton kernel file, for its `triton_op` names. torch 2.11's compile caches key a graph by
    the names of the ops in it, not by the Triton source behind a triton_op: on an H200 an edited kernel ran
    in its old version, restored from a carried Inductor cache. Names carrying the hash make any edit a miss."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def triton_version() -> tuple[int, ...]:
    """The installed triton's release numbers, e.g. (3, 6, 0); (0,) when it is not installed."""
    try:
        return Version(importlib.metadata.version("triton")).release
    except importlib.metadata.PackageNotFoundError:
        return (0,)


def recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    *,
    scale: float,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """Step-by-step recurrence on [B,T,H,*] inputs (see the module docstring).

    beta [B,T,H] turns on the delta-rule update (without it: plain additive update, GLA);
    g [B,T,H] is a per-head log-decay, gk [B,T,H,K] a per-key-dim and gv [B,T,H,V] a per-value-dim
    log-decay. Computes in float32.
    With `cu_seqlens` the state restarts from the document's initial state at every document start.
    """
    B, T, H, K = k.shape
    V, dtype = v.shape[-1], v.dtype
    q, k, v = q.float() * scale, k.float(), v.float()
    S = q.new_zeros(B, H, K, V) if initial_state is None or cu_seqlens is not None else initial_state.float()
    if cu_seqlens is not None:
        doc, begins = document_starts(cu_seqlens, T)
    outputs, states = [], []
    for t in range(T):
        if cu_seqlens is not None:  # a document starts here: its initial state (or zeros) replaces S
            S = torch.where(begins[t], 0 if initial_state is None else initial_state.float()[doc[t:t + 1]], S)
        if g is not None:
            S = S * g[:, t].float().exp()[..., None, None]
        if gk is not None:
            S = S * gk[:, t].float().exp()[..., None]
        if gv is not None:
            S = S * gv[:, t].float().exp()[..., None, :]
        v_t = v[:, t]
        if beta is not None:
            v_t = beta[:, t].float()[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k[:, t], S))
        S = S + k[:, t, :, :, None] * v_t[:, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        if cu_seqlens is not None and output_final_state:
            states.append(S)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    if cu_seqlens is not None and output_final_state:  # each document's state after its last token
        ends = (cu_seqlens[1:].long() - 1).clamp_min(0)
        S = keep_initial_if_empty(torch.stack(states or [S])[ends, 0], cu_seqlens, initial_state)
    return o.to(dtype), (S if output_final_state else None)


def document_starts(cu_seqlens: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position 0 .. length-1: its document's index (N_docs past the last document) and whether the
    document starts there."""
    positions = torch.arange(length, device=cu_seqlens.device)
    doc, offset = document_positions(cu_seqlens, positions)
    return doc, offset == 0


def keep_initial_if_empty(S: torch.Tensor, cu_seqlens: torch.Tensor, initial_state: State) -> torch.Tensor:
    """Final states [N, ...] with the empty documents' replaced by their initial state (or zeros)."""
    empty = (cu_seqlens[1:] == cu_seqlens[:-1]).view(-1, *[1] * (S.dim() - 1))
    return torch.where(empty, 0 if initial_state is None else initial_state.float(), S)


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B,T,H,*D] -> float32 [NC,B,H,C,*D], zero-padding T to a multiple of the chunk size.

    Chunks come first so that the chunk scan's x[i] is contiguous (no copy per step).
    """
    B, T, H, *D = x.shape
    pad = -T % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * (x.ndim - 2) + (0, pad))
    x = x.float().reshape(B, -1, chunk_size, H, *D)
    return x.permute(1, 0, 3, 2, *range(4, x.ndim)).contiguous()


def from_chunks(o: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[NC,B,H,C,V] -> [B,length,H,V] in `dtype` (drops the padding added by `to_chunks`)."""
    NC, B, H, C, V = o.shape
    return o.permute(1, 0, 3, 2, 4).reshape(B, NC * C, H, V)[:, :length].to(dtype)


def causal_mask(size: int, device: torch.device) -> torch.Tensor:
    """Boolean [size, size], True where column <= row (lower triangle with the diagonal)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + L)^{-1} [..., C, C] for L the strictly lower triangle of A (its diagonal and upper part are
    ignored), in log2(C) rounds of batched matmuls.

    Round s doubles the inverted diagonal blocks from size s to 2s: with D the block-diagonal inverse of
    size-s blocks and L_s the lower-left s x s block of every 2s block, the 2s-block inverse is
    D - D L_s D (as (D L_s)^2 = 0). That is forward substitution regrouped, so nothing grows larger than
    the inverse itself. Written out because cuBLAS' batched triangular solve, which
    `torch.linalg.solve_triangular` runs on CUDA, took 23% of a Gated DeltaNet 340M training step on an
    H200 (bench/NOTES.md, step 2).
    """
    C = A.shape[-1]
    index = torch.arange(C, device=A.device)
    row, col = index[:, None], index[None, :]
    inverse = torch.eye(C, dtype=A.dtype, device=A.device).expand_as(A)
    s = 1
    while s < C:
        lower_left = (row // (2 * s) == col // (2 * s)) & (row // s > col // s)
        inverse = inverse - inverse @ (A * lower_left) @ inverse
        s *= 2
    return inverse


def decay_matrix(gcum: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(gcum_i - gcum_j) where mask[i, j], else 0; masked before exp so it never overflows."""
    diff = gcum[..., :, None] - gcum[..., None, :]
    return torch.where(mask, diff, float("-inf")).exp()


class Docs:
    """Packed documents on the chunked layout of a [1, length] input (varlen), computed on the device.

    Token tensors are [NC, 1, 1, C] (chunk-major, as `to_chunks`); the padding after the last document
    counts as one more document. Per document: `first_chunk`, `last_chunk` [N] and `last_pos` [N] (its
    last token's position in that chunk).
    """

    def __init__(self, cu_seqlens: torch.Tensor, length: int, chunk_size: int):
        n_chunks = -(-length // chunk_size)
        self.cu, self.chunk_size = cu_seqlens.long(), chunk_size
        doc, _ = document_starts(cu_seqlens, n_chunks * chunk_size)
        chunk_start = torch.arange(0, n_chunks * chunk_size, chunk_size, device=doc.device)[:, None]
        begin = self.cu[doc].view(n_chunks, chunk_size) - chunk_start  # the document's start, chunk-relative
        self.doc = doc.view(n_chunks, 1, 1, chunk_size)
        # True where the token's document began in an earlier chunk: it reads the carried state
        self.carried = (begin < 0).view_as(self.doc)
        self.begin = begin.clamp_min(0).view_as(self.doc)  # where its document's part of the chunk begins
        self.pairs = causal_mask(chunk_size, doc.device) & (self.doc[..., :, None] == self.doc[..., None, :])
        self.last = self.doc == self.doc[..., -1:]  # the chunk's last document: it carries on
        self.first_chunk = (self.cu[:-1] // chunk_size).clamp_max(n_chunks - 1)
        ends = self.cu[1:] - 1
        self.last_chunk = (ends // chunk_size).clamp(0, n_chunks - 1)
        self.last_pos = (ends - self.last_chunk * chunk_size).clamp(0, chunk_size - 1)

    def restart(self, b: torch.Tensor) -> torch.Tensor:
        """Cumulative log-decays [NC,1,H,C,D] (over the chunk) counted from each document's start instead."""
        before = F.pad(b, (0, 0, 1, 0))  # before[t] = b[t - 1], before[0] = 0
        return b - before.gather(-2, self.begin[..., None].expand_as(b))

    def carried_only(self, x: torch.Tensor) -> torch.Tensor:
        """x [NC,1,H,C,D] with the rows of tokens whose document began in their chunk zeroed."""
        return x * self.carried[..., None]

    def mine(self, chunk: torch.Tensor) -> torch.Tensor:
        """[N,1,1,C,1]: the tokens of document n in chunk[n]."""
        index = torch.arange(len(chunk), device=chunk.device).view(-1, 1, 1, 1)
        return (self.doc[chunk] == index)[..., None]

    def read_initial(self, x: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """x_tᵀ h0 at the tokens of each document's first chunk (which do not read the carried state), else
        0: x [NC,1,H,C,K], initial states [N,H,K,V] -> [NC,1,H,C,V]. Gathers each document's first chunk,
        so it costs N_docs chunks (initial states with packed documents are an inference feature)."""
        chunk = self.first_chunk
        reads = (x[chunk] * self.mine(chunk)) @ initial.float()[:, None]
        return reads.new_zeros(*x.shape[:-1], reads.shape[-1]).index_add(0, chunk, reads)

    def initial_carry(self, b: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """[NC,1,H,K,V]: the initial state of the chunk's last document decayed to the chunk's end, where
        that document began in the chunk (elsewhere 0), for log-decays b [NC,1,H,C,D] from `restart`."""
        last_doc = self.doc[:, 0, 0, -1].clamp_max(len(initial) - 1)  # the padding has no initial state
        began_here = ~self.carried[..., -1:, None]  # [NC,1,1,1,1]
        return began_here * b[..., -1:, :].exp().transpose(-1, -2) * initial.float()[last_doc, None]

    def final_states(self, starts: torch.Tensor, values: torch.Tensor, k: torch.Tensor, b: torch.Tensor,
                     initial: State) -> torch.Tensor:
        """Each document's state after its last token, [N,H,K,V], rebuilt from its last chunk: the state
        there starts from `starts` (or the document's initial state / zeros, when it began in that chunk),
        decays by b (from `restart`) and takes the update kᵀ·values of its own tokens."""
        chunk = self.last_chunk
        b = b[chunk]  # [N,1,H,C,D]
        b_end = b.gather(-2, self.last_pos.view(-1, 1, 1, 1, 1).expand(*b.shape[:-2], 1, b.shape[-1]))
        weights = torch.where(self.mine(chunk), b_end - b, float("-inf")).exp()
        carried = (self.cu[:-1] < chunk * self.chunk_size).view(-1, 1, 1, 1, 1)
        start = torch.where(carried, starts[chunk], 0 if initial is None else initial.float()[:, None])
        S = b_end.exp().transpose(-1, -2) * start + (k[chunk] * weights).transpose(-1, -2) @ values[chunk]
        return keep_initial_if_empty(S[:, 0], self.cu, initial)


def carry_weights(b: torch.Tensor, docs: Docs | None) -> tuple[torch.Tensor, torch.Tensor]:
    """How a chunk feeds the next one, for cumulative log-decays b [NC,B,H,C,D] (D = 1 or K): the key
    weights exp(b_C − b_t) [NC,B,H,C,D] and the decay of the chunk's start state [NC,B,H,D,1]. With
    documents only the chunk's last document carries on, and its start state only if it began earlier."""
    diff, end = b[..., -1:, :] - b, b[..., -1:, :].exp()
    if docs is not None:
        diff = torch.where(docs.last[..., None], diff, float("-inf"))
        end = end * docs.carried[..., -1:, None]
    return diff.exp(), end.transpose(-1, -2)


def first_state(q: torch.Tensor, v: torch.Tensor, initial_state: State, docs: Docs | None) -> torch.Tensor:
    """The state the chunk scan starts from, float32 [B,H,K,V] (q or k, and v chunked): the initial state, or
    zeros (packed documents read theirs where they begin)."""
    if initial_state is None or docs is not None:
        return q.new_zeros(q.shape[1], q.shape[2], q.shape[-1], v.shape[-1])
    return initial_state.float()


def read_start_states(x: torch.Tensor, starts: torch.Tensor, docs: Docs | None,
                      initial_state: State) -> torch.Tensor:
    """x_tᵀ S [NC,B,H,C,V] with S the state each chunk starts from ([NC,B,H,K,V]); with packed documents
    the tokens of a document that began in the chunk read its initial state (or nothing) instead."""
    if docs is None:
        return x @ starts
    reads = docs.carried_only(x) @ starts
    return reads if initial_state is None else reads + docs.read_initial(x, initial_state)


def scan_chunks(
    S: torch.Tensor,
    step: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]],
    n: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Run the inter-chunk recurrence S <- step(S, i) over `n` chunks.

    `step(S, i)` returns (next state, optional per-chunk tensor). Returns the states at the start of
    every chunk stacked on dim 0 ([n,B,H,K,V]), the stacked per-chunk tensors (or None), and the final
    state. The loop is over chunks only; everything else in the kernels is batched over chunks.
    """
    starts, extras = [], []
    for i in range(n):
        starts.append(S)
        S, extra = step(S, i)
        extras.append(extra)
    stacked = torch.stack(extras) if extras and extras[0] is not None else None
    return torch.stack(starts), stacked, S


def delta_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float,
    initial_state: State = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """Chunkwise (gated) delta rule with the WY/UT representation (Yang et al. 2024, DeltaNet paper).

    Inside a chunk with start state S0, cumulative log-decay γ_t = Σ_{s<=t} g_s and Γ_t = exp(γ_t), the
    corrected values u_t = β_t (v_t − exp(g_t) S_{t-1}ᵀ k_t) satisfy the unit-lower-triangular system
        (I + A) U = diag(β) V − diag(β Γ) K S0,   A_ti = β_t exp(γ_t − γ_i) k_tᵀ k_i  (i < t),
    so U = u − w S0 with [u, w] = (I + A)^{-1} [βV, βΓK] (`unit_lower_inverse`, batched over all chunks).
    Then  O = (Q ⊙ Γ) S0 + ((Q Kᵀ) ⊙ exp(γ_t − γ_i))_{i<=t} U
    and   S_C = Γ_C S0 + (K ⊙ exp(γ_C − γ))ᵀ U.
    Only the two small matmuls of U and S_C depend on the previous chunk (`delta_chunk_states`). Packed
    documents: see `Docs`.
    """
    T, dtype = k.shape[1], v.dtype
    docs = None if cu_seqlens is None else Docs(cu_seqlens, T, chunk_size)
    q, k, v = (to_chunks(x, chunk_size) for x in (q * scale, k, v))  # [NC,B,H,C,D]
    beta = to_chunks(beta, chunk_size)[..., None]  # [NC,B,H,C,1]
    gcum = torch.zeros_like(beta) if g is None else to_chunks(g, chunk_size).cumsum(-1)[..., None]
    if docs is not None:
        gcum = docs.restart(gcum)
    mask = causal_mask(chunk_size, q.device) if docs is None else docs.pairs
    decay = decay_matrix(gcum[..., 0], mask)  # [NC,B,H,C,C]
    U, starts, S = delta_chunk_states(k, v, beta, gcum, decay, docs, initial_state)
    attn = (q @ k.transpose(-1, -2)) * decay
    o = read_start_states(q * gcum.exp(), starts, docs, initial_state) + attn @ U
    if docs is not None and output_final_state:
        S = docs.final_states(starts, U, k, gcum, initial_state)
    return from_chunks(o, T, dtype), (S if output_final_state else None)


def delta_chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gcum: torch.Tensor,
    decay: torch.Tensor,
    docs: Docs | None,
    initial_state: State,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state-carrying part of `delta_chunk_torch`, on chunked k, v [NC,B,H,C,*], beta and cumulative
    log-decays gcum [NC,B,H,C,1] and the masked intra-chunk decays `decay` [NC,B,H,C,C]: returns the
    corrected values U [NC,B,H,C,V], the state every chunk starts from [NC,B,H,K,V] and the state after
    the last chunk (packed documents: the carried state, not each document's final one)."""
    k_beta = k * beta
    A = (k_beta @ k.transpose(-1, -2)) * decay  # the inverse ignores its diagonal
    A_inverse = unit_lower_inverse(A)
    u, w = A_inverse @ (v * beta), A_inverse @ (k_beta * gcum.exp())
    key_weights, chunk_decay = carry_weights(gcum, docs)
    k_decayed = k * key_weights
    initial_carry = None
    if docs is not None:  # w S0 is a read of the start state, as (Q ⊙ Γ) S0: see `read_start_states`
        if initial_state is not None:
            u = u - docs.read_initial(w, initial_state)
            initial_carry = docs.initial_carry(gcum, initial_state).unbind(0)
        w = docs.carried_only(w)

    # unbind once: indexing chunk i in the loop would cost a full-size zero gradient per chunk in backward
    u, w, k_decayed, chunk_decay = (x.unbind(0) for x in (u, w, k_decayed.transpose(-1, -2), chunk_decay))

    def step(S: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        U = u[i] - w[i] @ S
        S = S * chunk_decay[i] + k_decayed[i] @ U
        return (S if initial_carry is None else S + initial_carry[i]), U

    starts, U, S = scan_chunks(first_state(k, v, initial_state, docs), step, len(u))
    return U, starts, S


def call_kernel(
    kernel: Callable[..., Out],
    sequences: dict[str, torch.Tensor | None],
    initial_state: AnyState = None,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    recompute: bool = False,
    **kwargs,
) -> Out:
    """Call a kernel on the per-token inputs `sequences` ([B,T,H,*], by keyword, with any other tensor input
    that backward needs; None entries are passed through), with `scale` defaulting to K^{-1/2}. Autocast is
    off inside: the kernels compute in float32 on purpose (the state must not round to bf16 every chunk).

    With `recompute` and gradients needed, only the kernel's inputs are kept for backward, which reruns
    its forward (torch.utils.checkpoint; under torch.compile, part of the compiled backward). For the
    chunked kernels that is worth one more forward: their float32 intermediates and chunk start states
    take 10-20x the inputs' bytes (6 GB per layer for a 340M Gated DeltaNet at 16 x 2048 tokens), and
    keeping any one of them (the start states, the corrected values U) costs as much as the inputs again.
    """
    q = sequences["q"]
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1, got {q.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    names = list(sequences)

    def run(initial_state: AnyState, cu_seqlens: torch.Tensor | None, *tensors: torch.Tensor | None) -> Out:
        return kernel(**dict(zip(names, tensors)), initial_state=initial_state, scale=scale,
                      cu_seqlens=cu_seqlens, **kwargs)

    args = (initial_state, cu_seqlens, *sequences.values())
    with torch.autocast(q.device.type, enabled=False):
        return recompute_in_backward(run, *args) if recompute else run(*args)
