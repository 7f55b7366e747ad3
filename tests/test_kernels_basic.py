"""The non-recurrent kernels: PyTorch paths against explicit references (CPU), accelerated backends
against the PyTorch paths (GPU, `pytest -m gpu`)."""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import errors_in_triton_interpreter
from lmlab.errors import UserError
from lmlab.kernels import attention as attention_module
from lmlab.kernels import dispatch
from lmlab.kernels.activations import swiglu
from lmlab.kernels.attention import attention, attention_reference
from lmlab.kernels.conv import short_conv
from lmlab.kernels.loss import linear_cross_entropy
from lmlab.kernels.norm import gated_rms_norm, rms_norm


def qkv(B=2, Tq=9, Tk=9, H=4, Hkv=2, D=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda T, h: torch.randn(B, T, h, D, generator=g).to(device, dtype)  # noqa: E731
    return make(Tq, H), make(Tk, Hkv), make(Tk, Hkv)


def cu(*lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# ---------------------------------------------------------------- attention (CPU)

@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_reference(Hkv, causal):
    q, k, v = qkv(Hkv=Hkv)
    torch.testing.assert_close(attention(q, k, v, causal=causal), attention_reference(q, k, v, causal=causal))


def test_attention_causal_is_causal():
    q, k, v = qkv(B=1, Tq=8, Tk=8)
    o = attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:], v2[:, 5:] = 7.0, 7.0
    torch.testing.assert_close(attention(q, k2, v2)[:, :5], o[:, :5])


def test_attention_decoding_aligns_queries_to_last_keys():
    q, k, v = qkv(Tq=10, Tk=10)
    full = attention(q, k, v)
    for Tq in (1, 3):
        out = attention(q[:, -Tq:], k, v)
        torch.testing.assert_close(out, full[:, -Tq:])
        torch.testing.assert_close(out, attention_reference(q[:, -Tq:], k, v))


@pytest.mark.parametrize("Tq", [12, 4, 1])
def test_attention_window(Tq):
    q, k, v = qkv(Tq=Tq, Tk=12)
    out = attention(q, k, v, window_size=3)
    torch.testing.assert_close(out, attention_reference(q, k, v, window_size=3))
    # The last query (position 11) sees keys 9, 10, 11: changing key 8 changes nothing, key 9 does.
    outside, inside = k.clone(), k.clone()
    outside[:, 8] += 5.0
    inside[:, 9] += 5.0
    torch.testing.assert_close(attention(q, outside, v, window_size=3)[:, -1], out[:, -1])
    assert not torch.allclose(attention(q, inside, v, window_size=3)[:, -1], out[:, -1])


def test_attention_window_covering_all_keys_is_causal_attention(monkeypatch):
    """A window as long as the keys (Samba's 2048 at 2048-token rows) takes causal attention's unmasked path."""
    q, k, v = qkv(Tq=12, Tk=12)
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, attn_mask=None, **kwargs: masks.append(attn_mask) or sdpa(*args, attn_mask=attn_mask,
                                                                                               **kwargs))
    out = attention(q, k, v, window_size=12)
    assert masks == [None]
    torch.testing.assert_close(out, attention_reference(q, k, v, window_size=12))


def test_attention_window_restricts_exactly():
    q, k, v = qkv(B=1, Tq=8, Tk=8)
    out = attention(q, k, v, window_size=3)
    k2 = k.clone()
    k2[:, 4] = 9.0  # position 4 is in the windows of queries 4, 5, 6 only
    changed = (attention(q, k2, v, window_size=3) - out).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.tolist() == [False] * 4 + [True] * 3 + [False]


