"""fla's chunked recurrence kernels (GLA, simple GLA, delta rule, gated delta rule, the chunk-read delta rule)
as two `torch.library` custom ops, and GSA's (gated slot attention) as a pair of its own.

fla exposes each chunk op as a `torch.compiler.disable`d autograd function. Inside a compiled block that
is a graph break, after which dynamo resumes every enclosing frame as its own compiled piece: 4 compiled
functions forward and 4 backward per layer call instead of 1 + 1, ≈ 0.7 ms of host time per layer call
(bench/NOTES.md, step 9), which shows in tokens/s wherever a step is host-bound (gla_340M on an H200).
As custom ops with a registered backward the block stays one graph, and its compiled code calls fla's
kernels through the dispatcher. The ops run the same fla forward / backward functions, step for step,
as fla's autograd functions do; the PyTorch twins of the recurrences are lmlab's chunk kernels
(`gla.gla_chunk_torch`, `simple_gla.simple_gla_chunk_torch`, `delta_rule.delta_rule_chunk_torch`,
`gated_delta_rule.gated_delta_rule_chunk_torch`, `delta_rule_chunk_read.delta_rule_chunk_read_chunk_torch`,
`gsa.gsa_chunk_torch`).

Imported only when fla's kernels are used (each op's `_fla_kernels`); fla is required here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton
from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv, chunk_fwd_o
from fla.ops.delta_rule.chunk import chunk_delta_rule_bwd, chunk_delta_rule_fwd
from fla.ops.delta_rule.wy_fast import prepare_wy_repr_bwd, prepare_wy_repr_fwd, recompute_w_u_fwd
from fla.ops.gla.chunk import chunk_gla_bwd, chunk_gla_fwd
from fla.ops.gsa.chunk_bwd import chunk_gsa_bwd
from fla.ops.gsa.chunk_fwd import chunk_gsa_fwd
from fla.ops.simple_gla.chunk import chunk_simple_gla_fwd
from fla.ops.utils import chunk_local_cumsum
from fla.ops.utils.constant import RCP_LN2
from fla.ops.utils.index import prepare_chunk_indices
from fla.utils import input_guard

from lmlab.kernels import gated_delta_rule_fla

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class _Family:
    # (q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_size)
    #   -> (o, final_state or None, A or None, g_cumsum or None): A is the intra-chunk matrix fla's backward
    #   reuses, g_cumsum the gate's chunk-local cumulative sum in base 2 (float32, g's shape), which the
    #   backward reads in place of g
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]
    # (q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens, chunk_indices, chunk_size)
    #   -> (dq, dk, dv, dg or None, dbeta or None, dh0 or None)
    backward: Callable[..., Tensors]
    a_in_float32: bool  # A's dtype: float32, else k's
    keeps_a: bool = True  # False: the forward keeps no A (it is None; the op passes an empty tensor)


def _gla_forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_size):
    g_cumsum, A, _, final_state, o = chunk_gla_fwd(
        q=q, k=k, v=v, g=g, g_cumsum=None, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        chunk_indices=chunk_indices)
    return o, final_state, A, g_cumsum


def _gla_backward(q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens, chunk_indices,
                  chunk_size):
    dq, dk, dv, dg, dh0 = chunk_gla_bwd(
        q=q, k=k, v=v, g=None, g_cumsum=g_cumsum, scale=scale, initial_state=initial_state, h=None, A=A, do=do,
        dht=dht, cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices)
    return dq, dk, dv, dg, None, dh0


# Simple GLA (one log-decay per head): fla's autograd function turns g into its chunk-local cumulative sum in
# base 2 (the kernels use exp2) and sums the decay gradient back in reverse; both happen here as there.
def _simple_gla_forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices,
                        chunk_size):
    g_cumsum = chunk_local_cumsum(g, chunk_size=chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens,
                                  chunk_indices=chunk_indices)
    o, final_state = chunk_simple_gla_fwd(
        q=q, k=k, v=v, g=g_cumsum, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices)
    return o, final_state, None, g_cumsum


# fla's `chunk_simple_gla_bwd`, step by step, because its `chunk_bwd_dqkwg` with a gate is the kernel that
# Hopper miscompiles (fla #640; fla refuses it there): `gated_delta_rule_fla.dqkwg` puts lmlab's kernel in its
# place then, as for the gated delta rule. Float32 chunk states, as fla's backward keeps them.
def _simple_gla_backward(q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens, chunk_indices,
                         chunk_size):
    chunked = dict(cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices)
    states = dict(g=g_cumsum, cu_seqlens=cu_seqlens, chunk_size=chunk_size, states_in_fp32=True)
    h, _ = chunk_fwd_h(k=k, v=v, h0=initial_state, **states)
    dh, dh0 = chunk_bwd_dh(q=q, k=k, v=v, do=do, h0=initial_state, dht=dht, scale=scale, **states)
    dq, dk, _, dg = gated_delta_rule_fla.dqkwg(q=q, k=k, v=v, w=None, g=g_cumsum, h=h, dv=None, do=do, dh=dh,
                                               scale=scale, **chunked)
    dv = chunk_bwd_dv(q=q, k=k, g=g_cumsum, do=do, dh=dh, scale=scale, **chunked)
    return dq, dk, dv, chunk_local_cumsum(dg, reverse=True, **chunked), None, dh0


def _delta_forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_size):
    o, A, final_state = chunk_delta_rule_fwd(
        q=q, k=k, v=v, beta=beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size)
    return o, final_state, A, None


def _delta_backward(q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens, chunk_indices, chunk_size):
    dq, dk, dv, dbeta, dh0 = chunk_delta_rule_bwd(
        q=q, k=k, v=v, beta=beta, A=A, scale=scale, initial_state=initial_state, do=do, dht=dht,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size)
    return dq, dk, dv, None, dbeta, dh0


# The chunk-read delta rule (Delayed-Chunk HQLT's fast-weight memory, chunks of fla's 64 tokens): the delta
# rule's chunk states, WY form and their backward are fla's, only the read differs: o = scale · q h (the
# state at the chunk's start), without the intra-chunk term o += tril(q kᵀ) v_new. fla's functions take
# that term from their value input, so a zero value tensor leaves only the read, forward and backward
# (each zero-value call costs one tile product of zeros per chunk; fla has no read-only kernel).
def _chunk_read_forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices,
                        chunk_size):
    chunked = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size)
    h, final_state, A = _chunk_start_states(k, v, beta, initial_state, output_final_state, chunked)
    o = chunk_fwd_o(q=q, k=k, v=torch.zeros_like(v), h=h, scale=scale, **chunked)
    return o, final_state, A, None


def _chunk_start_states(k, v, beta, initial_state, output_final_state, chunked):
    """The delta rule's state at every chunk start h [B, NT, H, K, V] (k's dtype), its final state and the WY
    matrix A."""
    w, u, A = prepare_wy_repr_fwd(k=k, v=v, beta=beta, **chunked)
    h, _, final_state = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, initial_state=initial_state,
                                                     output_final_state=output_final_state, save_new_value=False,
                                                     **chunked)
    return h, final_state, A


def _chunk_read_backward(q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens, chunk_indices,
                         chunk_size):
    chunked = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size)
    w, u = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
    h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, initial_state=initial_state, **chunked)
    # dh_n = scale · Σ_{t in chunk n} q_t do_tᵀ + the later chunks' dh carried back; the gradient of the
    # corrected values v_new is k dh only (no intra-chunk term)
    dh, dh0, dv_new = chunk_gated_delta_rule_bwd_dhu(q=q, k=k, w=w, do=do, dv=torch.zeros_like(do),
                                                      h0=initial_state, dht=dht, scale=scale, **chunked)
    dq, _, _, _ = chunk_bwd_dqkwg(q=q, k=k, v=torch.zeros_like(v_new), do=do, h=h, dh=dh, scale=scale, **chunked)
    _, dk, dw, _ = chunk_bwd_dqkwg(q=q, k=k, v=v_new, do=torch.zeros_like(do), h=h, dh=dh, w=w, dv=dv_new,
                                   scale=scale, **chunked)
    dk_wy, dv, dbeta = prepare_wy_repr_bwd(k=k, v=v, beta=beta, A=A, dw=dw, du=dv_new, cu_seqlens=cu_seqlens,
                                           chunk_indices=chunk_indices)
    return dq, dk + dk_wy, dv, None, dbeta, dh0


FAMILIES = {
    "gla": _Family(_gla_forward, _gla_backward, a_in_float32=True),
    "simple_gla": _Family(_simple_gla_forward, _simple_gla_backward, a_in_float32=True, keeps_a=False),
    "delta_rule": _Family(_delta_forward, _delta_backward, a_in_float32=False),
    "gated_delta_rule": _Family(gated_delta_rule_fla.forward, gated_delta_rule_fla.backward, a_in_float32=False),
    "delta_rule_chunk_read": _Family(_chunk_read_forward, _chunk_read_backward, a_in_float32=False),
}


def chunk_size_for(family: str, length: int) -> int:
    """fla's chunk size: 64, except GLA, whose autograd function shrinks it for sequences under 64 tokens."""
    return min(64, max(16, triton.next_power_of_2(length))) if family == "gla" else 64


