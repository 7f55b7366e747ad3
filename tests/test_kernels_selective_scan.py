"""Mamba's selective scan (lmlab.kernels.selective_scan): chunkwise vs step-by-step, packed documents,
padding, memory kept for backward, one compiled graph.

CPU tests are fp32 on tiny shapes (lmlab's Triton kernel under Triton's interpreter); the `gpu` tests run the
chunkwise and Triton kernels on CUDA at a 340M layer's size.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import errors_in_triton_interpreter
from lmlab.kernels import selective_scan as scan
from test_kernels_recurrent import rel_err, saved_bytes
from test_kernels_varlen_compile import LAYOUTS, T, assert_one_graph, weighted_sum

IMPLS = {"recurrent": scan.selective_scan_recurrent_torch, "chunk16": lambda *a, **k: scan.selective_scan_chunk_torch(
    *a, chunk_size=16, **k), "dispatch": scan.selective_scan}
NAMES = ("u", "delta", "A", "B", "C")


def make_inputs(B: int, T: int, D: int, N: int, *, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """As the layer makes them: Δ = softplus(·) around 1, A = −exp(A_log) with A_log ~ log(1..N) ± noise."""
    gen = torch.Generator().manual_seed(seed)
    A = -(torch.arange(1, N + 1).log() + 0.3 * torch.randn(D, N, generator=gen)).exp()
    x = dict(u=torch.randn(B, T, D, generator=gen), delta=F.softplus(torch.randn(B, T, D, generator=gen)), A=A,
             B=torch.randn(B, T, N, generator=gen), C=torch.randn(B, T, N, generator=gen))
    return {name: t.to(device) for name, t in x.items()}


def positional(x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [x[name] for name in NAMES]


def run_with_grads(fn, x, h0, **kwargs):
    """Output, final state and the gradients of a fixed random loss w.r.t. every input and the state."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
    if h0 is not None:
        leaves["h0"] = h0.detach().clone().requires_grad_()
    y, state = fn(*positional(leaves), initial_state=leaves.get("h0"), output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=gen).to(y.device)).sum()
    (loss + (state * torch.randn(state.shape, generator=gen).to(y.device)).sum()).backward()
    return y, state, {name: t.grad for name, t in leaves.items()}


def assert_close_all(got, ref, tol):
    (y, state, grads), (y_ref, state_ref, grads_ref) = got, ref
    errs = {"y": rel_err(y, y_ref), "state": rel_err(state, state_ref),
            **{f"d{name}": rel_err(grads[name], grads_ref[name]) for name in grads_ref}}
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("backend, T, grad, expected", [
    ("triton", 1, False, "recurrent"), ("triton", 5, False, "triton"), ("triton", 100, False, "triton"),
    ("triton", 1, True, "triton"), ("torch", 5, False, "recurrent"), ("torch", 100, False, "chunk")])
def test_dispatch_picks_the_kernel(monkeypatch, backend, T, grad, expected):
    """Which kernel a call runs: on Triton every call but a single decoding step (a few-token continuation
    from a state must not run the step-by-step Python loop); elsewhere the step-by-step twin for short calls
    without gradients."""
    ran = []
    for name in ("recurrent", "triton", "chunk"):
        attr = f"selective_scan_{name}" + ("" if name == "triton" else "_torch")
        monkeypatch.setattr(scan, attr, lambda *a, name=name, **k: ran.append(name) or (a[0], None))
    monkeypatch.setattr(scan.dispatch, "choose", lambda op, x, requested=None: backend)
    x = {name: t.requires_grad_(grad) for name, t in make_inputs(2, T, 4, 3).items()}
    scan.selective_scan(*positional(x), initial_state=torch.zeros(2, 4, 3))
    assert ran == [expected]


@pytest.mark.parametrize("T,with_h0", [(1, False), (45, True)])
def test_chunk_matches_recurrent(T, with_h0):
    x = make_inputs(2, T, 6, 4)
    h0 = torch.randn(2, 6, 4) if with_h0 else None
    ref = run_with_grads(scan.selective_scan_recurrent_torch, x, h0)
    for chunk_size in (64, 16, 12):  # one chunk, several, and one that is not a power of two
        got = run_with_grads(scan.selective_scan_chunk_torch, x, h0, chunk_size=chunk_size)
        assert_close_all(got, ref, 1e-5)