def test_attention_left_padding():
    q, k, v = qkv(B=2, Tq=7, Tk=7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # row 1: three padding tokens on the left
    out = attention(q, k, v, attention_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention_reference(q, k, v, attention_mask=mask))
    torch.testing.assert_close(out[1, 3:], attention(q[1:, 3:], k[1:, 3:], v[1:, 3:])[0])
    torch.testing.assert_close(out[0], attention(q[:1], k[:1], v[:1])[0])
    assert (out[1, :3] == 0).all()
    # padding keys are never seen, whatever they hold
    k2 = k.clone()
    k2[1, :3] = 100.0
    torch.testing.assert_close(attention(q, k2, v, attention_mask=mask), out)


def test_attention_left_padding_decoding_and_grads():
    q, k, v = qkv(B=2, Tq=2, Tk=6)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    q.requires_grad_(True)
    out = attention(q, k, v, attention_mask=mask, window_size=3)
    torch.testing.assert_close(out, attention_reference(q, k, v, attention_mask=mask, window_size=3))
    torch.testing.assert_close(out[1], attention(q[1:], k[1:, 2:], v[1:, 2:], window_size=3)[0])
    out = attention(q, k, v, attention_mask=torch.zeros_like(mask))  # only padding: zeros, finite grads
    out.sum().backward()
    assert (out == 0).all() and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("lengths", [(3, 6, 3, 4, 2, 6), (5, 1, 7, 3)])
@pytest.mark.parametrize("window_size", [None, 2])
def test_attention_varlen_equals_per_document(lengths, window_size):
    T = sum(lengths)
    q, k, v = qkv(B=1, Tq=T, Tk=T)
    cu_seqlens = cu(*lengths)
    out = attention(q, k, v, cu_seqlens=cu_seqlens, window_size=window_size)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        s = slice(start, end)
        torch.testing.assert_close(out[:, s], attention(q[:, s], k[:, s], v[:, s], window_size=window_size))
    expected = attention_reference(q, k, v, cu_seqlens=cu_seqlens, window_size=window_size)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("causal,window_size", [(True, None), (True, 3), (False, None)])
def test_attention_varlen_rows_and_query_blocks(monkeypatch, causal, window_size):
    """Rows of one packed stream attend as the [1, B*T] stream, also when the queries are cut in blocks
    (of 5, across documents); a document crossing a row is refused."""
    monkeypatch.setattr(attention_module, "_PACKED_BLOCK", 5)
    q, k, v = qkv(B=1, Tq=24, Tk=24)
    cu_seqlens = cu(3, 9, 5, 7)  # 12, the row start, is a boundary
    kwargs = dict(causal=causal, window_size=window_size, cu_seqlens=cu_seqlens)
    expected = attention_reference(q, k, v, **kwargs)
    torch.testing.assert_close(attention(q, k, v, **kwargs), expected)
    rows = [t.view(2, 12, *t.shape[2:]) for t in (q, k, v)]
    torch.testing.assert_close(attention(*rows, **kwargs).view(q.shape), expected)
    torch.testing.assert_close(attention_reference(*rows, **kwargs).reshape(q.shape), expected)
    with pytest.raises(RuntimeError, match="crosses a row"):
        attention(*rows, causal=causal, window_size=window_size, cu_seqlens=cu(3, 10, 11))


def test_attention_validates_inputs():
    q, k, v = qkv(H=3, Hkv=2)
    with pytest.raises(ValueError):
        attention(q, k, v)
    q, k, v = qkv(Tq=5, Tk=4)
    with pytest.raises(ValueError):
        attention(q, k, v)
    with pytest.raises(UserError):
        attention(*qkv(), backend="flash")  # not on CPU


def _flash_attn_stand_in(monkeypatch):
    """A `flash_attn` module written from flash-attn 2's documented semantics (bottom-right causal mask,
    window (left, right) in keys, GQA by head groups, varlen over flattened tokens), by explicit masks:
    the GPU image cannot install the real one, so this pins lmlab's argument translation on CPU."""
    import sys
    import types

    def dense(q, k, v, softmax_scale, causal, window_size):
        Tq, Tk = q.shape[1], k.shape[1]
        k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
        i = torch.arange(Tq)[:, None] + Tk - Tq  # each query's aligned key position
        j = torch.arange(Tk)[None, :]
        left, right = window_size
        allowed = torch.ones(Tq, Tk, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
        return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and max_q == int(cu_q.diff().max())
        docs = [dense(q[None, a:b], k[None, c:d], v[None, c:d], softmax_scale, causal, window_size)[0]
                for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])]
        return torch.cat(docs)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func = dense, varlen
    monkeypatch.setitem(sys.modules, "flash_attn", module)


