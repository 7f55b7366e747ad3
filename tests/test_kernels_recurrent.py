"""The recurrent kernels: chunkwise vs step-by-step, varlen, padding, fla's references, dispatch.

CPU tests are fp32 on tiny shapes; `gpu` tests compare the torch kernels with fla's Triton kernels in
bf16 at 340M-like shapes (fla parts skip when fla is not installed).
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import errors_in_triton_interpreter
from lmlab.errors import UserError

from lmlab.kernels import delta_rule as dr
from lmlab.kernels import gated_delta_rule as gdr
from lmlab.kernels import gla as gla_mod
from lmlab.kernels import simple_gla as sgla
from lmlab.kernels.recurrent_common import unit_lower_inverse

# op -> (dispatching function, recurrent reference, chunk kernel, names of the gate inputs in call order)
OPS = {
    "delta_rule": (dr.delta_rule, dr.delta_rule_recurrent_torch, dr.delta_rule_chunk_torch, ("beta",)),
    "gated_delta_rule": (
        gdr.gated_delta_rule, gdr.gated_delta_rule_recurrent_torch, gdr.gated_delta_rule_chunk_torch, ("g", "beta")
    ),
    "gla": (gla_mod.gla, gla_mod.gla_recurrent_torch, gla_mod.gla_chunk_torch, ("gk",)),
    "simple_gla": (sgla.simple_gla, sgla.simple_gla_recurrent_torch, sgla.simple_gla_chunk_torch, ("g",)),
}
# simple GLA's kernels are GLA's chunk kernel and the shared step-by-step one: the tests of how they compile and
# what they save for backward run for it only in the slow suite
OPS_COMPILED = [*(op for op in OPS if op != "simple_gla"), pytest.param("simple_gla", marks=pytest.mark.slow)]


def make_inputs(op: str, B: int, T: int, H: int, K: int, V: int, *, seed: int = 0, device="cpu",
                dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = dict(q=F.normalize(randn(B, T, H, K), dim=-1), k=F.normalize(randn(B, T, H, K), dim=-1), v=randn(B, T, H, V))
    if op == "gla":
        x["q"], x["k"] = randn(B, T, H, K), randn(B, T, H, K)
        x["gk"] = F.logsigmoid(randn(B, T, H, K)) / 4
    elif op == "simple_gla":  # as Mamba2 makes them: unnormalised B and C, Δ·A from about -1e-3 to -2
        x["q"], x["k"] = randn(B, T, H, K), randn(B, T, H, K)
    else:
        x["beta"] = torch.rand(B, T, H, generator=gen)
    if op in ("gated_delta_rule", "simple_gla"):
        x["g"] = F.logsigmoid(randn(B, T, H) + 2)
    return {name: t.to(device=device, dtype=dtype) for name, t in x.items()}


def positional(op: str, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (x["q"], x["k"], x["v"], *(x[name] for name in OPS[op][3]))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, absolute below ||b|| = 1 (a gradient can be exactly zero, e.g. d/dg at T = 1)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1.0)).item()


def run_with_grads(fn, op, x, h0, **kwargs):
    """Outputs, final state and the gradients of a fixed random loss w.r.t. every input and h0."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
    if h0 is not None:
        leaves["h0"] = h0.detach().clone().requires_grad_()
    o, state = fn(*positional(op, leaves), initial_state=leaves.get("h0"), output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=gen).to(state.device)).sum()
    loss.backward()
    return o, state, {name: t.grad for name, t in leaves.items()}


def errors(got, ref) -> dict[str, float]:
    """rel_err of the output, the final state and each gradient (d<input>) of `got` against `ref`."""
    (o, s, grads), (o_ref, s_ref, grads_ref) = got, ref
    return {"o": rel_err(o, o_ref), "state": rel_err(s, s_ref),
            **{f"d{name}": rel_err(grads[name], grads_ref[name]) for name in grads_ref}}