def _chunk_indices(cu_seqlens: torch.Tensor | None, chunk_size: int) -> torch.Tensor | None:
    """fla's (sequence, chunk) index of each chunk of packed documents; None for dense rows."""
    return None if cu_seqlens is None else prepare_chunk_indices(cu_seqlens, chunk_size)


def _absent(like: torch.Tensor) -> torch.Tensor:
    """The stand-in for an absent tensor result (a custom op returns tensors only)."""
    return like.new_empty(0, dtype=torch.float32)


def _as(result: torch.Tensor | None, like: torch.Tensor | None, device_of: torch.Tensor) -> torch.Tensor:
    """A result in its input's dtype (fla returns some gradients in float32), or the empty stand-in."""
    return result.to(like.dtype) if result is not None else _absent(device_of)


def _empty_grads(device_of: torch.Tensor, *inputs: torch.Tensor | None) -> Tensors:
    """A backward op's fake results: one gradient like each input, or the empty stand-in where it is absent."""
    return tuple(torch.empty_like(x) if x is not None else _absent(device_of) for x in inputs)


def _given(grad: torch.Tensor | None) -> torch.Tensor | None:
    """An output's gradient, or None where autograd gave none or the output was the empty stand-in."""
    return grad if grad is not None and grad.numel() else None