@pytest.mark.parametrize("case", ["causal", "full", "gqa", "window", "varlen", "varlen-window", "decode"])
def test_flash_attention_arguments_match_sdpa(case, monkeypatch):
    _flash_attn_stand_in(monkeypatch)
    q, k, v = qkv(B=1 if "varlen" in case else 2, Tq=24, Tk=24, Hkv=1 if case == "gqa" else 4)
    if case == "decode":
        q = q[:, -3:]
    kwargs = dict(causal=case != "full", window_size=5 if "window" in case else None,
                  cu_seqlens=cu(7, 1, 16) if "varlen" in case else None, scale=0.3)
    expected = attention(q, k, v, backend="torch", **kwargs)
    flash = attention_module._flash_attention(q, k, v, kwargs["causal"], kwargs["window_size"],
                                              kwargs["cu_seqlens"], kwargs["scale"])
    torch.testing.assert_close(flash, expected)


# ---------------------------------------------------------------- short conv (CPU)

def conv_inputs(B=2, T=11, D=6, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g), torch.randn(D, 1, W, generator=g), torch.randn(D, generator=g)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_short_conv_keeps_only_its_input_for_backward(compiled, packed):
    """Training keeps x (bf16) and the weight for the convolution's backward, not its float32 sums (which
    took 4x x's bytes under inductor, 10x eager)."""
    x = torch.randn(4, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32, 1, 4, requires_grad=True)
    fn = lambda x, weight, cu_seqlens: short_conv(x, weight, cu_seqlens=cu_seqlens, backend="torch")[0]  # noqa: E731
    fn = torch.compile(fn) if compiled else fn
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x, weight, cu(30, 0, 100, 126) if packed else None)
    y.float().sum().backward()
    assert sum(saved) < 1.1 * x.numel() * x.element_size(), saved


def test_triton_short_conv_matches_torch_in_interpreter():
    """lmlab's Triton short convolution (the CUDA training path) against the PyTorch version, run by Triton's
    CPU interpreter through `short_conv`: dense rows and packed documents, with and without bias and
    activation, a strided input, W=3, partial token and channel blocks; forward, final state and
    gradients."""
    errors_by_case = errors_in_triton_interpreter("conv_triton_interpreter.py")
    assert all(max(errs) < 1e-5 for errs in errors_by_case.values()), errors_by_case


def conv_reference(x, weight, bias, activation):
    W = weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=W - 1, groups=x.shape[-1])[..., :x.shape[1]]
    y = y.transpose(1, 2)
    return F.silu(y) if activation else y


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_short_conv_matches_conv1d(activation, use_bias):
    x, w, b = conv_inputs()
    b = b if use_bias else None
    y, state = short_conv(x, w, b, activation=activation)
    assert state is None
    torch.testing.assert_close(y, conv_reference(x, w, b, activation))


