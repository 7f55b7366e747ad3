"""Shared machinery of the linear-recurrence kernels (delta rule, gated delta rule, GLA).

All three ops keep a matrix state S [K, V] per (sequence, head), updated once per token, and read it
with the query: o_t = S_tᵀ (scale · q_t). They differ only in the update:
  GLA              S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ
  gated delta rule S_t = exp(g_t) S_{t-1} + β_t k_t (v_t − exp(g_t) S_{t-1}ᵀ k_t)ᵀ
  delta rule       the gated delta rule with g = 0
`recurrent_torch` runs that definition step by step (the specification); the chunkwise kernels live in
`delta_chunk_torch` (both delta rules) and `lmlab.kernels.gla`.

Varlen (`cu_seqlens`, B == 1), `varlen_call`: the packed documents are scattered into zero-padded rows
and the batched kernel runs on the rows. Padding is all zeros (k = v = 0, β = 0, log-decays = 0), which
leaves every state unchanged. The step-by-step kernel gets one document per row ([N, Tmax]). The chunked
kernels get documents laid out chunk-aligned and packed several to a row (next-fit, in order, rows as
long as the longest document), so padding costs less than a chunk per document instead of Tmax − len;
the chunk scan then loads each document's initial state where it starts and picks its final state
where it ends (`DocResets`).
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from packaging.version import Version

from lmlab.kernels import dispatch

CHUNK_SIZE = 64
# Up to this many tokens without gradients (decoding, short prefills) the step-by-step kernels are used:
# for a handful of tokens they beat the chunked ones, as in fla's models.
RECURRENT_MAX_T = 64

State = torch.Tensor | None
# A kernel: (q, k, v, *per-token inputs, scale, initial_state, output_final_state, ...) -> (o, final state)
Kernel = Callable[..., tuple[torch.Tensor, State]]


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    initial_state: State,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    backend: str | None,
) -> tuple[torch.Tensor, State]:
    """Run `op` on the backend `dispatch.choose` picks: its step-by-step kernel where `use_recurrent`
    says so (never with gradients: fla's fused_recurrent kernels have no backward), else its chunked one.

    Kernels come as (step-by-step, chunked) pairs, called as kernel(q, k, v, **extra_inputs, scale=...);
    `extra_inputs` are the op's other per-token inputs (beta, g, gk); `fla_kernels` imports fla's pair.
    """
    recurrent = use_recurrent(q, k, v, *extra_inputs.values(), initial_state)
    kernels = fla_kernels() if dispatch.choose(op, q, backend) == "fla" else torch_kernels
    return kernels[0 if recurrent else 1](q, k, v, **extra_inputs, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fla_health_check(x: torch.Tensor) -> str | None:
    """The reason fla's Triton kernels cannot run on `x`, or None."""
    if not x.is_cuda:
        return "input is not on a CUDA device"
    return dispatch.fla_unavailable_reason()


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
    *,
    scale: float,
    initial_state: State = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State]:
    """Step-by-step recurrence on [B,T,H,*] inputs (see the module docstring).

    beta [B,T,H] turns on the delta-rule update (without it: plain additive update, GLA);
    g [B,T,H] is a per-head log-decay, gk [B,T,H,K] a per-key-dim log-decay. Computes in float32.
    """
    B, T, H, K = k.shape
    V, dtype = v.shape[-1], v.dtype
    q, k, v = q.float() * scale, k.float(), v.float()
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].float().exp()[..., None, None]
        if gk is not None:
            S = S * gk[:, t].float().exp()[..., None]
        v_t = v[:, t]
        if beta is not None:
            v_t = beta[:, t].float()[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k[:, t], S))
        S = S + k[:, t, :, :, None] * v_t[:, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o.to(dtype), (S if output_final_state else None)


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


def decay_matrix(gcum: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(gcum_i - gcum_j) where mask[i, j], else 0; masked before exp so it never overflows."""
    diff = gcum[..., :, None] - gcum[..., None, :]
    return torch.where(mask, diff, float("-inf")).exp()


@dataclass
class DocResets:
    """Documents laid out chunk-aligned in rows (varlen): where each starts and ends, its initial state."""

    start_doc: torch.Tensor  # [R, NC] long: document starting at that chunk (index into `initial`), or -1
    initial: torch.Tensor  # [N, H, K, V] float32 initial states (or one zero state shared by all)
    end_chunk: torch.Tensor  # [N] long: row * NC + chunk of each document's last chunk


def scan_chunks(
    S: torch.Tensor,
    step: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]],
    n: int,
    resets: DocResets | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Run the inter-chunk recurrence S <- step(S, i) over `n` chunks.

    `step(S, i)` returns (next state, optional per-chunk tensor). Returns the states at the start of
    every chunk stacked on dim 0 ([n,B,H,K,V]), the stacked per-chunk tensors (or None), and the final
    state ([B,H,K,V], or with `resets` the final state of every document, [N,H,K,V]). The loop is over
    chunks only; everything else in the kernels is batched over chunks.
    """
    starts, extras, ends = [], [], []
    for i in range(n):
        if resets is not None:
            doc = resets.start_doc[:, i]
            S = torch.where((doc >= 0)[:, None, None, None], resets.initial[doc.clamp_min(0)], S)
        starts.append(S)
        S, extra = step(S, i)
        extras.append(extra)
        if resets is not None:
            ends.append(S)
    if resets is not None:
        S = torch.stack(ends, dim=1).flatten(0, 1)[resets.end_chunk]
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
    resets: DocResets | None = None,
) -> tuple[torch.Tensor, State]:
    """Chunkwise (gated) delta rule with the WY/UT representation (Yang et al. 2024, DeltaNet paper).

    Inside a chunk with start state S0, cumulative log-decay γ_t = Σ_{s<=t} g_s and Γ_t = exp(γ_t), the
    corrected values u_t = β_t (v_t − exp(g_t) S_{t-1}ᵀ k_t) satisfy the unit-lower-triangular system
        (I + A) U = diag(β) V − diag(β Γ) K S0,   A_ti = β_t exp(γ_t − γ_i) k_tᵀ k_i  (i < t),
    so U = u − w S0 with [u, w] = (I + A)^{-1} [βV, βΓK] (one batched triangular solve for all chunks).
    Then  O = (Q ⊙ Γ) S0 + ((Q Kᵀ) ⊙ exp(γ_t − γ_i))_{i<=t} U
    and   S_C = Γ_C S0 + (K ⊙ exp(γ_C − γ))ᵀ U.
    Only the two small matmuls of U and S_C depend on the previous chunk.
    """
    B, T, H, K = k.shape
    dtype = v.dtype
    q, k, v = (to_chunks(x, chunk_size) for x in (q * scale, k, v))  # [NC,B,H,C,D]
    beta = to_chunks(beta, chunk_size)[..., None]  # [NC,B,H,C,1]
    gcum = torch.zeros_like(beta[..., 0]) if g is None else to_chunks(g, chunk_size).cumsum(-1)
    n_chunks = q.shape[0]

    mask = causal_mask(chunk_size, q.device)
    decay = decay_matrix(gcum, mask)  # [NC,B,H,C,C]
    k_beta = k * beta
    A = (k_beta @ k.transpose(-1, -2)) * decay  # the solve ignores its diagonal (unitriangular)
    rhs = torch.cat([v * beta, k_beta * gcum.exp()[..., None]], dim=-1)
    u, w = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([v.shape[-1], K], -1)
    attn = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * gcum.exp()[..., None]
    k_decayed = k * (gcum[..., -1:] - gcum).exp()[..., None]
    chunk_decay = gcum[..., -1].exp()[..., None, None]  # [NC,B,H,1,1]

    # unbind once: indexing chunk i in the loop would cost a full-size zero gradient per chunk in backward
    u, w, k_decayed, chunk_decay = (x.unbind(0) for x in (u, w, k_decayed.transpose(-1, -2), chunk_decay))

    def step(S: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        U = u[i] - w[i] @ S
        return S * chunk_decay[i] + k_decayed[i] @ U, U

    S0 = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.float()
    starts, U, S = scan_chunks(S0, step, n_chunks, resets)
    o = q_decayed @ starts + attn @ U
    return from_chunks(o, T, dtype), (S if output_final_state else None)


def varlen_call(
    kernel: Kernel,
    cu_seqlens: torch.Tensor | None,
    sequences: dict[str, torch.Tensor | None],
    initial_state: State = None,
    *,
    scale: float | None = None,
    chunk_size: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, State]:
    """Call a batched kernel, on packed documents when `cu_seqlens` is given (see the module docstring).

    `sequences` are the per-token inputs by keyword ([B,T,H,*]; None entries are passed through).
    `scale` defaults to K^{-1/2}. With `chunk_size` the kernel is a chunked one, taking `chunk_size` and
    `resets`. Autocast is off inside: the kernels compute in float32 on purpose (the state must not round
    to bf16 every chunk).
    """
    q = sequences["q"]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        return _varlen_call(kernel, cu_seqlens, sequences, initial_state, chunk_size, scale=scale, **kwargs)


def _pack_rows(lengths: list[int], unit: int) -> tuple[list[int], list[int], list[int], int]:
    """Lay documents out in rows of units (chunks), next-fit and in order, each starting on a unit.

    Returns per document its row, first unit and number of units, and the units per row (enough for
    the longest document).
    """
    units = [max(1, -(-length // unit)) for length in lengths]  # an empty document still gets a unit
    row_units = max(units, default=1)
    rows, firsts, row, used = [], [], 0, 0
    for n in units:
        if used + n > row_units:
            row, used = row + 1, 0
        rows.append(row)
        firsts.append(used)
        used += n
    return rows, firsts, units, row_units


def _varlen_call(
    kernel: Kernel,
    cu_seqlens: torch.Tensor | None,
    sequences: dict[str, torch.Tensor | None],
    initial_state: State,
    chunk_size: int | None,
    **kwargs,
) -> tuple[torch.Tensor, State]:
    chunk_kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    if cu_seqlens is None:
        return kernel(**sequences, initial_state=initial_state, **chunk_kwargs, **kwargs)
    q = sequences["q"]
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1, got {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # the step-by-step kernel gets one document per row: a unit as long as the longest document
    unit = chunk_size or max(max(lengths, default=1), 1)
    rows, firsts, units, row_units = _pack_rows(lengths, unit)
    n_rows, row_len = max(rows, default=0) + 1, row_units * unit

    device = q.device
    rows_t, firsts_t = torch.tensor(rows, device=device), torch.tensor(firsts, device=device)
    doc_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                           torch.tensor(lengths, device=device))
    offset_in_doc = torch.arange(q.shape[1], device=device) - torch.tensor(bounds[:-1], device=device)[doc_of_token]
    dest = (rows_t * row_len + firsts_t * unit)[doc_of_token] + offset_in_doc  # token -> flat row position

    def to_rows(x: torch.Tensor) -> torch.Tensor:
        flat = x.new_zeros(n_rows * row_len, *x.shape[2:]).index_copy(0, dest, x[0])
        return flat.view(n_rows, row_len, *x.shape[2:])

    padded = {name: None if x is None else to_rows(x) for name, x in sequences.items()}
    if chunk_size is None:
        o, final_state = kernel(**padded, initial_state=initial_state, **kwargs)
    else:
        start_doc = torch.full((n_rows, row_units), -1, dtype=torch.long, device=device)
        start_doc[rows_t, firsts_t] = torch.arange(len(lengths), device=device)
        if initial_state is None:  # every document starts from the same zero state
            initial = q.new_zeros(1, q.shape[2], q.shape[3], sequences["v"].shape[3], dtype=torch.float32)
            start_doc = start_doc.clamp_max(0)
        else:
            initial = initial_state.float()
        end_chunk = rows_t * row_units + firsts_t + torch.tensor(units, device=device) - 1
        resets = DocResets(start_doc, initial, end_chunk)
        o, final_state = kernel(**padded, initial_state=None, chunk_size=chunk_size, resets=resets, **kwargs)
    return o.flatten(0, 1)[dest][None], final_state