def _present(grad: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor | None:
    """An input's gradient for autograd: None for an absent input (its gradient is the empty stand-in)."""
    return grad if x is not None else None


@torch.library.custom_op("lmlab::fla_chunk_forward", mutates_args=())
def _chunk_forward(family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                   beta: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None,
                   output_final_state: bool, cu_seqlens: torch.Tensor | None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, final_state, A, g_cumsum), each an empty tensor where absent."""
    return _run_forward(family, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


@input_guard  # contiguous inputs, and their GPU as the current device (as fla's own ops)
def _run_forward(family, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    chunk_size = chunk_size_for(family, q.shape[1])
    chunk_indices = _chunk_indices(cu_seqlens, chunk_size)
    spec = FAMILIES[family]
    o, final_state, A, g_cumsum = spec.forward(q, k, v, g, beta, scale, initial_state, output_final_state,
                                               cu_seqlens, chunk_indices, chunk_size)
    final_state = final_state if final_state is not None else _absent(q)
    A = A.to(torch.float32 if spec.a_in_float32 else k.dtype) if spec.keeps_a else _absent(q)
    return o.to(q.dtype), final_state, A, g_cumsum if g is not None else _absent(q)


@_chunk_forward.register_fake
def _(family, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    B, T, HV, V = v.shape
    states = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final_state = q.new_empty(states, HV, k.shape[-1], V, dtype=torch.float32) if output_final_state else _absent(q)
    spec = FAMILIES[family]
    A = q.new_empty(B, T, HV, chunk_size_for(family, T), dtype=torch.float32 if spec.a_in_float32 else k.dtype) \
        if spec.keeps_a else _absent(q)
    g_cumsum = g.new_empty(g.shape, dtype=torch.float32) if g is not None else _absent(q)
    return v.new_empty(v.shape, dtype=q.dtype), final_state, A, g_cumsum


@torch.library.custom_op("lmlab::fla_chunk_backward", mutates_args=())
def _chunk_backward(family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cumsum: torch.Tensor | None,
                    beta: torch.Tensor | None, A: torch.Tensor, scale: float,
                    initial_state: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None,
                    cu_seqlens: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg, dbeta, dh0), each in its input's dtype (dg: float32) or an empty tensor where that input
    is absent."""
    return _run_backward(family, q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens)


@input_guard
def _run_backward(family, q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens):
    chunk_size = chunk_size_for(family, q.shape[1])
    chunk_indices = _chunk_indices(cu_seqlens, chunk_size)
    grads = FAMILIES[family].backward(q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens,
                                      chunk_indices, chunk_size)
    return tuple(_as(grad, x, q) for grad, x in zip(grads, (q, k, v, g_cumsum, beta, initial_state)))


@_chunk_backward.register_fake
def _(family, q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens):
    return _empty_grads(q, q, k, v, g_cumsum, beta, initial_state)


# The backward keeps g's chunk-local cumulative sum from the forward, as fla's autograd functions do, in place
# of g itself (the same size): recomputing it cost one more kernel a layer (89 µs at hgrn2_340M's per-channel
# gates on an H100, ≈ 0.9% of its step).
def _setup_context(ctx, inputs, output) -> None:
    family, q, k, v, g, beta, scale, initial_state, _, cu_seqlens = inputs
    ctx.family, ctx.scale, ctx.g_dtype = family, scale, None if g is None else g.dtype
    ctx.save_for_backward(q, k, v, _given(output[3]), beta, output[2], initial_state, cu_seqlens)
    ctx.set_materialize_grads(False)  # no zero tensors for the unused final state's and A's gradients


def _backward(ctx, do, dht, _, __):
    q, k, v, g_cumsum, beta, A, initial_state, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dg, dbeta, dh0 = torch.ops.lmlab.fla_chunk_backward(
        ctx.family, q, k, v, g_cumsum, beta, A, ctx.scale, initial_state, do, _given(dht), cu_seqlens)
    dg = dg.to(ctx.g_dtype) if ctx.g_dtype is not None else None
    return (None, dq, dk, dv, dg, _present(dbeta, beta), None, _present(dh0, initial_state), None, None)


_chunk_forward.register_autograd(_backward, setup_context=_setup_context)


def chunk(family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
          beta: torch.Tensor | None, scale: float | None, initial_state: torch.Tensor | None,
          output_final_state: bool, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's chunked `family` op (a key of FAMILIES) on q, k [B,T,H,K], v [B,T,HV,V]: (o, final state or None)."""
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    o, final_state, _, _ = torch.ops.lmlab.fla_chunk_forward(family, q, k, v, g, beta, scale, initial_state,
                                                          output_final_state, cu_seqlens)
    return o, (final_state if output_final_state else None)


def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, *, scale: float | None = None,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's `chunk_gla` (gk is its `g`)."""
    return chunk("gla", q, k, v, gk, None, scale, initial_state, output_final_state, cu_seqlens)


def chunk_simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's `chunk_simple_gla` (g [B,T,H]: one log-decay per head)."""
    return chunk("simple_gla", q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens)


def chunk_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's `chunk_delta_rule` (q and k normalised by the caller)."""
    return chunk("delta_rule", q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           *, scale: float | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's `chunk_gated_delta_rule` (plain inputs: no in-kernel l2norm or gate), with a backward that runs on
    Hopper with triton < 3.7.1 (`gated_delta_rule_fla`)."""
    return chunk("gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def chunk_delta_rule_chunk_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                                scale: float | None = None, initial_state: torch.Tensor | None = None,
                                output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk-read delta rule on fla's 64-token chunks, aligned to each row's (or packed document's) start:
    o_t = S_{b(t)}ᵀ (scale · q_t) with b(t) t's chunk start (`delta_rule_chunk_read`'s semantics)."""
    return chunk("delta_rule_chunk_read", q, k, v, None, beta, scale, initial_state, output_final_state,
                 cu_seqlens)


@torch.no_grad()
@input_guard
def chunk_read_reads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, scale: float,
                     initial_state: torch.Tensor | None, first_read_state: torch.Tensor | None,
                     output_final_state: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The chunk-read delta rule on dense rows for inference (no autograd), where the rows' first chunk reads
    `first_read_state` (None: the initial state) instead of the state at its start: (o, final state or None,
    the state each chunk read [B, NT, H, K, V] in k's dtype). A call that continues a chunk begun by an
    earlier call reads that chunk's start state, which is not this call's initial state."""
    chunked = dict(cu_seqlens=None, chunk_indices=None, chunk_size=chunk_size_for("delta_rule_chunk_read", q.shape[1]))
    reads, final_state, _ = _chunk_start_states(k, v, beta, initial_state, output_final_state, chunked)
    if first_read_state is not None:
        reads[:, 0] = first_read_state
    o = chunk_fwd_o(q=q, k=k, v=torch.zeros_like(v), h=reads, scale=scale, **chunked)
    return o, final_state, reads


# GSA (gated slot attention, `gsa.py`): two passes over M slots with a softmax between. Its own pair of ops,
# because it fits neither `_Family`'s inputs (slot writes s, a pair of states) nor its results (three
# forward tensors for the backward, seven gradients). As fla's `chunk_gsa` at its default checkpoint level 2:
# the forward keeps only the key pass's slot scores ok, their softmax p (float32) and the value pass's
# intra-chunk matrix Av (float32); the backward recomputes the gate's cumulative sum and both passes' chunk
# states. Neither step runs fla's Hopper-refused gated `chunk_bwd_dqkwg` (fla #640): the value pass's
# backward is GLA's own kernels, the key pass's GSA's.
GSA_CHUNK_SIZE = 64  # fla's chunk_gsa default


def _gsa_gate_cumsum(g: torch.Tensor, cu_seqlens: torch.Tensor | None,
                     chunk_indices: torch.Tensor | None) -> torch.Tensor:
    """g's chunk-local cumulative sum in base 2 (the kernels use exp2), as fla's autograd function makes it."""
    return chunk_local_cumsum(g, chunk_size=GSA_CHUNK_SIZE, scale=RCP_LN2, cu_seqlens=cu_seqlens,
                              chunk_indices=chunk_indices)


@torch.library.custom_op("lmlab::fla_gsa_forward", mutates_args=())
def _gsa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, g: torch.Tensor, scale: float,
                 hk0: torch.Tensor | None, hv0: torch.Tensor | None, output_final_state: bool,
                 cu_seqlens: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, final Hk and Hv or empty tensors, ok, p, Av)."""
    return _run_gsa_forward(q, k, v, s, g, scale, hk0, hv0, output_final_state, cu_seqlens)


@input_guard
def _run_gsa_forward(q, k, v, s, g, scale, hk0, hv0, output_final_state, cu_seqlens):
    chunk_indices = _chunk_indices(cu_seqlens, GSA_CHUNK_SIZE)
    _, hk, ok, p, Av, _, hv, o = chunk_gsa_fwd(
        q=q, k=k, v=v, s=s, g=_gsa_gate_cumsum(g, cu_seqlens, chunk_indices), initial_state=(hk0, hv0),
        output_final_state=output_final_state, scale=scale, cu_seqlens=cu_seqlens, chunk_size=GSA_CHUNK_SIZE,
        chunk_indices=chunk_indices)
    hk, hv = (state if state is not None else _absent(q) for state in (hk, hv))
    return o, hk, hv, ok, p, Av


@_gsa_forward.register_fake
def _(q, k, v, s, g, scale, hk0, hv0, output_final_state, cu_seqlens):
    B, T, H, M = s.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1

    def final_state(*shape: int) -> torch.Tensor:
        return q.new_empty(N, H, *shape, dtype=torch.float32) if output_final_state else _absent(q)

    # o in v's dtype and ok in s's, as fla allocates them
    return (v.new_empty(v.shape), final_state(k.shape[-1], M), final_state(M, v.shape[-1]), s.new_empty(s.shape),
            s.new_empty(s.shape, dtype=torch.float32), q.new_empty(B, T, H, GSA_CHUNK_SIZE, dtype=torch.float32))


@torch.library.custom_op("lmlab::fla_gsa_backward", mutates_args=())
def _gsa_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, g: torch.Tensor,
                  ok: torch.Tensor, p: torch.Tensor, Av: torch.Tensor, scale: float, hk0: torch.Tensor | None,
                  hv0: torch.Tensor | None, do: torch.Tensor, dhk: torch.Tensor | None, dhv: torch.Tensor | None,
                  cu_seqlens: torch.Tensor | None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    """(dq, dk, dv, ds, dg, dhk0, dhv0), each in its input's dtype (fla rounds dg to s's dtype first, as its
    autograd function returns it) or an empty tensor where that initial state is absent."""
    return _run_gsa_backward(q, k, v, s, g, ok, p, Av, scale, hk0, hv0, do, dhk, dhv, cu_seqlens)


@input_guard
def _run_gsa_backward(q, k, v, s, g, ok, p, Av, scale, hk0, hv0, do, dhk, dhv, cu_seqlens):
    chunk_indices = _chunk_indices(cu_seqlens, GSA_CHUNK_SIZE)
    grads = chunk_gsa_bwd(
        q=q, k=k, v=v, s=s, g=_gsa_gate_cumsum(g, cu_seqlens, chunk_indices), ok=ok, p=p, A=Av, h=(None, None),
        initial_state=(hk0, hv0), scale=scale, do=do, dht=(dhk, dhv), cu_seqlens=cu_seqlens,
        chunk_size=GSA_CHUNK_SIZE, chunk_indices=chunk_indices)
    return tuple(_as(grad, x, q) for grad, x in zip(grads, (q, k, v, s, g, hk0, hv0)))


@_gsa_backward.register_fake
def _(q, k, v, s, g, ok, p, Av, scale, hk0, hv0, do, dhk, dhv, cu_seqlens):
    return _empty_grads(q, q, k, v, s, g, hk0, hv0)


def _gsa_setup_context(ctx, inputs, output) -> None:
    q, k, v, s, g, scale, hk0, hv0, _, cu_seqlens = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, s, g, *output[3:], hk0, hv0, cu_seqlens)
    ctx.set_materialize_grads(False)  # no zero tensors for unused final states, ok, p and Av


def _gsa_backward_rule(ctx, do, dhk, dhv, *_):
    q, k, v, s, g, ok, p, Av, hk0, hv0, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, ds, dg, dhk0, dhv0 = torch.ops.lmlab.fla_gsa_backward(
        q, k, v, s, g, ok, p, Av, ctx.scale, hk0, hv0, do, _given(dhk), _given(dhv), cu_seqlens)
    return dq, dk, dv, ds, dg, None, _present(dhk0, hk0), _present(dhv0, hv0), None, None


_gsa_forward.register_autograd(_gsa_backward_rule, setup_context=_gsa_setup_context)


def chunk_gsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, g: torch.Tensor, *,
              scale: float | None = None, initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """fla's `chunk_gsa` on q, k [B,T,H,K], v [B,T,H,V], s, g [B,T,H,M] (one head count: GSA's layer repeats
    shared heads itself): (o, final states (Hk [N,H,K,M], Hv [N,H,M,V]) float32 or None)."""
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    o, hk, hv, *_ = torch.ops.lmlab.fla_gsa_forward(q, k, v, s, g, scale, hk0, hv0, output_final_state, cu_seqlens)
    return o, ((hk, hv) if output_final_state else None)