@pytest.mark.parametrize("T", [2, 9])
def test_short_conv_state_layout_and_decoding(T):
    x, w, b = conv_inputs(T=T)
    W = w.shape[-1]
    y_full, state = short_conv(x, w, b, output_final_state=True)
    # The state holds the last W inputs, oldest first (zeros before the start), like fla's cache.
    expected = F.pad(x, (0, 0, W, 0))[:, -W:].transpose(1, 2)
    torch.testing.assert_close(state, expected)
    # Prefill 1 token, then decode one token at a time: equals the full recompute.
    ys, state = [], None
    for t in range(T):
        y, state = short_conv(x[:, t:t + 1], w, b, initial_state=state, output_final_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full)
    # A chunked prefill continues from the state too.
    y1, s1 = short_conv(x[:, :T // 2], w, b, output_final_state=True)
    y2, s2 = short_conv(x[:, T // 2:], w, b, initial_state=s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    torch.testing.assert_close(s2, state)


@pytest.mark.parametrize("with_state", [False, True])
def test_short_conv_varlen_equals_per_document(with_state):
    lengths = (5, 1, 2, 8)
    x, w, b = conv_inputs(B=1, T=sum(lengths))
    W = w.shape[-1]
    cu_seqlens = cu(*lengths)
    states = torch.randn(len(lengths), x.shape[-1], W) if with_state else None
    y, final = short_conv(x, w, b, cu_seqlens=cu_seqlens, initial_state=states, output_final_state=True)
    bounds = cu_seqlens.tolist()
    for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
        init = states[n:n + 1] if with_state else None
        y_doc, s_doc = short_conv(x[:, start:end], w, b, initial_state=init, output_final_state=True)
        torch.testing.assert_close(y[:, start:end], y_doc)
        torch.testing.assert_close(final[n:n + 1], s_doc)


def test_short_conv_varlen_rows():
    """Rows of one packed stream convolve as the [1, B*T] stream."""
    x, w, b = conv_inputs(B=1, T=16)
    states = torch.randn(3, x.shape[-1], w.shape[-1])
    y, final = short_conv(x, w, b, cu_seqlens=cu(5, 3, 8), initial_state=states, output_final_state=True)
    y_rows, final_rows = short_conv(x.view(2, 8, -1), w, b, cu_seqlens=cu(5, 3, 8), initial_state=states,
                                    output_final_state=True)
    torch.testing.assert_close(y_rows.view(y.shape), y)
    torch.testing.assert_close(final_rows, final)


def test_short_conv_gradients():
    x, w, b = conv_inputs(T=6)
    lengths = (2, 4)
    x = x[:1].requires_grad_(True)
    w.requires_grad_(True)
    y, _ = short_conv(x, w, b, cu_seqlens=cu(*lengths))
    y.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (conv_reference(x[:, :2], w, b, "silu").sum() + conv_reference(x[:, 2:], w, b, "silu").sum()).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


# ---------------------------------------------------------------- norms, swiglu (CPU)

def test_norms_and_swiglu():
    g = torch.Generator().manual_seed(0)
    x, gate, up = (torch.randn(3, 5, 16, generator=g) for _ in range(3))
    w = torch.randn(16, generator=g)
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-5), normed)
    torch.testing.assert_close(gated_rms_norm(x, gate, w, 1e-5), normed * gate * torch.sigmoid(gate))
    torch.testing.assert_close(swiglu(gate, up), gate * torch.sigmoid(gate) * up)
    # low precision in, low precision out, statistics in float32
    xb = x.bfloat16()
    assert rms_norm(xb, w, 1e-5).dtype == torch.bfloat16
    torch.testing.assert_close(rms_norm(xb, w, 1e-5).float(), rms_norm(xb.float(), w, 1e-5),
                               rtol=1e-2, atol=1e-2)


def test_per_head_rms_norm_runs_torch_without_gradients(monkeypatch):
    """fla's norm for rows of <= 512 channels compiles anew for every 2048 rows: inference (a new row count
    at nearly every evaluation forward) takes the PyTorch version; training and wide rows keep fla's."""
    # A stand-in for fla's module: importing fla itself would register its model types with transformers
    # over lmlab's for the rest of this test process.
    fake_fla = {name: types.ModuleType(name) for name in ("fla", "fla.modules", "fla.modules.layernorm")}
    fake_fla["fla.modules.layernorm"].rms_norm = lambda x, w, b, eps: x * 1
    for name, module in fake_fla.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(dispatch._health_checks["rms_norm"], "fla", lambda x: None)
    for shape, grad, expected in [((4, 128), False, "torch"), ((4, 128), True, "fla"), ((4, 1024), False, "fla")]:
        x = torch.randn(*shape, requires_grad=grad)
        rms_norm(x, torch.ones(shape[-1]), 1e-6)
        assert dispatch.last_choices()["rms_norm"] == expected, (shape, grad)


# ---------------------------------------------------------------- linear cross entropy (CPU)

@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_size", [None, 7, 64])
def test_linear_cross_entropy_matches_cross_entropy(reduction, chunk_size):
    g = torch.Generator().manual_seed(0)
    N, D, V = 30, 12, 50
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 3, 17, 29]] = -100
    loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=chunk_size)
    (loss * 2.5).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction=reduction)
    (expected * 2.5).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_linear_cross_entropy_edge_cases():
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3, requires_grad=True)
    labels = torch.full((4,), -100)
    loss = linear_cross_entropy(hidden, weight, labels, reduction="mean")
    loss.backward()  # only the weight needs a gradient
    assert loss.item() == 0 and (weight.grad == 0).all()
    with torch.no_grad():
        labels[0] = 2
        expected = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), expected)