def test_strong_decay_is_stable():
    """Steps whose decays underflow fp32 inside one chunk (exp(+Δ·|A|·t) would overflow) stay finite."""
    x = make_inputs(1, 70, 4, 4)
    x["delta"] = torch.full_like(x["delta"], 8.0)
    h0 = torch.randn(1, 4, 4)
    got = run_with_grads(scan.selective_scan_chunk_torch, x, h0)
    assert all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2].values()))
    assert_close_all(got, run_with_grads(scan.selective_scan_recurrent_torch, x, h0), 1e-4)


VARLEN_LENGTHS = [5, 40, 0, 1, 20]  # an empty document too; with chunk size 16 several share a chunk


def _varlen_inputs():
    lengths = torch.tensor(VARLEN_LENGTHS)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return make_inputs(1, int(lengths.sum()), 6, 4, seed=3), torch.randn(len(VARLEN_LENGTHS), 6, 4), cu_seqlens


@pytest.mark.parametrize("impl", IMPLS)
def test_varlen_equals_separate_documents(impl):
    x, h0, cu_seqlens = _varlen_inputs()
    for initial in (None, h0):
        y, state = IMPLS[impl](*positional(x), initial_state=initial, output_final_state=True, cu_seqlens=cu_seqlens)
        assert y.shape == x["u"].shape and state.shape == (len(VARLEN_LENGTHS), 6, 4)
        for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            doc = {name: t if name == "A" else t[:, start:end] for name, t in x.items()}
            y_ref, state_ref = scan.selective_scan_recurrent_torch(
                *positional(doc), initial_state=None if initial is None else initial[n:n + 1], output_final_state=True)
            assert rel_err(y[:, start:end], y_ref) < 1e-5 and rel_err(state[n:n + 1], state_ref) < 1e-5