def assert_close_all(got, ref, tol):
    errs = errors(got, ref)
    assert max(errs.values()) < tol, errs  # every tensor's error, not just the first bad one


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T,with_h0", [(1, False), (37, True), (128, False), (130, True)])
def test_chunk_matches_recurrent(op, T, with_h0):
    _, recurrent, chunk, _ = OPS[op]
    B, H, K, V = 2, 2, 16, 24
    x = make_inputs(op, B, T, H, K, V)
    h0 = torch.randn(B, H, K, V) if with_h0 else None
    ref = run_with_grads(recurrent, op, x, h0)
    assert_close_all(run_with_grads(chunk, op, x, h0), ref, 1e-5)
    # several chunks even for T = 37, and a chunk size that is not a power of two
    for chunk_size in (16, 24):
        assert_close_all(run_with_grads(chunk, op, x, h0, chunk_size=chunk_size), ref, 1e-5)


@pytest.mark.parametrize("op", OPS)
def test_autocast_does_not_lower_precision(op):
    """Under bf16 autocast (as in training) the kernels still compute in float32."""
    _, recurrent, chunk, _ = OPS[op]
    x = make_inputs(op, 1, 70, 2, 8, 8)
    for fn in (recurrent, chunk):
        o, s = fn(*positional(op, x), output_final_state=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o_amp, s_amp = fn(*positional(op, x), output_final_state=True)
        assert o_amp.dtype == torch.float32 and rel_err(o_amp, o) < 1e-6 and rel_err(s_amp, s) < 1e-6


@pytest.mark.parametrize("op", ["gated_delta_rule", "gla", "simple_gla"])
def test_strong_decay_is_stable(op):
    """Log-decays far below fp32's exp range inside one chunk must not overflow (no NaN/inf)."""
    _, recurrent, chunk, _ = OPS[op]
    x = make_inputs(op, 1, 70, 2, 8, 8)
    gate = "gk" if op == "gla" else "g"
    x[gate] = torch.full_like(x[gate], -5.0)  # 64 steps of -5: exp(-320) underflows, exp(+320) would overflow
    h0 = torch.randn(1, 2, 8, 8)
    got = run_with_grads(chunk, op, x, h0)
    assert all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2].values()))
    # gate gradients come out of a cumsum, which costs a little precision at such decays
    assert_close_all(got, run_with_grads(recurrent, op, x, h0), 1e-4)


VARLEN_LENGTHS = [5, 70, 0, 1, 30]  # an empty document too; with chunk size 16 several share a row