def test_chunk_loss_compiled_matches_eager():
    """The per-chunk loss and logits gradient that CUDA runs compiled, against eager, on two chunk lengths
    (the second compiles the dynamic graph the last chunk and evaluation use)."""
    from lmlab.kernels.loss import chunk_loss_and_grad, chunk_loss_compiled

    g = torch.Generator().manual_seed(0)
    for n in (16, 9):
        logits, labels = torch.randn(n, 50, generator=g).bfloat16(), torch.randint(0, 50, (n,), generator=g)
        valid, scale = labels % 3 != 0, torch.tensor(0.25)
        for want_grad in (True, False):
            got, expected = (fn(logits, labels, valid, scale, want_grad)
                             for fn in (chunk_loss_compiled, chunk_loss_and_grad))
            torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- dispatch

def test_dispatch_priority_and_requests(monkeypatch):
    monkeypatch.setattr(dispatch, "_health_checks", {})
    x = torch.zeros(1)
    dispatch.register_health_check("op", lambda x: "broken", backend="flash")
    dispatch.register_health_check("op", lambda x: None, backend="fla")
    assert dispatch.choose("op", x) == "fla"  # the first healthy one, in registration order
    assert dispatch.choose("op", x, "torch") == "torch"
    with pytest.raises(UserError, match="broken"):
        dispatch.choose("op", x, "flash")
    assert dispatch.choose("other_op", x, "fla") == "torch"  # an op without the backend: auto for that op
    with pytest.raises(ValueError):
        dispatch.choose("op", x, "cuda")


@pytest.mark.parametrize("preference", ["eager_only", "compiled_only"])
def test_dispatch_backend_preferred_in_one_kind_of_code(monkeypatch, preference):
    """An eager-only backend: inside torch.compile'd code "auto" runs the op's PyTorch version (inductor fuses
    it). A compiled-only one: outside (FlexAttention would compile for every input size). Elsewhere, or
    when asked for by name, the backend; a preference, so no fallback warning."""
    monkeypatch.setattr(dispatch, "_health_checks", {})
    monkeypatch.setattr(dispatch, f"_{preference}", set())
    dispatch.register_health_check("op", lambda x: None, backend="fla", **{preference: True})
    x = torch.zeros(1)
    choices = []

    def run(x, requested=None):
        choices.append(dispatch._choose("op", x, requested, {}))
        return x + 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = torch.compile(run, backend="eager", fullgraph=True)
        compiled(x)
        compiled(x, "fla")
        run(x)
        run(x, "fla")
    in_compiled, in_eager = ("torch", "fla") if preference == "eager_only" else ("fla", "torch")
    assert choices == [in_compiled, "fla", in_eager, "fla"]


def test_short_conv_backend_choice_on_cpu():
    """The Triton short conv is CUDA-only: on CPU "auto" runs PyTorch without a warning, and a request by
    name fails with one line; the convolution from a state has no Triton kernel: a request for it is auto."""
    x, w, b = conv_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short_conv(x, w, b)
    assert dispatch.last_choices()["short_conv"] == "torch"
    with pytest.raises(UserError, match="not on a CUDA device"):
        short_conv(x, w, b, backend="triton")
    short_conv(x, w, b, initial_state=torch.zeros(2, 6, 4), backend="triton")
    assert dispatch.last_choices()["short_conv_from_state"] == "torch"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            dispatch.require("triton")