def test_varlen_chunk_gradients_and_rows_as_one_stream():
    x, h0, cu_seqlens = _varlen_inputs()
    ref = run_with_grads(scan.selective_scan_recurrent_torch, x, h0, cu_seqlens=cu_seqlens)
    assert_close_all(run_with_grads(IMPLS["chunk16"], x, h0, cu_seqlens=cu_seqlens), ref, 1e-5)
    rows = {name: t if name == "A" else t.view(2, 33, *t.shape[2:]) for name, t in x.items()}
    y, state = scan.selective_scan(*positional(rows), initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    assert rel_err(y.reshape(ref[0].shape), ref[0]) < 1e-5 and rel_err(state, ref[1]) < 1e-5


@pytest.mark.parametrize("varlen", [False, True])
def test_chunk_keeps_its_inputs_and_chunk_states_for_backward(varlen):
    """Backward keeps the inputs and one [D, N] state per chunk, recomputing the rest chunk by chunk: not the
    [B, T, D, N] decays, inputs and states (fla's PyTorch path: out of memory at 340M, 8 x 2048 tokens)."""
    x = {name: t.requires_grad_() for name, t in make_inputs(1, 512, 64, 16).items()}
    cu_seqlens = torch.tensor([0, 100, 512], dtype=torch.int32) if varlen else None
    h0 = torch.randn(2 if varlen else 1, 64, 16, requires_grad=True)
    inputs = sum(t.numel() * t.element_size() for t in (*x.values(), h0))
    chunk_states = 512 // scan.CHUNK_SIZE * h0[0].numel() * 4
    saved = saved_bytes(lambda: scan.selective_scan_chunk_torch(*positional(x), initial_state=h0,
                                                                 output_final_state=True, cu_seqlens=cu_seqlens))
    assert saved <= 1.1 * (inputs + chunk_states) < 0.25 * 512 * 64 * 16 * 4, (saved, inputs)


def test_padding_is_inert():
    """Left padding with u = Δ = 0 (what the layer passes) leaves the state and later outputs unchanged."""
    x = make_inputs(1, 30, 4, 4, seed=5)
    h0 = torch.randn(1, 4, 4)
    padded = {name: t if name == "A" else torch.cat([torch.zeros_like(t[:, :20]), t], 1) for name, t in x.items()}
    padded["B"][:, :20], padded["C"][:, :20] = torch.randn(2, 1, 20, 4)  # garbage where nothing is read
    for fn in (scan.selective_scan_recurrent_torch, IMPLS["chunk16"]):
        y, state = fn(*positional(x), initial_state=h0, output_final_state=True)
        y_pad, state_pad = fn(*positional(padded), initial_state=h0, output_final_state=True)
        assert rel_err(y_pad[:, 20:], y) < 1e-6 and rel_err(state_pad, state) < 1e-6


def test_varlen_is_one_graph():
    x = make_inputs(1, T, 6, 4)
    h0 = torch.randn(len(LAYOUTS[0]) - 1, 6, 4)

    def loss(h0, *inputs_and_cu):
        *inputs, cu_seqlens = inputs_and_cu
        return weighted_sum(*scan.selective_scan_chunk_torch(*inputs, initial_state=h0, output_final_state=True,
                                                             cu_seqlens=cu_seqlens, chunk_size=8))

    assert_one_graph(loss, [h0, *positional(x)])


def test_bad_shapes_are_one_line_errors():
    x = make_inputs(1, 5, 6, 4)
    with pytest.raises(ValueError, match=r"A \[D,N\] with D = 6"):
        scan.selective_scan(x["u"], x["delta"], x["A"][:3], x["B"], x["C"])
    with pytest.raises(ValueError, match=r"initial state \[1,6,4\]"):
        scan.selective_scan(*positional(x), initial_state=torch.zeros(2, 6, 4))


@pytest.mark.slow
def test_triton_matches_recurrent_in_interpreter():
    """lmlab's Triton selective scan (the CUDA training path) against the step-by-step kernel, run by Triton's
    CPU interpreter through `selective_scan`: dense rows and packed documents (empty ones, documents of 1 token,
    one chunk -1, 0 and +1 tokens, ending mid-chunk, several chunks per backward program), with and without
    initial states and final-state gradients, partial channel blocks, N = 3, strong decays; y, final states
    and the gradients of u, Δ, A, B, C and the initial states."""
    errors_by_case = errors_in_triton_interpreter("selective_scan_triton_interpreter.py")
    assert all(max(errs) < 1e-5 for errs in errors_by_case.values()), errors_by_case


@pytest.mark.parametrize("varlen", [False, True])
def test_triton_op_traces_with_fake_tensors(varlen):
    """What torch.compile sees of the Triton ops (traced with fake tensors, no kernel runs): the shapes and
    dtypes of y, the final states and every gradient, bf16 inputs as in training."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmlab.kernels.selective_scan_triton import selective_scan_triton

    x = {name: t.to(torch.bfloat16) if name in ("u", "B", "C") else t for name, t in make_inputs(2, 10, 8, 4).items()}
    with FakeTensorMode() as mode:
        leaves = {name: mode.from_tensor(t).requires_grad_() for name, t in x.items()}
        h0 = mode.from_tensor(torch.randn(3 if varlen else 2, 8, 4)).requires_grad_()
        cu_seqlens = mode.from_tensor(torch.tensor([0, 7, 12, 20], dtype=torch.int32)) if varlen else None
        y, state = selective_scan_triton(*positional(leaves), initial_state=h0, output_final_state=True,
                                         cu_seqlens=cu_seqlens)
        (y.float().sum() + state.sum()).backward()
    assert (y.shape, y.dtype, state.shape, state.dtype) == ((2, 10, 8), torch.bfloat16, h0.shape, torch.float32)
    assert all((t.grad.shape, t.grad.dtype) == (t.shape, t.dtype) for t in (*leaves.values(), h0))


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True])
def test_gpu_chunk_matches_recurrent(varlen):
    """The chunkwise kernel on CUDA (fp32) against the step-by-step one: outputs, states, gradients."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    x = make_inputs(1, 300, 64, 16, device="cuda")
    cu_seqlens = torch.tensor([0, 37, 200, 300], dtype=torch.int32, device="cuda") if varlen else None
    h0 = torch.randn(3 if varlen else 1, 64, 16, device="cuda")
    ref = run_with_grads(scan.selective_scan_recurrent_torch, x, h0, cu_seqlens=cu_seqlens)
    assert_close_all(run_with_grads(scan.selective_scan_chunk_torch, x, h0, cu_seqlens=cu_seqlens), ref, 1e-5)


def layer_inputs(B: int, T: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A mamba_340M layer's scan inputs on CUDA (D = expand 2 x hidden 1024, N = state_size 16): u, B and C
    in `dtype` (the conv's and x_proj's outputs under autocast), Δ and A in float32 (as the layer makes them)."""
    return {name: t.to(dtype if name in ("u", "B", "C") else torch.float32)
            for name, t in make_inputs(B, T, 2048, 16, device="cuda").items()}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_340m_layer_scan_memory_is_bounded(backend):
    """A mamba_340M layer's scan at 8 x 2048 tokens (D = 2048, N = 16), bf16 inputs, forward + backward: the
    peak stays below 1.5 [B, T, D, N] float32 tensors (2 GiB each; fla's PyTorch path keeps four per layer)."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    x = {name: t.requires_grad_() for name, t in layer_inputs(8, 2048, torch.bfloat16).items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y, _ = scan.selective_scan(*positional(x), backend=backend)
    y.float().square().mean().backward()
    peak = torch.cuda.max_memory_allocated() - base
    print(f"{backend}: peak above inputs: {peak / 2**30:.2f} GiB")
    assert peak < 3 * 2**30 and all(torch.isfinite(t.grad).all() for t in x.values())


def triton_scan(*args, **kwargs):
    return scan.selective_scan(*args, backend="triton", **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("varlen", [False, True], ids=["rows", "varlen"])
def test_gpu_triton_matches_chunk_torch(varlen, dtype, compiled):
    """lmlab's Triton scan against the PyTorch chunk kernel at a 340M layer's size (2 x 2048 tokens), with
    initial states: y, final states, every gradient; eager and under torch.compile(fullgraph=True)."""
    from test_kernels_basic import gpu_cu_seqlens

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    x = layer_inputs(2, 2048, dtype)
    cu_seqlens = gpu_cu_seqlens() if varlen else None
    h0 = torch.randn(2 if cu_seqlens is None else len(cu_seqlens) - 1, 2048, 16, device="cuda")
    fn = torch.compile(triton_scan, fullgraph=True) if compiled else triton_scan
    ref = run_with_grads(lambda *a, **k: scan.selective_scan(*a, backend="torch", **k), x, h0, cu_seqlens=cu_seqlens)
    assert_close_all(run_with_grads(fn, x, h0, cu_seqlens=cu_seqlens), ref, 1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_gpu_triton_speed_and_memory_against_chunk_torch():
    """Prints the forward and backward times and the peak memory of a mamba_340M layer's scan at 8 x 2048 tokens,
    bf16, for the Triton kernel and the PyTorch chunk kernel, both eager (compiling the PyTorch one at this size
    took over 100 s); the Triton one must be faster and need no more memory."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    x = {name: t.requires_grad_() for name, t in layer_inputs(8, 2048, torch.bfloat16).items()}
    dy = torch.randn_like(x["u"])
    peaks, times = {}, {}
    for backend, repeats in (("torch", 2), ("triton", 20)):
        scan.selective_scan(*positional(x), backend=backend)[0].backward(dy)  # warm up (Triton: compile)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(repeats)]
        for start, middle, end in events:
            start.record()
            y = scan.selective_scan(*positional(x), backend=backend)[0]
            middle.record()
            y.backward(dy)
            end.record()
        torch.cuda.synchronize()
        peaks[backend] = torch.cuda.max_memory_allocated() - base
        forward = sorted(start.elapsed_time(middle) for start, middle, _ in events)[repeats // 2]  # medians
        backward = sorted(middle.elapsed_time(end) for _, middle, end in events)[repeats // 2]
        times[backend] = forward + backward
        print(f"{backend}: forward {forward:.2f} ms, backward {backward:.2f} ms, "
              f"peak {peaks[backend] / 2**30:.2f} GiB above inputs")
    assert peaks["triton"] <= peaks["torch"] and times["triton"] < times["torch"], (peaks, times)
