"""Packed documents (cu_seqlens) on the torch backend compile to one graph for every document layout.

Each varlen op, and whole model blocks, forward and backward, under torch.compile(fullgraph=True) with
AOTAutograd (which traces the backward too, so a host read of cu_seqlens anywhere fails), on layouts of
the same length and number of documents: no graph break, no recompilation, and eager's results. A new
number of documents recompiles once (cu_seqlens' length turns dynamic).
"""
from __future__ import annotations

import pytest
import torch

from lmlab.kernels.attention import attention
from lmlab.kernels.conv import short_conv
from lmlab.kernels.documents import document_index
from lmlab.kernels.gsa import gsa_chunk_torch, gsa_recurrent_torch
from lmlab.models.blocks import token_positions
import test_kernels_gsa
from test_kernels_recurrent import OPS, OPS_COMPILED, make_inputs, positional
from test_models import TINY, make_model

T, CHUNK = 24, 8
# Same length and number of documents, different boundaries: documents longer than a chunk, crossing
# chunk boundaries, starting on one, empty; 12 is always one (rows of 12 for the blocks).
LAYOUTS = [(0, 3, 12, 17, 24), (0, 8, 12, 12, 24), (0, 1, 12, 12, 24)]


def cu(bounds) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32)


def assert_one_graph(loss_fn, inputs: list[torch.Tensor]) -> None:
    """loss_fn(*inputs, cu_seqlens) compiles without graph breaks, then runs every layout without
    recompiling, with eager's loss and gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")

    def check(bounds) -> None:
        results = []
        for fn in (loss_fn, compiled):
            leaves = [x.detach().clone().requires_grad_() for x in inputs]
            loss = fn(*leaves, cu(bounds))
            results.append((loss, *torch.autograd.grad(loss, leaves)))
        for got, expected in zip(results[1], results[0]):
            torch.testing.assert_close(got, expected)

    try:
        check(LAYOUTS[0])  # compiles
        with torch.compiler.set_stance("fail_on_recompile"):
            for bounds in LAYOUTS[1:]:
                check(bounds)
    finally:
        torch._dynamo.reset()


def weighted_sum(*tensors: torch.Tensor) -> torch.Tensor:
    """A loss that touches every output element with a different weight."""
    return sum((t.float() * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in tensors)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("window_size", [None, 5])
def test_attention_varlen_is_one_graph(rows, window_size):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(rows, T // rows, 4, 8, generator=gen)
    k, v = torch.randn(2, rows, T // rows, 2, 8, generator=gen)  # GQA

    def loss(q, k, v, cu_seqlens):
        return weighted_sum(attention(q, k, v, cu_seqlens=cu_seqlens, window_size=window_size))

    assert_one_graph(loss, [q, k, v])


def test_short_conv_varlen_is_one_graph():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, T, 6, generator=gen), torch.randn(6, 1, 4, generator=gen)
    state = torch.randn(len(LAYOUTS[0]) - 1, 6, 4, generator=gen)

    def loss(x, weight, state, cu_seqlens):
        return weighted_sum(*short_conv(x, weight, initial_state=state, output_final_state=True,
                                        cu_seqlens=cu_seqlens))

    assert_one_graph(loss, [x, weight, state])


@pytest.mark.parametrize("op", OPS_COMPILED)
@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_recurrent_op_varlen_is_one_graph(op, impl):
    _, recurrent, chunk, _ = OPS[op]
    fn = recurrent if impl == "recurrent" else chunk
    x = make_inputs(op, 1, T, 2, 4, 6)
    h0 = torch.randn(len(LAYOUTS[0]) - 1, 2, 4, 6)

    def loss(h0, *inputs_and_cu):
        *inputs, cu_seqlens = inputs_and_cu
        kwargs = {} if impl == "recurrent" else {"chunk_size": CHUNK}
        return weighted_sum(*fn(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                                **kwargs))

    assert_one_graph(loss, [h0, *positional(op, x)])


@pytest.mark.slow  # 5-30 s: two passes to trace (the step-by-step kernel: 2 x T steps)
@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_gsa_varlen_is_one_graph(impl):
    fn = gsa_recurrent_torch if impl == "recurrent" else gsa_chunk_torch
    x = test_kernels_gsa.make_inputs(1, T, 2, 4, 6, 3)
    hk0, hv0 = test_kernels_gsa.make_state(len(LAYOUTS[0]) - 1, 2, 4, 6, 3)

    def loss(hk0, hv0, *inputs_and_cu):
        *inputs, cu_seqlens = inputs_and_cu
        kwargs = {} if impl == "recurrent" else {"chunk_size": CHUNK}
        o, (hk, hv) = fn(*inputs, initial_state=(hk0, hv0), output_final_state=True, cu_seqlens=cu_seqlens, **kwargs)
        return weighted_sum(o, hk, hv)

    assert_one_graph(loss, [hk0, hv0, *test_kernels_gsa.positional(x)])


def blocks_loss(name: str):
    """loss(x [2, T/2, hidden], cu_seqlens) through all blocks of a tiny `name` model, as in training: on
    two rows of packed documents."""
    model = make_model(name).train()

    def loss(x, cu_seqlens):
        positions = token_positions(*x.shape[:2], 0, None, cu_seqlens, x.device)
        rotary = model.model.rotary_tables(positions)
        for block, mixer_inputs in zip(model.model.layers, model.model.mixer_inputs(positions)):
            x = block(x, rotary, cu_seqlens=cu_seqlens, **mixer_inputs)
        return weighted_sum(x)

    return loss


def block_input() -> torch.Tensor:
    return torch.randn(2, T // 2, TINY["hidden_size"], generator=torch.Generator().manual_seed(0))


# hgrn2, gsa, mamba and samba (slow): their kernels' varlen graphs are checked above (hgrn2's is gla's) and in
# test_kernels_selective_scan.py (Mamba's scan), their blocks' graph breaks in test_models.py; mamba2's kernel
# (simple GLA) is checked here, in its block
@pytest.mark.parametrize("name", ["transformer", "hybrid", "gla", "mamba2",
                                  *(pytest.param(name, marks=pytest.mark.slow)
                                    for name in ("hgrn2", "gsa", "mamba", "samba"))])
def test_block_varlen_is_one_graph(name):
    """A model's blocks: mixer, short convs (gla, hgrn2, gsa, mamba, mamba2, samba), attention with a window
    (hybrid) and GQA, HGRN2's lower bounds, Mamba2's conv with bias, grouped B and C and gated group norm."""
    assert_one_graph(blocks_loss(name), [block_input()])


def test_block_new_document_count_recompiles_once():
    """A batch with another number of documents recompiles once, making cu_seqlens' length dynamic; no
    other count recompiles after that."""
    torch._dynamo.reset()
    compiled = torch.compile(blocks_loss("hybrid"), fullgraph=True, backend="aot_eager")
    x = block_input().requires_grad_()
    try:
        for bounds in [(0, 3, 12, 17, 24), (0, 12, 24)]:
            compiled(x, cu(bounds)).backward()
        with torch.compiler.set_stance("fail_on_recompile"):
            for bounds in [(0, 1, 5, 12, 13, 20, 24), (0, 2, 12, 24)]:
                compiled(x, cu(bounds)).backward()
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("bounds", LAYOUTS + [(0, 0, 5, 24)])
def test_document_index_counts_ends_before_each_position(bounds):
    """document_index (a search over the whole cu_seqlens, see its docstring) equals the count of document
    ends at or before each position, with empty documents and positions past the last document."""
    positions = torch.arange(T + 3)
    expected = torch.tensor([sum(end <= p for end in bounds[1:]) for p in positions.tolist()])
    torch.testing.assert_close(document_index(cu(bounds), positions), expected)
    torch.testing.assert_close(torch.compile(document_index)(cu(bounds), positions), expected)