def test_fla_health_check_traces_without_warnings():
    """The health checks run inside compiled blocks; tracing them must not warn (torch.compile warns on
    every traced call of an lru_cache-wrapped function, which filled the GPU training logs)."""
    def run(x):
        return x + (1 if dispatch.fla_unavailable_reason() is None else 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(run, backend="eager", fullgraph=True)(torch.zeros(2))


# ---------------------------------------------------------------- accelerated backends (GPU)
# Realistic sizes: batch 2 x 2048 tokens, hidden 1024, 16 heads of 64; bf16; each accelerated backend
# against the PyTorch path (outputs and gradients), relative error ||a - b|| / ||b|| < 1e-2. The fla
# tests need fla importable (not installed on the GPU image: carry .venv/.../site-packages/fla).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def outputs_and_grads(fn, *inputs, seed=0):
    """fn(*inputs) and the gradients of <out, random> w.r.t. the inputs that require grad."""
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.Generator(device=out.device).manual_seed(seed)
    out.backward(torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype))
    return [out] + [x.grad for x in inputs if x.requires_grad]


def assert_backends_agree(fn, inputs, backend, tol=1e-2):
    fast = outputs_and_grads(lambda *a: fn(*a, backend=backend), *inputs)
    torch_ = outputs_and_grads(lambda *a: fn(*a, backend="torch"), *inputs)
    for i, (a, b) in enumerate(zip(fast, torch_)):
        assert torch.isfinite(a).all(), f"tensor {i} of {backend} is not finite"
        assert rel_err(a, b) < tol, f"tensor {i}: {backend} vs torch rel err {rel_err(a, b):.2e}"


def gpu_qkv(B=2, T=2048, H=16, Hkv=16, D=64):
    q, k, v = qkv(B=B, Tq=T, Tk=T, H=H, Hkv=Hkv, D=D, dtype=torch.bfloat16, device="cuda")
    return [t.requires_grad_(True) for t in (q, k, v)]


