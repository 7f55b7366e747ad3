"""Local attention (the HQLT KV-memory): the blocked implementation against the explicit reference (CPU)."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import errors_in_triton_interpreter
from torch.utils._python_dispatch import TorchDispatchMode

import lmlab.kernels.local_attention as local_attention_module
from lmlab.kernels import dispatch
from lmlab.kernels.attention import attention_reference
from lmlab.kernels.local_attention import (
    _window_tiles,
    local_attention,
    local_attention_flex,
    local_attention_reference,
)


def qkv(B=2, Tq=37, Tk=37, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda T: torch.randn(B, T, H, D, generator=g).requires_grad_()  # noqa: E731
    return make(Tq), make(Tk), make(Tk)


def doc_positions(*lengths):
    """Positions of a row of packed documents (restarting at 0 at each document); padding is a run of 0s."""
    return torch.cat([torch.arange(n) for n in lengths])


def outputs_and_grads(fn, q, k, v, q_pos, k_pos, **kw):
    out = fn(q, k, v, q_pos, k_pos, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_matches_reference(q, k, v, q_pos, k_pos, **kw):
    got = outputs_and_grads(local_attention, q, k, v, q_pos, k_pos, **kw)
    want = outputs_and_grads(local_attention_reference, q, k, v, q_pos, k_pos, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")  # noqa: B023


# Rows of 37 tokens (blocks of 16 or 32 queries: the last block is partial); "cut" rows start inside a
# document (a cache that kept only its latest keys).
LAYOUTS = {
    "plain": [torch.arange(37), torch.arange(37)],
    "packed": [doc_positions(5, 12, 20), doc_positions(1, 30, 6)],
    "cut": [torch.arange(50, 87), torch.cat([torch.arange(3, 13), torch.arange(27)])],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("Tq", [37, 21, 1])
@pytest.mark.parametrize("window", [1, 3, 8, 20])
@pytest.mark.parametrize("chunked", [False, True])
def test_matches_reference(chunked, window, Tq, layout):
    """Outputs and gradients; Tq < 37: the queries are the last Tq keys (a cache before them), their
    positions continue the cache's."""
    k_pos = torch.stack(LAYOUTS[layout])
    q, k, v = qkv(Tq=Tq)
    assert_matches_reference(q, k, v, k_pos[:, -Tq:], k_pos, window=window, chunked=chunked)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # uncompiled on purpose