def _varlen_inputs(op):
    lengths = torch.tensor(VARLEN_LENGTHS)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    x = make_inputs(op, 1, int(lengths.sum()), 2, 8, 12, seed=3)
    return x, torch.randn(len(VARLEN_LENGTHS), 2, 8, 12), cu_seqlens


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunk", "chunk16", "dispatch"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_varlen_equals_separate_documents(op, impl, with_h0):
    dispatch_fn, recurrent, chunk, _ = OPS[op]
    fn = {"dispatch": dispatch_fn, "recurrent": recurrent, "chunk": chunk,
          "chunk16": functools.partial(chunk, chunk_size=16)}[impl]
    x, h0, cu_seqlens = _varlen_inputs(op)
    h0 = h0 if with_h0 else None
    o, states = fn(*positional(op, x), initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    assert o.shape == x["v"].shape and states.shape == (len(VARLEN_LENGTHS), *states.shape[1:])
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        doc = {name: t[:, start:end] for name, t in x.items()}
        h0_doc = None if h0 is None else h0[n:n + 1]
        o_ref, s_ref = recurrent(*positional(op, doc), initial_state=h0_doc, output_final_state=True)
        if end > start:
            assert rel_err(o[:, start:end], o_ref) < 1e-5
        assert rel_err(states[n:n + 1], s_ref) < 1e-5 if end > start or with_h0 else states[n].abs().max() == 0


@pytest.mark.parametrize("op", OPS)
def test_varlen_chunk_gradients(op):
    _, recurrent, chunk, _ = OPS[op]
    x, h0, cu_seqlens = _varlen_inputs(op)
    ref = run_with_grads(recurrent, op, x, h0, cu_seqlens=cu_seqlens)
    assert_close_all(run_with_grads(chunk, op, x, h0, cu_seqlens=cu_seqlens, chunk_size=16), ref, 1e-5)


@pytest.mark.parametrize("op", OPS)
def test_varlen_rows_are_one_stream(op):
    """With cu_seqlens, [B, T] rows are one packed stream (the models pass their batch rows)."""
    dispatch_fn = OPS[op][0]
    x, h0, cu_seqlens = _varlen_inputs(op)  # 106 tokens: rows of 53 (a document crosses: fine here)
    rows = {name: t.view(2, 53, *t.shape[2:]) for name, t in x.items()}
    o, s = dispatch_fn(*positional(op, x), initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    o_rows, s_rows = dispatch_fn(*positional(op, rows), initial_state=h0, output_final_state=True,
                                 cu_seqlens=cu_seqlens)
    assert o_rows.shape == rows["v"].shape
    assert rel_err(o_rows.reshape(o.shape), o) < 1e-6 and rel_err(s_rows, s) < 1e-6


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_padding_is_inert(op, impl):
    """Left padding and holes with k = v = 0, beta = 0, log-decay = 0 change neither state nor outputs."""
    fn = OPS[op][1] if impl == "recurrent" else OPS[op][2]
    x = make_inputs(op, 1, 40, 2, 8, 8, seed=5)
    h0 = torch.randn(1, 2, 8, 8)
    pad_before, hole_at, hole = 30, 20, 50  # crosses chunk boundaries

    def inert(t: torch.Tensor, n: int, name: str) -> torch.Tensor:
        filler = t.new_zeros(t.shape[0], n, *t.shape[2:])
        return filler.normal_() if name == "q" else filler  # queries at padding are arbitrary

    padded = {
        name: torch.cat([inert(t, pad_before, name), t[:, :hole_at], inert(t, hole, name), t[:, hole_at:]], dim=1)
        for name, t in x.items()
    }
    o, s = fn(*positional(op, x), initial_state=h0, output_final_state=True)
    o_pad, s_pad = fn(*positional(op, padded), initial_state=h0, output_final_state=True)
    real = torch.cat([o_pad[:, pad_before:pad_before + hole_at], o_pad[:, pad_before + hole_at + hole:]], dim=1)
    assert rel_err(s_pad, s) < 1e-5
    assert rel_err(real, o) < 1e-5


def _load_fla_naive(op_dir: str):
    """fla's pure-PyTorch reference module, loaded from its file so fla's Triton package is not imported."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla is not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "ops" / op_dir / "naive.py"
    if not path.exists():
        pytest.skip(f"fla has no {path}")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("fla's naive references need einops")
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{op_dir}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_fla_naive_delta_rule(with_h0):
    naive = _load_fla_naive("delta_rule")
    x = make_inputs("delta_rule", 2, 37, 2, 16, 24)
    h0 = torch.randn(2, 2, 16, 24) if with_h0 else None
    o, s = dr.delta_rule_chunk_torch(*positional("delta_rule", x), initial_state=h0, output_final_state=True)
    head_first = [t.transpose(1, 2).contiguous() for t in (x["q"], x["k"], x["v"], x["beta"])]
    o_ref, s_ref = naive.delta_rule_recurrence(*head_first, initial_state=h0, output_final_state=True)
    assert rel_err(o, o_ref.transpose(1, 2)) < 1e-5 and rel_err(s, s_ref) < 1e-5
    # fla's own chunkwise reference (T a multiple of its chunk size, no initial state)
    x = make_inputs("delta_rule", 2, 64, 2, 16, 24)
    o, s = dr.delta_rule_chunk_torch(*positional("delta_rule", x), output_final_state=True)
    head_first = [t.transpose(1, 2).contiguous() for t in (x["q"], x["k"], x["v"], x["beta"])]
    o_ref, s_ref = naive.delta_rule_chunkwise(*head_first)
    assert rel_err(o, o_ref.transpose(1, 2)) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_fla_naive_gated_delta_rule(with_h0):
    naive = _load_fla_naive("gated_delta_rule")
    x = make_inputs("gated_delta_rule", 2, 70, 2, 16, 24)
    h0 = torch.randn(2, 2, 16, 24) if with_h0 else None
    o, s = gdr.gated_delta_rule_chunk_torch(*positional("gated_delta_rule", x), initial_state=h0,
                                            output_final_state=True)
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    for o_ref, s_ref in (
        naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True),
        naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True),
    ):
        assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_fla_naive_gla(with_h0):
    naive = _load_fla_naive("gla")
    x = make_inputs("gla", 2, 70, 2, 16, 24)
    h0 = torch.randn(2, 2, 16, 24) if with_h0 else None
    o, s = gla_mod.gla_chunk_torch(*positional("gla", x), initial_state=h0, output_final_state=True)
    o_ref, s_ref = naive.naive_recurrent_gla(*positional("gla", x), initial_state=h0, output_final_state=True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_matches_fla_naive_simple_gla():
    naive = _load_fla_naive("simple_gla")
    x = make_inputs("simple_gla", 2, 70, 2, 16, 24)
    h0 = torch.randn(2, 2, 16, 24)
    o, s = sgla.simple_gla_chunk_torch(*positional("simple_gla", x), initial_state=h0, output_final_state=True)
    o_ref, s_ref = naive.naive_recurrent_simple_gla(*positional("simple_gla", x), initial_state=h0)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("op", OPS)
def test_dispatch_on_cpu(op):
    dispatch_fn, recurrent, _, _ = OPS[op]
    x = make_inputs(op, 1, 3, 2, 8, 8, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on CPU
        o, s = dispatch_fn(*positional(op, x), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, _ = recurrent(*positional(op, x))
    assert torch.equal(o, o_ref)
    with pytest.raises(UserError, match="cannot run here"):
        dispatch_fn(*positional(op, x), backend="fla")


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs, each storage counted once."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("op", OPS_COMPILED)
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_chunk_saves_only_its_inputs_for_backward(op, varlen, compiled):
    """With gradients the chunked kernels keep their inputs for backward, not their float32 intermediates
    and chunk states (10-20x the inputs' bytes: out of memory for a 340M model at 16 x 2048 tokens); so
    does the backward graph torch.compile partitions."""
    torch._dynamo.reset()
    chunk = torch.compile(OPS[op][2], fullgraph=True, backend="aot_eager") if compiled else OPS[op][2]
    x = {name: t.requires_grad_() for name, t in make_inputs(op, 1, 256, 2, 16, 32).items()}
    cu_seqlens = torch.tensor([0, 100, 256], dtype=torch.int32) if varlen else None
    h0 = torch.randn(2 if varlen else 1, 2, 16, 32, requires_grad=True)
    inputs = sum(t.numel() * t.element_size() for t in (*x.values(), h0))
    saved = saved_bytes(lambda: chunk(*positional(op, x), initial_state=h0, output_final_state=True,
                                      cu_seqlens=cu_seqlens, chunk_size=32))
    assert saved <= 1.5 * inputs, (saved, inputs)


@pytest.mark.parametrize("op", OPS)
def test_chunk_recomputes_only_for_backward(op, monkeypatch):
    """The chunked kernel runs once without gradients, and once more, in backward, with them."""
    module, attribute = {"delta_rule": (dr, "delta_chunk_torch"), "gated_delta_rule": (gdr, "delta_chunk_torch"),
                         "gla": (gla_mod, "_gla_chunk"), "simple_gla": (gla_mod, "_gla_chunk")}[op]
    kernel, calls = getattr(module, attribute), []
    monkeypatch.setattr(module, attribute, lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    x = make_inputs(op, 1, 40, 2, 8, 8)
    OPS[op][2](*positional(op, x))
    assert len(calls) == 1
    x = {name: t.requires_grad_() for name, t in x.items()}
    with torch.no_grad():
        OPS[op][2](*positional(op, x))
    assert len(calls) == 2
    o, _ = OPS[op][2](*positional(op, x))
    assert len(calls) == 3
    o.sum().backward()
    assert len(calls) == 4


def torch_family(op: str):
    """A stand-in for an fla family of `fla_chunk`'s custom ops that runs lmlab's step-by-step PyTorch kernel
    (forward) and its vector-Jacobian product (backward): the ops' plumbing checked on CPU, where fla cannot
    run. (Not the chunk kernel: it recomputes through saved-tensor hooks, which torch.func does not support.)"""
    from lmlab.kernels import fla_chunk

    kernel, gate_names = OPS[op][1], OPS[op][3]

    def run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        gates = {"g": g, "gk": g, "beta": beta}
        return kernel(q, k, v, *(gates[name] for name in gate_names), scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    def forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_size):
        o, state = run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
        A = q.new_zeros(*v.shape[:3], chunk_size, dtype=torch.float32 if op == "gla" else k.dtype)
        # the gate the backward reads: g itself here, where fla's families keep its chunk-local cumulative sum
        # (a copy: an op's outputs may not alias its inputs)
        return o, state, A, None if g is None else g.to(torch.float32, copy=True)

    def backward(q, k, v, g, beta, A, scale, initial_state, do, dht, cu_seqlens, chunk_indices, chunk_size):
        inputs = (q, k, v, g, beta, initial_state)
        present = [i for i, x in enumerate(inputs) if x is not None]

        def outputs(*xs):
            full = list(inputs)
            for i, x in zip(present, xs):
                full[i] = x
            o, state = run(*full[:5], scale, full[5], dht is not None, cu_seqlens)
            return (o, state) if dht is not None else (o,)

        # torch.func, not torch.autograd: inside a custom op's kernel the autograd dispatch key is off
        _, vjp = torch.func.vjp(outputs, *(inputs[i] for i in present))
        grads = dict(zip(present, vjp((do, dht) if dht is not None else (do,))))
        return tuple(grads.get(i) for i in range(len(inputs)))

    spec = fla_chunk.FAMILIES[op]
    return fla_chunk._Family(forward, backward, a_in_float32=spec.a_in_float32, keeps_a=spec.keeps_a)


@pytest.mark.parametrize("op", OPS_COMPILED)
@pytest.mark.parametrize("varlen", [False, True])
def test_fla_chunk_ops_route_gradients_and_compile_in_one_graph(op, varlen, monkeypatch):
    """lmlab's custom ops around fla's chunk kernels (`fla_chunk`), their kernels replaced by PyTorch: the op
    results and every gradient equal the kernel's own, eagerly and compiled with fullgraph=True (no graph
    break inside a block), and torch.library.opcheck accepts the ops (schema, fake shapes, autograd)."""
    pytest.importorskip("fla")
    from lmlab.kernels import fla_chunk

    monkeypatch.setitem(fla_chunk.FAMILIES, op, torch_family(op))
    wrapped = {"gla": fla_chunk.chunk_gla, "delta_rule": fla_chunk.chunk_delta_rule,
               "gated_delta_rule": fla_chunk.chunk_gated_delta_rule, "simple_gla": fla_chunk.chunk_simple_gla}[op]
    B, T, H, K, V = 2, 100, 2, 16, 24
    x, h0, kwargs = make_inputs(op, B, T, H, K, V), torch.randn(B, H, K, V), {}
    if varlen:
        x = {name: t.reshape(1, B * T, *t.shape[2:]) for name, t in x.items()}
        kwargs["cu_seqlens"] = torch.tensor([0, 30, 31, 150, B * T], dtype=torch.int32)
        h0 = torch.randn(4, H, K, V)
    ref = run_with_grads(OPS[op][1], op, x, h0, **kwargs)
    assert_close_all(run_with_grads(wrapped, op, x, h0, **kwargs), ref, 1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(wrapped, fullgraph=True, backend="aot_eager")
    assert_close_all(run_with_grads(compiled, op, x, h0, **kwargs), ref, 1e-6)
    o, state = compiled(*positional(op, x), output_final_state=False, **kwargs)  # no final state, no h0
    assert state is None and torch.allclose(o, OPS[op][1](*positional(op, x), **kwargs)[0], atol=1e-6)
    gates = dict(zip(OPS[op][3], positional(op, x)[3:]))
    args = (op, x["q"], x["k"], x["v"], gates.get("gk", gates.get("g")), gates.get("beta"), 0.25, h0, True,
            kwargs.get("cu_seqlens"))
    torch.library.opcheck(torch.ops.lmlab.fla_chunk_forward, [a.requires_grad_() if a is x["q"] else a for a in args],
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fla_backend_runs_lmlab_ops_around_fla_kernels():
    """The fla backend's chunked kernels are lmlab's custom ops (one compiled graph per block), for all four
    recurrences and GSA."""
    pytest.importorskip("fla")
    import lmlab.models
    from lmlab.kernels import fla_chunk, gsa

    lmlab.models.register()  # importing fla made its classes the Auto classes' choice for these model types
    assert gdr._fla_kernels()[1] is fla_chunk.chunk_gated_delta_rule
    assert gla_mod._fla_kernels()[1] is fla_chunk.chunk_gla
    assert dr._fla_kernels()[1] is fla_chunk.chunk_delta_rule
    assert sgla._fla_kernels()[1] is fla_chunk.chunk_simple_gla
    assert gsa._fla_kernels()[1] is fla_chunk.chunk_gsa


def test_dqkwg_replacements_match_fla_kernel_in_triton_interpreter():
    """lmlab's replacements of fla's Hopper-miscompiled backward kernel (its Triton kernel and the PyTorch
    twin) against that kernel itself, run by Triton's CPU interpreter: dense, a partial last chunk, two key
    blocks, grouped value heads, packed documents, and decays strong enough to overflow exp2 across a partial
    chunk's end (Mamba2's: NaN gradients on an H100 before the padding was masked out of dS)."""
    pytest.importorskip("fla")
    errors_by_case = errors_in_triton_interpreter("fla_interpreter.py")
    assert all(max(errs) < 1e-5 for errs in errors_by_case.values()), errors_by_case


@pytest.mark.slow  # about 20 s: the interpreter runs every Triton program in Python
def test_fla_gla_kernels_match_torch_chunk_in_triton_interpreter():
    """fla's simple-GLA Triton kernels (Mamba2's fast path) and GLA kernels (GLA's and HGRN2's), forward and
    backward through lmlab's custom ops, run by Triton's CPU interpreter against the torch chunk kernels:
    outputs, final states, every gradient, with mild decays and with Mamba2's strongest."""
    pytest.importorskip("fla")
    errors_by_case = errors_in_triton_interpreter("fla_simple_gla_interpreter.py")
    assert all(max(errs) < 1e-5 for errs in errors_by_case.values()), errors_by_case