def gpu_cu_seqlens(total=4096, row=2048, seed=0):
    """Random document lengths that never cross a row boundary (the data pipeline's guarantee)."""
    g = torch.Generator().manual_seed(seed)
    bounds = [0]
    for start in range(0, total, row):
        cuts = torch.randint(1, row, (5,), generator=g).unique().tolist()
        bounds += [start + c for c in cuts] + [start + row]
    return torch.tensor(bounds, dtype=torch.int32, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", ["causal", "gqa", "window", "varlen", "decode"])
def test_gpu_flash_attention_matches_sdpa(case):
    pytest.importorskip("flash_attn")
    cu_seqlens = gpu_cu_seqlens() if case == "varlen" else None
    q, k, v = gpu_qkv(B=1 if cu_seqlens is not None else 2, T=4096 if cu_seqlens is not None else 2048,
                      Hkv=4 if case == "gqa" else 16)
    if case == "decode":
        q = q[:, -5:].detach().requires_grad_(True)
    window = 256 if case == "window" else None
    fn = lambda q, k, v, backend: attention(q, k, v, window_size=window,  # noqa: E731
                                            cu_seqlens=cu_seqlens, backend=backend)
    assert_backends_agree(fn, [q, k, v], "flash")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", ["window", "varlen", "padding"])
def test_gpu_sdpa_matches_reference(case):
    """The CUDA SDPA kernels with masks agree with the float32 reference (bf16 inputs)."""
    cu_seqlens = gpu_cu_seqlens(total=2048, row=1024) if case == "varlen" else None
    q, k, v = gpu_qkv(B=1 if cu_seqlens is not None else 2, Hkv=4)
    mask = None
    if case == "padding":
        mask = torch.ones(2, 2048, dtype=torch.long, device="cuda")
        mask[1, :300] = 0
    kwargs = dict(window_size=256 if case == "window" else None, cu_seqlens=cu_seqlens, attention_mask=mask)
    with torch.no_grad():
        out = attention(q, k, v, backend="torch", **kwargs)
        assert rel_err(out, attention_reference(q, k, v, **kwargs)) < 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", ["plain", "state", "varlen"])
def test_gpu_fla_short_conv_matches_torch(case):
    pytest.importorskip("fla")
    g = torch.Generator().manual_seed(0)
    B, T, D, W = (1, 4096, 1024, 4) if case == "varlen" else (2, 2048, 1024, 4)
    x = torch.randn(B, T, D, generator=g).cuda().bfloat16().requires_grad_(True)
    w = (torch.randn(D, 1, W, generator=g) / W).cuda().bfloat16().requires_grad_(True)
    cu_seqlens = gpu_cu_seqlens() if case == "varlen" else None
    state = torch.randn(B, D, W, generator=g).cuda().bfloat16() if case == "state" else None

    def fn(x, w, backend):
        y, final = short_conv(x, w, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens,
                              backend=backend)
        if backend == "fla":
            expected = short_conv(x, w, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens,
                                  backend="torch")[1]
            torch.testing.assert_close(final, expected)  # the same cache layout
        return y

    assert_backends_agree(fn, [x, w], "fla")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", ["plain", "varlen", "strided"])
def test_gpu_triton_short_conv_matches_torch(case, compiled):
    """lmlab's Triton short convolution in bf16 at a 340M layer's size, eager and inside torch.compile."""
    g = torch.Generator().manual_seed(0)
    B, T, D, W = (1, 4096, 1536, 4) if case == "varlen" else (2, 2048, 1536, 4)
    x = torch.randn(B, T, 2 * D if case == "strided" else D, generator=g).cuda().bfloat16().requires_grad_(True)
    w = (torch.randn(D, 1, W, generator=g) / W).cuda().bfloat16().requires_grad_(True)
    b = (torch.randn(D, generator=g) / W).cuda().bfloat16().requires_grad_(True)
    cu_seqlens = gpu_cu_seqlens() if case == "varlen" else None

    def fn(x, w, b, backend):
        # strided: the input is a fused projection's slice
        return short_conv(x[..., :D], w, b, cu_seqlens=cu_seqlens, backend=backend)[0]

    assert_backends_agree(torch.compile(fn) if compiled else fn, [x, w, b], "triton")


@pytest.mark.gpu
@needs_cuda
def test_gpu_fla_norms_match_torch():
    pytest.importorskip("fla")
    g = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(2, 2048, 1024, generator=g).cuda().bfloat16().requires_grad_(True)
               for _ in range(2))
    w = (1 + 0.1 * torch.randn(1024, generator=g)).cuda().bfloat16().requires_grad_(True)
    assert_backends_agree(lambda x, w, backend: rms_norm(x, w, 1e-6, backend=backend), [x, w], "fla")
    # The gated norm as Gated DeltaNet uses it: per head of 64.
    x, gate = (t.detach().view(2, 2048, 16, 64).requires_grad_(True) for t in (x, gate))
    w = w.detach()[:64].requires_grad_(True)
    assert_backends_agree(lambda x, gate, w, backend: gated_rms_norm(x, gate, w, 1e-6, backend=backend),
                          [x, gate, w], "fla")


def loss_inputs(N=4096, D=1024, V=32000):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).cuda().bfloat16().requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).cuda().bfloat16().requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g).cuda()
    labels[::7] = -100
    return hidden, weight, labels


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gpu_linear_cross_entropy(reduction):
    hidden, weight, labels = loss_inputs()
    expected = outputs_and_grads(
        lambda h, w: F.cross_entropy((h @ w.T).float(), labels, reduction=reduction), hidden, weight)
    torch_ = outputs_and_grads(
        lambda h, w: linear_cross_entropy(h, w, labels, reduction=reduction, backend="torch"), hidden, weight)
    for a, b in zip(torch_, expected):
        assert rel_err(a, b) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_linear_cross_entropy_memory():
    N, V = 16384, 32000  # a batch of 8 x 2048 tokens
    hidden, weight, labels = loss_inputs(N=N, V=V)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    linear_cross_entropy(hidden, weight, labels, backend="torch").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    fp32_logits = N * V * 4
    assert extra < 0.5 * fp32_logits, f"peak {extra / 2**20:.0f} MiB vs logits {fp32_logits / 2**20:.0f} MiB"