@pytest.mark.parametrize("window, chunked, Tq", [(20, False, 300), (150, True, 300), (150, False, 45), (20, True, 1)])
def test_flex_matches_reference(window, chunked, Tq):
    """The FlexAttention backend's in-kernel mask, forward (run uncompiled on CPU, where flex attention has no
    backward and ignores the block mask: gradients and tiles are the GPU tests' and the next test's): rows of
    300 keys over three 128-key tiles, packed documents, queries continuing a cache."""
    k_pos = torch.stack([doc_positions(100, 7, 193), torch.cat([torch.arange(40, 200), torch.arange(140)])])
    q, k, v = (t.detach() for t in qkv(Tq=Tq, Tk=300, D=16))
    args = (q, k, v, k_pos[:, -Tq:], k_pos)
    torch.testing.assert_close(local_attention_flex(*args, window=window, chunked=chunked),
                               local_attention_reference(*args, window=window, chunked=chunked), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Tq, Tk", [(300, 300), (45, 300), (1, 300), (1, 1), (700, 700), (100, 1100)])
@pytest.mark.parametrize("window", [1, 20, 64, 150, 1024])
def test_flex_tiles_cover_the_window_and_little_more(window, Tk, Tq):
    """The block mask lists every 128 x 128 tile holding a (query, key) pair within the window, and at most
    one tile more per query tile than the window's span needs."""
    tiles = _window_tiles(Tq, Tk, window, lambda b, h, q, k: q >= 0, torch.device("cpu")).to_dense()[0, 0]
    distance = torch.arange(Tk - Tq, Tk)[:, None] - torch.arange(Tk)
    in_window = ((distance >= 0) & (distance < window)).float()
    needed = torch.nn.functional.max_pool2d(in_window[None], 128, ceil_mode=True)[0] > 0
    assert tiles.shape == needed.shape and not (needed & (tiles == 0)).any()
    assert (tiles.sum(-1) <= needed.sum(-1) + 1).all()


@pytest.mark.parametrize("chunked", [False, True])
def test_positions_broadcast_over_the_batch(chunked):
    q, k, v = qkv(Tq=30)
    k_pos = doc_positions(4, 33)[None]
    assert_matches_reference(q, k, v, k_pos[:, -30:], k_pos, window=5, chunked=chunked, scale=0.3)


@pytest.mark.parametrize("window", [3, 8])
@pytest.mark.parametrize("chunked", [False, True])
def test_left_padding_leaves_the_real_tokens_unchanged(chunked, window):
    """A row left-padded with 6 tokens (positions 0) gives its real tokens the outputs of the row alone."""
    q, k, v = qkv(B=1, Tq=26, Tk=26)
    padded_pos = doc_positions(1, 1, 1, 1, 1, 1, 20)[None]
    assert_matches_reference(q, k, v, padded_pos, padded_pos, window=window, chunked=chunked)
    padded = local_attention(q, k, v, padded_pos, padded_pos, window=window, chunked=chunked)
    pos = torch.arange(20)[None]
    alone = local_attention(q[:, 6:], k[:, 6:], v[:, 6:], pos, pos, window=window, chunked=chunked)
    torch.testing.assert_close(padded[:, 6:], alone)


@pytest.mark.parametrize("Tq", [37, 5])
@pytest.mark.parametrize("window", [1, 6, 40])
def test_sliding_equals_attention_window(window, Tq):
    """On a plain row the sliding mode is lmlab's sliding-window attention."""
    q, k, v = (t.detach() for t in qkv(Tq=Tq))
    k_pos = torch.arange(37)[None]
    torch.testing.assert_close(local_attention(q, k, v, k_pos[:, -Tq:], k_pos, window=window),
                               attention_reference(q, k, v, window_size=window), atol=1e-5, rtol=1e-5)


def test_chunked_sees_only_its_chunk():
    """With chunks of 4 positions the query at position 5 sees positions 4 and 5 only: keys elsewhere
    change nothing."""
    q, k, v = (t.detach() for t in qkv(B=1, Tq=8, Tk=8))
    pos = torch.arange(8)[None]
    out = local_attention(q, k, v, pos, pos, window=4, chunked=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, [0, 1, 2, 3, 6, 7]], v2[:, [0, 1, 2, 3, 6, 7]] = 3.0, 3.0
    torch.testing.assert_close(local_attention(q, k2, v2, pos, pos, window=4, chunked=True)[:, 5], out[:, 5])


@pytest.mark.parametrize("chunked", [False, True])
def test_bf16_close_to_fp32(chunked):
    q, k, v = (t.detach() for t in qkv(Tq=37))
    k_pos = torch.stack(LAYOUTS["packed"])
    out = local_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), k_pos, k_pos, window=8, chunked=chunked)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    torch.testing.assert_close(out.float(), local_attention(q, k, v, k_pos, k_pos, window=8, chunked=chunked),
                               atol=2e-2, rtol=2e-2)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_work_grows_with_tokens_times_window():
    """No [T, T] scores or mask, forward or backward: every tensor stays below T * T at T = 1024."""
    T, B, H, D = 1024, 1, 1, 4
    q, k, v = qkv(B=B, Tq=T, Tk=T, H=H, D=D)
    pos = torch.arange(T)[None]
    with _LargestTensor() as largest:
        local_attention(q, k, v, pos, pos, window=8).sum().backward()
    assert largest.numel < T * T // 16


@pytest.mark.slow  # ~20 s on CPU: inductor compiles C++
def test_compiled_matches_eager():
    q, k, v = (t.detach() for t in qkv(Tq=21))
    k_pos = torch.stack(LAYOUTS["packed"])
    args = (q, k, v, k_pos[:, -21:], k_pos)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(local_attention, fullgraph=True)
        torch.testing.assert_close(compiled(*args, window=8, chunked=True),
                                   local_attention(*args, window=8, chunked=True))
    finally:
        torch._dynamo.reset()


def test_triton_matches_reference_in_interpreter():
    """lmlab's Triton kernel (the CUDA path for windows <= 64) against the reference, run by Triton's CPU
    interpreter through `local_attention`: W = 1, 7, 20, 64, packed documents across block borders, two rows
    with their own positions, Delayed-Chunk's chunks, left padding, a last partial block, fewer tokens than
    a block; output and the gradients of q, k and v in float32."""
    errors_by_case = errors_in_triton_interpreter("local_attention_triton_interpreter.py")
    assert all(max(errs) < 1e-5 for errs in errors_by_case.values()), errors_by_case