@pytest.mark.parametrize("size", [64, 48, 1])
def test_unit_lower_inverse_matches_triangular_solve(size):
    A = torch.randn(3, 2, size, size, generator=torch.Generator().manual_seed(0)) * 0.3
    eye = torch.eye(size, dtype=torch.float64).expand(3, 2, size, size)
    ref = torch.linalg.solve_triangular(A.double(), eye, upper=False, unitriangular=True)
    assert rel_err(unit_lower_inverse(A), ref) < 1e-6


def test_gated_delta_chunk_inductor_gradients_match_eager():
    """Inductor-compiled gradients of the chunk kernel over several chunks equal eager ones (a first
    version of the inverse, gathering blocks with `Tensor.diagonal`, compiled to a dk off by 11%)."""
    x = make_inputs("gated_delta_rule", 1, 128, 1, 256, 64, seed=3)
    chunk = OPS["gated_delta_rule"][2]
    ref = run_with_grads(chunk, "gated_delta_rule", x, None)
    assert_close_all(run_with_grads(torch.compile(chunk, fullgraph=True), "gated_delta_rule", x, None), ref, 1e-5)


# ---------------------------------------------------------------------------------------------- GPU
GPU_SHAPES = {  # 340M-like: B, T, H, K, V
    "delta_rule": (2, 2048, 8, 128, 128),
    "gated_delta_rule": (2, 2048, 6, 256, 512),
    "gla": (2, 2048, 4, 128, 256),
    "simple_gla": (2, 2048, 32, 128, 64),  # mamba2_340M: 32 heads, state 128, head dim 64
}


