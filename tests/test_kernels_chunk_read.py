"""The chunk-read delta rule (Delayed-Chunk HQLT's fast-weight memory): chunked vs step-by-step, decoding
continuations, packed documents, left padding, and the W = 1 identity with the plain delta rule. CPU, fp32."""
from __future__ import annotations

import pytest
import torch

from conftest import errors_in_triton_interpreter
from lmlab.kernels.delta_rule import delta_rule_recurrent_torch
from lmlab.kernels.delta_rule_chunk_read import (
    delta_rule_chunk_read,
    delta_rule_chunk_read_chunk_torch,
    delta_rule_chunk_read_recurrent_torch,
)
from lmlab.kernels.documents import document_positions
from test_kernels_recurrent import make_inputs, rel_err
from test_kernels_varlen_compile import T as COMPILE_T, assert_one_graph, weighted_sum

H, K, V = 2, 8, 12
IMPLS = {"recurrent": delta_rule_chunk_read_recurrent_torch, "chunk": delta_rule_chunk_read_chunk_torch,
         "op": delta_rule_chunk_read}
LENGTHS = [5, 1, 19, 0, 8, 3, 40]  # with W = 4: a single token, an empty document, > 2W; 76 tokens in all


def inputs(B: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_inputs("delta_rule", B, T, H, K, V, seed=seed)  # q, k, v, beta


def run_with_grads(fn, x, positions, W, h0=None, r0=None, **kwargs):
    """Outputs, final states (S, R) and the gradients of a fixed random loss w.r.t. every input and state."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
    for name, state in (("h0", h0), ("r0", r0)):
        if state is not None:
            leaves[name] = state.detach().clone().requires_grad_()
    final = kwargs.get("cu_seqlens") is None
    o, S, R = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], positions, chunk_size=W,
                 initial_state=leaves.get("h0"), initial_read_state=leaves.get("r0"), output_final_state=final,
                 **kwargs)
    gen = torch.Generator().manual_seed(1)
    outputs = (o, S, R) if final else (o,)
    sum((t * torch.randn(t.shape, generator=gen)).sum() for t in outputs).backward()
    return outputs, {name: t.grad for name, t in leaves.items()}


def assert_close_all(got, ref, tol=1e-5):
    (outputs, grads), (outputs_ref, grads_ref) = got, ref
    errs = {**{name: rel_err(a, b) for name, a, b in zip(("o", "S", "R"), outputs, outputs_ref)},
            **{f"d{name}": rel_err(grads[name], grads_ref[name]) for name in grads_ref}}
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("W", [1, 4, 8])
def test_chunk_matches_recurrent(W):
    x, positions = inputs(2, 37), torch.arange(37)[None]  # T = 37: the last chunk is partial
    h0 = torch.randn(2, H, K, V)
    ref = run_with_grads(delta_rule_chunk_read_recurrent_torch, x, positions, W, h0)
    assert_close_all(run_with_grads(delta_rule_chunk_read_chunk_torch, x, positions, W, h0), ref)


@pytest.mark.parametrize("W", [4, 8])
def test_chunk_matches_recurrent_from_mid_chunk(W):
    """Positions continuing a cache, from a different place in a chunk per row: the first tokens read the
    initial read state."""
    x, h0, r0 = inputs(2, 37, seed=1), torch.randn(2, H, K, V), torch.randn(2, H, K, V)
    positions = torch.arange(37) + torch.tensor([[5], [10]])
    ref = run_with_grads(delta_rule_chunk_read_recurrent_torch, x, positions, W, h0, r0)
    assert_close_all(run_with_grads(delta_rule_chunk_read_chunk_torch, x, positions, W, h0, r0), ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_calls_continuing_a_cache_equal_one_call(impl):
    """Decoding: each call starts from the previous one's (S, R) with continued positions. Calls split inside
    chunks (W = 4), the second one within a chunk that began before it (it reads and returns R as given)."""
    fn, T, W = IMPLS[impl], 37, 4
    x, h0 = inputs(2, T, seed=2), torch.randn(2, H, K, V)
    o, S, R = fn(*x.values(), torch.arange(T)[None], chunk_size=W, initial_state=h0, output_final_state=True)
    outputs, S_call, R_call = [], h0, None
    for start, end in ((0, 13), (13, 15), (15, T)):
        part = [t[:, start:end] for t in x.values()]
        o_call, S_call, R_call = fn(*part, torch.arange(start, end)[None], chunk_size=W, initial_state=S_call,
                                    initial_read_state=R_call, output_final_state=True)
        outputs.append(o_call)
    assert rel_err(torch.cat(outputs, dim=1), o) < 1e-5 and rel_err(S_call, S) < 1e-5 and rel_err(R_call, R) < 1e-5


def _packed():
    lengths = torch.tensor(LENGTHS)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    N = int(lengths.sum())
    return inputs(1, N, seed=3), document_positions(cu_seqlens, torch.arange(N))[1][None], cu_seqlens


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_documents_equal_separate_runs(impl):
    x, positions, cu_seqlens = _packed()
    o, S, R = IMPLS[impl](*x.values(), positions, chunk_size=4, cu_seqlens=cu_seqlens)
    assert o.shape == x["v"].shape and S is None and R is None
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if start == end:
            continue
        doc = [t[:, start:end] for t in x.values()]
        o_ref, _, _ = delta_rule_chunk_read_recurrent_torch(*doc, torch.arange(end - start)[None], chunk_size=4)
        assert rel_err(o[:, start:end], o_ref) < 1e-5


def test_packed_documents_chunk_gradients():
    x, positions, cu_seqlens = _packed()
    ref = run_with_grads(delta_rule_chunk_read_recurrent_torch, x, positions, 4, cu_seqlens=cu_seqlens)
    assert_close_all(run_with_grads(delta_rule_chunk_read_chunk_torch, x, positions, 4, cu_seqlens=cu_seqlens), ref)


def test_packed_rows_are_one_stream():
    """The op takes [B, T] rows with cu_seqlens as one packed stream (76 tokens: its chunked kernel)."""
    x, positions, cu_seqlens = _packed()
    o, _, _ = delta_rule_chunk_read(*x.values(), positions, chunk_size=4, cu_seqlens=cu_seqlens)
    rows = [t.view(2, 38, *t.shape[2:]) for t in x.values()]
    o_rows, _, _ = delta_rule_chunk_read(*rows, positions.view(2, 38), chunk_size=4, cu_seqlens=cu_seqlens)
    assert o_rows.shape == rows[2].shape and rel_err(o_rows.reshape(o.shape), o) < 1e-6


def test_no_positions_means_each_row_or_document_from_zero():
    """positions=None (what the model passes without padding or a cache, letting fla's grid be used on CUDA)
    equals the positions counted from each packed document's or row's start."""
    x, positions, cu_seqlens = _packed()
    rows = [t.view(2, 38, *t.shape[2:]) for t in x.values()]
    o, _, _ = delta_rule_chunk_read(*rows, positions.view(2, 38), chunk_size=4, cu_seqlens=cu_seqlens)
    o_none, _, _ = delta_rule_chunk_read(*rows, None, chunk_size=4, cu_seqlens=cu_seqlens)
    assert rel_err(o_none, o) < 1e-6
    o, _, _ = delta_rule_chunk_read(*rows, torch.arange(38)[None], chunk_size=4)
    o_none, _, _ = delta_rule_chunk_read(*rows, None, chunk_size=4)
    assert rel_err(o_none, o) < 1e-6


def test_packed_documents_take_no_states():
    x, positions, cu_seqlens = _packed()
    for kwargs in (dict(initial_state=torch.zeros(7, H, K, V)), dict(initial_read_state=torch.zeros(7, H, K, V)),
                   dict(output_final_state=True)):
        with pytest.raises(ValueError, match="cu_seqlens"):
            delta_rule_chunk_read(*x.values(), positions, chunk_size=4, cu_seqlens=cu_seqlens, **kwargs)


@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_left_padding_is_inert(impl):
    """Row 0 left-padded by 7 tokens (position 0, k = v = beta = 0, arbitrary q), row 1 not: each row's real
    tokens and final states equal its unpadded run."""
    fn, W, pad, T = IMPLS[impl], 4, 7, 37
    x, h0 = inputs(2, T, seed=4), torch.randn(2, H, K, V)
    padded = {name: t.clone() for name, t in x.items()}
    for name, t in padded.items():
        t[0, :pad] = torch.randn_like(t[0, :pad]) if name == "q" else 0
    positions = torch.stack([(torch.arange(T) - pad).clamp_min(0), torch.arange(T)])
    o, S, R = fn(*padded.values(), positions, chunk_size=W, initial_state=h0, output_final_state=True)
    for row, first in ((0, pad), (1, 0)):
        real = [t[row:row + 1, first:] for t in x.values()]
        o_ref, S_ref, R_ref = fn(*real, torch.arange(T - first)[None], chunk_size=W, initial_state=h0[row:row + 1],
                                 output_final_state=True)
        assert rel_err(o[row:row + 1, first:], o_ref) < 1e-5
        assert rel_err(S[row:row + 1], S_ref) < 1e-5 and rel_err(R[row:row + 1], R_ref) < 1e-5


@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_w1_reads_the_previous_state(impl):
    """With W = 1 every token starts a chunk, so o_t = S_{t-1}ᵀ(scale q_t): the plain delta rule's output at
    t − 1 with the query q_t (and q_0ᵀ S_0 for the first token); R ends as the state before the last token."""
    x, h0, T = inputs(2, 37, seed=5), torch.randn(2, H, K, V), 37
    q, k, v, beta = x.values()
    o, S, R = IMPLS[impl](q, k, v, beta, torch.arange(T)[None], chunk_size=1, initial_state=h0,
                          output_final_state=True)
    o_shift, S_before_last = delta_rule_recurrent_torch(q[:, 1:], k[:, :-1], v[:, :-1], beta[:, :-1],
                                                        initial_state=h0, output_final_state=True)
    _, S_ref = delta_rule_recurrent_torch(q, k, v, beta, initial_state=h0, output_final_state=True)
    o_first = torch.einsum("bhk,bhkv->bhv", q[:, 0] * K ** -0.5, h0)
    assert rel_err(o, torch.cat([o_first[:, None], o_shift], dim=1)) < 1e-5
    assert rel_err(S, S_ref) < 1e-5 and rel_err(R, S_before_last) < 1e-5


def test_chunk_compiles_to_one_graph_for_all_document_layouts():
    """No host syncs: one fullgraph compile (forward and backward) serves every packed layout of
    `test_kernels_varlen_compile`."""
    x = inputs(1, COMPILE_T, seed=6)

    def loss(q, k, v, beta, cu_seqlens):
        positions = document_positions(cu_seqlens, torch.arange(COMPILE_T))[1][None]
        o, _, _ = delta_rule_chunk_read_chunk_torch(q, k, v, beta, positions, chunk_size=4, cu_seqlens=cu_seqlens)
        return weighted_sum(o)

    assert_one_graph(loss, list(x.values()))


@pytest.mark.slow
def test_fla_backend_matches_torch_chunk_in_triton_interpreter():
    """The fla backend (fla's delta-rule kernels with a zero intra-chunk term) against the PyTorch chunk kernel,
    run by Triton's CPU interpreter (≈ 40 s): outputs and the gradients of q, k, v and β, dense rows with a
    partial last chunk and packed documents across chunk boundaries; and evaluation's path with positions and
    states (outputs, S and R): left-padded rows from position 0, continuations beginning inside, at and
    before a chunk start, short and long."""
    pytest.importorskip("fla")
    errors_by_case = errors_in_triton_interpreter("fla_chunk_read_interpreter.py")
    assert all(max(errs) < 1e-5 for errs in errors_by_case.values()), errors_by_case


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_gpu_fla_backend_matches_torch(packed):
    """The fla backend against the PyTorch chunk kernel at an HQLT 340M layer's size in bf16: outputs and the
    gradients of q, k, v and β within 1e-2."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    pytest.importorskip("fla")
    x = make_inputs("delta_rule", 2, 2048, 8, 128, 128, seed=0, device="cuda", dtype=torch.bfloat16)
    cu_seqlens = torch.tensor([0, 700, 701, 2048, 2100, 4096], dtype=torch.int32).cuda() if packed else None
    results = []
    for backend in ("fla", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in x.values()]
        o, _, _ = delta_rule_chunk_read(*leaves, None, chunk_size=64, cu_seqlens=cu_seqlens, backend=backend)
        o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).cuda().bfloat16())
        results.append([o] + [t.grad for t in leaves])
    for name, a, b in zip(("o", "dq", "dk", "dv", "dbeta"), *results):
        assert rel_err(a.float(), b.float()) < 1e-2, name


@pytest.mark.gpu
def test_gpu_fla_grid_matches_torch_with_states():
    """Evaluation's cached calls at an HQLT 340M layer's size in bf16, fla's grid against the PyTorch kernels:
    left-padded contexts from zero states, then continuations of 40 and 300 tokens beginning inside chunks
    (outputs and final states S and R within 1e-2)."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    pytest.importorskip("fla")
    from lmlab.kernels import dispatch

    lengths = torch.tensor([500, 37, 256, 130], device="cuda")
    x = make_inputs("delta_rule", 4, 500, 8, 128, 128, seed=0, device="cuda", dtype=torch.bfloat16)
    real = torch.arange(500, device="cuda")[None] >= 500 - lengths[:, None]
    x = {name: t * real.view(4, 500, *[1] * (t.dim() - 2)) for name, t in x.items()}  # left padding
    calls = [(x, (real.cumsum(1) - 1).clamp(min=0))]
    for T, seed in ((40, 1), (300, 2)):  # continuations from where the previous call ended
        start = calls[-1][1][:, -1:] + 1
        calls.append((make_inputs("delta_rule", 4, T, 8, 128, 128, seed=seed, device="cuda", dtype=torch.bfloat16),
                      start + torch.arange(T, device="cuda")))
    states = {}
    for backend in ("fla", "torch"):
        S = R = None
        with torch.no_grad():
            for inputs, positions in calls:
                o, S, R = delta_rule_chunk_read(*inputs.values(), positions, chunk_size=64, initial_state=S,
                                                initial_read_state=R, output_final_state=True, backend=backend)
                assert dispatch.last_choices()["delta_rule_chunk_read"] == backend
                states.setdefault(backend, []).append((o, S, R))
    for step, (got, ref) in enumerate(zip(states["fla"], states["torch"])):
        for name, a, b in zip(("o", "S", "R"), got, ref):
            assert rel_err(a.float(), b.float()) < 1e-2, (step, name)