@pytest.mark.parametrize("chunked", [False, True])
def test_triton_op_traces_with_fake_tensors(chunked):
    """What torch.compile sees of the Triton ops (fake tensors, no kernel runs): output and gradient shapes
    and dtypes in bf16, as in training."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmlab.kernels.local_attention_triton import local_attention_triton

    with FakeTensorMode():
        q, k, v = (torch.randn(2, 130, 4, 64, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        pos = torch.arange(130)[None]
        out = local_attention_triton(q, k, v, pos, pos, window=64, chunked=chunked)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert all(g.shape == q.shape and g.dtype == torch.bfloat16 for g in grads)


@pytest.mark.parametrize("backend", ["triton", None])
def test_triton_runs_only_where_it_fits(monkeypatch, backend):
    """With the kernel available (health check lifted, the kernel recorded instead of run), auto and a request
    by name take it for windows <= 64 with as many queries as keys; longer windows and decoding steps run the
    other path without a warning or an error (a model's request covers all its calls)."""
    monkeypatch.setitem(dispatch._health_checks["local_attention"], "triton", lambda x: None)
    calls = []
    monkeypatch.setattr(local_attention_module, "local_attention_triton",
                        lambda *a, window, **kw: calls.append(window) or local_attention_reference(*a, window=window,
                                                                                               **kw))
    q, k, v = (t.detach() for t in qkv(B=1, Tq=70, Tk=70, D=16))
    pos = torch.arange(70)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = local_attention(q, k, v, pos, pos, window=64, backend="torch")
        torch.testing.assert_close(local_attention(q, k, v, pos, pos, window=64, backend=backend), want)
        local_attention(q, k, v, pos, pos, window=65, backend=backend)
        local_attention(q[:, -1:], k, v, pos[:, -1:], pos, window=8, backend=backend)
    assert calls == [64]


@pytest.mark.parametrize("change, match", [
    (dict(q=torch.zeros(2, 5, 2)), "expected q"),
    (dict(k=torch.zeros(2, 9, 3, 8)), "expected q"),
    (dict(q=torch.zeros(2, 10, 2, 8), q_positions=torch.zeros(2, 10, dtype=torch.long)), "more queries"),
    (dict(window=0), "window must be"),
    (dict(q_positions=torch.zeros(3, 5, dtype=torch.long)), "q_positions must be"),
    (dict(k_positions=torch.zeros(2, 8, dtype=torch.long)), "k_positions must be"),
    (dict(k_positions=torch.zeros(2, 9)), "integer"),
])
def test_bad_inputs(change, match):
    args = dict(q=torch.zeros(2, 5, 2, 8), k=torch.zeros(2, 9, 2, 8), v=torch.zeros(2, 9, 2, 8),
                q_positions=torch.zeros(2, 5, dtype=torch.long),
                k_positions=torch.zeros(1, 9, dtype=torch.long), window=3) | change
    for fn in (local_attention, local_attention_reference):
        with pytest.raises(ValueError, match=match):
            fn(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("window, chunked", [(64, False), (64, True), (1024, False)])
def test_gpu_flex_matches_sdpa(window, chunked):
    """The FlexAttention backend (compiled; tiles and in-kernel mask) against the blocked SDPA one at an HQLT
    340M layer's size in bf16, packed documents: outputs and gradients within 1e-2."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2048, 8, 128, generator=g).cuda().bfloat16().requires_grad_() for _ in range(3))
    pos = torch.stack([doc_positions(700, 1, 1347), doc_positions(2048)]).cuda()
    got = outputs_and_grads(lambda *a: local_attention(*a, window=window, chunked=chunked, backend="flex"),
                            q, k, v, pos, pos)
    want = outputs_and_grads(lambda *a: local_attention(*a, window=window, chunked=chunked, backend="torch"),
                             q, k, v, pos, pos)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.gpu
def test_gpu_inference_attention_leaves_cudnn_out():
    """Without gradients, local and full attention on CUDA run no cuDNN kernel (cuDNN plans each new shape
    anew, and evaluation's shapes change at nearly every batch); the output is the one with gradients on."""
    from lmlab.kernels.attention import attention

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 300, 8, 128, generator=g).cuda().bfloat16() for _ in range(3))
    pos = torch.arange(300, device="cuda")[None]
    calls = {"local": lambda: local_attention(q, k, v, pos, pos, window=64, backend="torch"),
             "full": lambda: attention(q, k, v, backend="torch")}
    for name, call in calls.items():
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            without_grad = call()
        assert not [e.key for e in prof.key_averages() if "cudnn" in e.key.lower()], name
        err = ((without_grad.float() - call().float()).norm() / call().float().norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_gpu_triton_matches_sdpa(chunked, compiled):
    """lmlab's Triton kernel against the blocked SDPA path at an HQLT 340M layer's size (W = 64) in bf16,
    packed documents, eager and inside torch.compile (one graph): outputs and gradients within 1e-2."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2048, 8, 128, generator=g).cuda().bfloat16().requires_grad_() for _ in range(3))
    pos = torch.stack([doc_positions(700, 1, 1347), doc_positions(2048)]).cuda()
    fn = lambda *a: local_attention(*a, window=64, chunked=chunked, backend="triton")  # noqa: E731
    got = outputs_and_grads(torch.compile(fn, fullgraph=True) if compiled else fn, q, k, v, pos, pos)
    want = outputs_and_grads(lambda *a: local_attention(*a, window=64, chunked=chunked, backend="torch"),
                             q, k, v, pos, pos)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.2e}"