def _fla_or_skip():
    from lmlab.kernels import dispatch

    if dispatch.fla_unavailable_reason() is not None or importlib.util.find_spec("fla") is None:
        pytest.skip(f"fla cannot run here: {dispatch.fla_unavailable_reason() or 'fla is not installed'}")


def _gpu_inputs(op, varlen):
    B, T, H, K, V = GPU_SHAPES[op]
    x = make_inputs(op, B, T, H, K, V, seed=7, device="cuda", dtype=torch.bfloat16)
    h0 = torch.randn(B, H, K, V, device="cuda")
    if not varlen:
        return x, h0, {}
    x = {name: t.reshape(1, B * T, *t.shape[2:]) for name, t in x.items()}
    if op == "gla":  # float32 gates, as the GLA layer passes them (the dense case keeps bf16: both are covered)
        x["gk"] = x["gk"].float()
    cu_seqlens = torch.tensor([0, 100, 1000, 1001, 2048, 3000, B * T], dtype=torch.int32, device="cuda")
    return x, torch.randn(len(cu_seqlens) - 1, H, K, V, device="cuda"), {"cu_seqlens": cu_seqlens}


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("varlen", [False, True])
def test_gpu_fla_matches_torch_chunk(op, varlen):
    """fla's kernels vs the torch chunk kernel, both on bf16 inputs, each against an fp32 torch run.

    Each tensor's error must stay within 1e-2 or twice the torch kernel's own bf16 error, whichever is larger
    (the criterion of the 340M model test); the table is printed (pytest -rA shows it).
    """
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _fla_or_skip()
    dispatch_fn, _, chunk, _ = OPS[op]
    x, h0, kwargs = _gpu_inputs(op, varlen)
    fla_fn = functools.partial(dispatch_fn, backend="fla")
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a true fp32 reference (no TF32)
    try:
        ref = run_with_grads(chunk, op, {name: t.float() for name, t in x.items()}, h0, **kwargs)
    finally:
        torch.set_float32_matmul_precision(precision)
    torch_bf16 = run_with_grads(chunk, op, x, h0, **kwargs)
    fla_errors, torch_errors = errors(run_with_grads(fla_fn, op, x, h0, **kwargs), ref), errors(torch_bf16, ref)
    print(op, "varlen" if varlen else "", {k: f"fla {fla_errors[k]:.1e} / torch {torch_errors[k]:.1e}"
                                          for k in fla_errors})
    assert all(fla_errors[k] < max(1e-2, 2 * torch_errors[k]) for k in fla_errors), (fla_errors, torch_errors)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("varlen", [False, True])
def test_gpu_torch_chunk_matches_recurrent(op, varlen):
    """The torch backend on CUDA (bf16 inputs, fp32 inside) against the step-by-step reference in fp32."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dispatch_fn, recurrent, _, _ = OPS[op]
    x, h0, kwargs = _gpu_inputs(op, varlen)
    x = {name: t[:, :512] for name, t in x.items()}  # keeps the step-by-step reference's loop short
    if varlen:
        kwargs["cu_seqlens"] = torch.tensor([0, 100, 300, 301, 512], dtype=torch.int32, device="cuda")
        h0 = h0[:4]
    ref = run_with_grads(recurrent, op, {n: t.float() for n, t in x.items()}, h0, **kwargs)
    got = run_with_grads(lambda *a, **kw: dispatch_fn(*a, backend="torch", **kw), op, x, h0, **kwargs)
    assert got[0].dtype == torch.bfloat16
    assert_close_all(got, ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_chunk_compiles(op):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, _, chunk, _ = OPS[op]
    x, h0, _ = _gpu_inputs(op, varlen=False)
    compiled = torch.compile(chunk, fullgraph=True)
    ref = run_with_grads(chunk, op, x, h0)
    assert_close_all(run_with_grads(compiled, op, x, h0), ref, 1e-2)
