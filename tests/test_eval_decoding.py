"""Greedy generation's decoding steps (lmlab.eval.decoding): every family decodes with a static step, and
that step, run eagerly with its states in place, against the eager step, for every configs/tiny_*.json;
softmax attention's reserved KV buffers against the eager step, recomputation and the state budget.
On a GPU (`-m gpu`): the CUDA graph's generations against eager ones (tiny families, gated_deltanet_340M)
and the time per decoding step of both (gated_deltanet_340M, transformer_340M)."""
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lmlab  # noqa: F401  (registers the model families)
from lmlab.eval.decoding import Decoder, StaticStep
from lmlab.eval.scheduling import cut_at_eos, greedy_generate, measure_state_memory
from lmlab.models.blocks import Attention
from lmlab.models.cache import Cache, _tensors

REPO = Path(__file__).resolve().parents[1]
TINY = sorted(p.stem for p in (REPO / "configs").glob("tiny_*.json"))
# the families without softmax attention layers: their static step computes the eager one's logits exactly
RECURRENT = ["tiny_delta_net", "tiny_gated_deltanet", "tiny_gla", "tiny_gsa", "tiny_hgrn2", "tiny_hqlt_delayed_chunk",
             "tiny_hqlt_delayed_stream", "tiny_hqlt_linear", "tiny_hqlt_sync", "tiny_mamba", "tiny_mamba2"]
# tiny_hybrid's attention layers over every past key, not a window of 64: a KV cache the static step reserves
FULL_ATTENTION_HYBRID = {"attn": {"layers": [1, 3], "num_heads": 4, "num_kv_heads": 2}}
# softmax attention: KV caches without a window (reserved buffers), and sliding windows of 64 and 32 keys
KV_CACHES = [pytest.param("tiny_transformer", {}, id="tiny_transformer"),
             pytest.param("tiny_hybrid", FULL_ATTENTION_HYBRID, id="tiny_hybrid-full_attention")]
SOFTMAX_ATTENTION = [*KV_CACHES, pytest.param("tiny_hybrid", {}, id="tiny_hybrid"),
                     pytest.param("tiny_samba", {}, id="tiny_samba")]
# left-padded prompts of 3 to 24 tokens: the tiny HQLT windows (15 keys) are full once the prompts have run
LENGTHS = [20, 3, 17, 24]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared machine: a second thread costs more (contention) than it gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_from(config: str, device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(REPO / f"configs/{config}.json", **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device, dtype).eval()


def left_padded(lengths: list[int], vocab: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of `lengths` tokens, left-padded: (input_ids, attention_mask)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, -n:] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def prefilled(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[Cache, torch.Tensor]:
    """The cache after the prompts, and the first generated tokens [R, 1]."""
    cache = Cache()
    logits = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return cache, logits[:, -1:].argmax(-1)


def eager_and_static(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                     steps: int) -> tuple[Decoder, Decoder, torch.Tensor]:
    """An eager Decoder and a static one for `steps` steps from equal copies of the prefilled cache, and the
    first tokens."""
    cache, tokens = prefilled(model, ids, mask)
    return (Decoder(model, cache, mask, steps, static=False), Decoder(model, Cache.concatenate([cache]), mask, steps),
            tokens)


def buffers(cache: Cache) -> list[int]:
    """The addresses of all the cache's state tensors."""
    return [t.data_ptr() for states in cache.layers.values() for value in states.values() for t in _tensors(value)]


@pytest.mark.parametrize("name", TINY)
def test_every_family_decodes_with_a_static_step(name):
    assert model_from(name).model.static_decoding_refusal() is None


def test_a_layer_that_reads_the_growing_attention_mask_refuses_static_steps(monkeypatch):
    monkeypatch.setattr(Attention, "static_decoding", False)
    refusal = model_from("tiny_transformer").model.static_decoding_refusal()
    assert refusal == "its Attention layers read the growing attention mask"


@pytest.mark.parametrize("name", RECURRENT)
@torch.no_grad()
def test_static_step_in_place_equals_the_eager_step(name):
    """40 steps from left-padded prompts: the static step (no attention mask, positions from its own buffer,
    states copied into the cache's tensors after the first step) gives the eager step's logits exactly. It
    reads no token count (a graph would freeze it: here it is wrong on purpose) and the cache keeps its
    tensors (a graph's buffers)."""
    model = model_from(name)
    ids, mask = left_padded(LENGTHS, model.config.vocab_size)
    eager, static, tokens = eager_and_static(model, ids, mask, 40)
    cache = static.cache
    assert static.how == "eager: not on CUDA" and eager.how == "eager: static steps off"
    for step in range(40):
        expected = eager(tokens)
        if step:
            cache.seen_tokens = 0
        assert torch.equal(static(tokens), expected), step
        if step == 0:
            assert cache.in_place  # the states kept their shapes: from now on they stay in place
            addresses = buffers(cache)
        tokens = expected[:, -1:].argmax(-1)
    assert buffers(cache) == addresses


@torch.no_grad()
def test_hqlt_states_stay_in_place_once_its_window_is_full():
    """Prompts of at most 7 tokens: the window of 15 keys grows for 8 steps, and the step after them is the
    first that keeps the states' shapes; the logits equal the eager step's all along."""
    model = model_from("tiny_hqlt_sync")
    ids, mask = left_padded([5, 2, 7], model.config.vocab_size)
    eager, static, tokens = eager_and_static(model, ids, mask, 20)
    for step in range(20):
        expected = eager(tokens)
        assert torch.equal(static(tokens), expected), step
        assert static.cache.in_place == (step >= 8), step
        tokens = expected[:, -1:].argmax(-1)


@pytest.mark.parametrize("name, overrides", SOFTMAX_ATTENTION)
@torch.no_grad()
def test_softmax_attention_static_step_equals_the_eager_step(name, overrides):
    """48 steps from left-padded prompts of 3 to 24 tokens: the static step (its KV caches in buffers of
    prompt + 48 keys, padding masked; no attention mask) gives the eager step's logits within float32's
    rounding (it sums over more keys, the unwritten ones masked) and the same greedy tokens. It reads no
    token count, and its states stay in place from its first step, a sliding window's once full (tiny_hybrid:
    63 keys after 39 steps, tiny_samba: 31 after 7)."""
    model = model_from(name, **overrides)
    ids, mask = left_padded(LENGTHS, model.config.vocab_size)
    eager, static, tokens = eager_and_static(model, ids, mask, 48)
    window = (getattr(model.config, "attn", None) or {}).get("window_size")
    in_place_from = 0 if window is None else window - 1 - max(LENGTHS)
    cache = static.cache
    for step in range(48):
        expected = eager(tokens)
        if step:
            cache.seen_tokens = 0
        got = static(tokens)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert torch.equal(got[:, -1].argmax(-1), expected[:, -1].argmax(-1)), step
        assert cache.in_place == (step >= in_place_from), step
        if step == in_place_from:
            addresses = buffers(cache)
        tokens = expected[:, -1:].argmax(-1)
    assert buffers(cache) == addresses


def greedy_by_recompute(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> list[int]:
    """`steps` greedy tokens after a prompt [T], each from a forward over all tokens so far, without a cache."""
    tokens = prompt[None]
    for _ in range(steps):
        tokens = torch.cat([tokens, model(tokens, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    return tokens[0, len(prompt):].tolist()


@pytest.mark.parametrize("name, overrides", SOFTMAX_ATTENTION)
@torch.no_grad()
def test_static_generations_equal_eager_ones_and_recomputation(name, overrides):
    """Batches of 1, 3 and 6 left-padded prompts (run 2 rows at a time), up to 24 new tokens, an EOS that
    ends rows at different lengths and a stop that ends the generation after 16: static steps generate what
    eager steps do, and what recomputing each prompt alone without a cache does."""
    model = model_from(name, **overrides)
    for lengths in ([7], [20, 3, 17], [20, 3, 17, 24, 9, 1]):
        ids, mask = left_padded(lengths, model.config.vocab_size)
        alone = [greedy_by_recompute(model, row[-n:], 24) for row, n in zip(ids, lengths)]
        eos = {alone[-1][5]}
        for stopped, steps in ((lambda row: False, 24), (lambda row: len(row) >= 16, 16)):
            expected = [cut_at_eos(row[:steps], eos) for row in alone]
            for static in (True, False):
                generated, _ = greedy_generate(model, ids, mask, 24, eos, stopped, 2, static_steps=static)
                assert generated == expected, (lengths, steps, static)


@pytest.mark.parametrize("name, overrides", SOFTMAX_ATTENTION)
@torch.no_grad()
def test_reserved_kv_buffers_stay_within_the_state_budget(name, overrides):
    """A batch sized as lmlab.eval.lm sizes greedy generation's (the rows whose states after the longest
    prompt + max_new_tokens fit StateMemory's budget): from the static Decoder's start (KV buffers reserved)
    to its last step (a sliding window then full), its cache holds no more than the states of the prompt +
    max_new_tokens - 1 tokens (the last token is never fed), within the budget."""
    model = model_from(name, **overrides)
    state, longest, max_new_tokens = measure_state_memory(model, budget=1 << 20), 24, 30
    rows = state.rows(longest + max_new_tokens)
    assert rows > 1
    ids, mask = left_padded([longest] + [3] * (rows - 1), model.config.vocab_size)
    cache, tokens = prefilled(model, ids, mask)
    decode = Decoder(model, cache, mask, max_new_tokens - 1)
    most = rows * state.row_bytes(longest + max_new_tokens - 1)
    assert cache.nbytes() <= most <= state.budget
    for _ in range(max_new_tokens - 1):
        tokens = decode(tokens)[:, -1:].argmax(-1)
    assert cache.nbytes() == most


@torch.no_grad()
def test_a_decoder_takes_no_more_steps_than_it_was_made_for():
    model = model_from("tiny_transformer")
    ids, mask = left_padded([5, 2], model.config.vocab_size)
    _, decode, tokens = eager_and_static(model, ids, mask, 2)
    for _ in range(2):
        tokens = decode(tokens)[:, -1:].argmax(-1)
    with pytest.raises(RuntimeError, match="all the steps it was made for"):
        decode(tokens)


def test_in_place_cache_refuses_a_state_of_another_shape():
    cache = Cache()
    cache.update(0, recurrent_state=torch.zeros(2, 3), conv_state=(torch.zeros(2, 4),))
    cache.in_place = True
    state = cache[0]["recurrent_state"]
    cache.update(0, recurrent_state=torch.ones(2, 3))
    assert cache[0]["recurrent_state"] is state and state.sum() == 6  # copied into the same tensor
    with pytest.raises(ValueError, match="layer 0's conv_state: its shape or dtype changed"):
        cache.update(0, conv_state=(torch.zeros(2, 5),))
    with pytest.raises(ValueError, match="layer 0's attention"):
        cache.append(0, "attention", (torch.zeros(2, 1),), keep=4)


# ---------------------------------------------------------------------------------------------------
# GPU: CUDA graphs against eager steps


def generations(model: torch.nn.Module, lengths: list[int], max_new_tokens: int,
                static_steps: bool) -> tuple[list[list[int]], str]:
    ids, mask = left_padded(lengths, model.config.vocab_size, "cuda")
    return greedy_generate(model, ids, mask, max_new_tokens, set(), lambda row: False, len(lengths),
                           static_steps=static_steps)


@pytest.mark.gpu
@pytest.mark.parametrize("name, lengths", [
    *(pytest.param(name, LENGTHS * 2, id=name) for name in TINY),
    pytest.param("tiny_hqlt_sync", [5, 2, 7], id="tiny_hqlt_sync-window-filling")])
def test_gpu_cuda_graph_generations_equal_eager(name, lengths):
    """bf16, 48 new tokens: the same tokens, and the same logits, from the CUDA graph as from eager steps.
    tiny_transformer's in fp32 and within its rounding: its step over reserved KV buffers sums over more keys
    (the unwritten ones masked), and bf16's rounding of such sums can flip near-tied tokens of a random model
    (the bf16 graph against the same step run eagerly: the test below)."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    model = model_from(name, "cuda", torch.float32 if name == "tiny_transformer" else torch.bfloat16)
    eager, how_eager = generations(model, lengths, 48, static_steps=False)
    graphed, how = generations(model, lengths, 48, static_steps=True)
    assert how_eager == "eager: static steps off"
    assert how == "cuda_graph"
    assert graphed == eager
    with torch.no_grad():  # logits, step by step, from the eager steps' tokens
        ids, mask = left_padded(lengths, model.config.vocab_size, "cuda")
        eager_steps, graph_steps, tokens = eager_and_static(model, ids, mask, 24)
        for step in range(24):
            expected = eager_steps(tokens)
            got = graph_steps(tokens)
            error = (got.float() - expected.float()).abs().max().item()
            assert error <= (1e-4 if name == "tiny_transformer" else 0), (step, error)
            tokens = expected[:, -1:].argmax(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[7], [20, 3, 17], LENGTHS * 2], ids=["1_row", "3_rows", "8_rows"])
@pytest.mark.parametrize("name, overrides", KV_CACHES)
def test_gpu_reserved_kv_cache_cuda_graph_replays_the_static_step(name, overrides, lengths):
    """Left-padded prompts, softmax attention over reserved KV buffers: in bf16 the CUDA graph (captured after
    the first step) gives the logits of the same static step run eagerly, to the bit; in fp32, 48 new tokens
    equal the growing cache's eager steps'."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    model = model_from(name, "cuda", torch.bfloat16, **overrides)
    with torch.no_grad():
        ids, mask = left_padded(lengths, model.config.vocab_size, "cuda")
        cache, tokens = prefilled(model, ids, mask)
        static = StaticStep(model, Cache.concatenate([cache]), mask, 24)
        graph = Decoder(model, cache, mask, 24)
        for step in range(24):
            static.tokens.copy_(tokens)
            expected = static()
            assert torch.equal(graph(tokens), expected), step
            tokens = expected[:, -1:].argmax(-1)
        assert graph.how == "cuda_graph"
    model = model_from(name, "cuda", torch.float32, **overrides)
    eager, _ = generations(model, lengths, 48, static_steps=False)
    graphed, how = generations(model, lengths, 48, static_steps=True)
    assert how == "cuda_graph" and graphed == eager


@pytest.mark.gpu
def test_gpu_gated_deltanet_340m_cuda_graph_generations_equal_eager():
    """Random weights in bf16, 32 rows of 40 to 226 prompt tokens, 48 new tokens."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    model = model_from("gated_deltanet_340M", "cuda", torch.bfloat16)
    lengths = [40 + 6 * i for i in range(32)]
    eager, _ = generations(model, lengths, 48, static_steps=False)
    graphed, how = generations(model, lengths, 48, static_steps=True)
    assert how == "cuda_graph"
    assert graphed == eager


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gated_deltanet_340M", "transformer_340M"])
@torch.no_grad()
def test_gpu_340m_time_per_decoding_step(name):
    """Prints ms per decoding step at 128 rows (64-token prompts), eager and replayed from the CUDA graph, and
    the first step's time with the capture."""
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    model = model_from(name, "cuda", torch.bfloat16)
    ids, mask = left_padded([64] * 128, model.config.vocab_size, "cuda")
    times = {}
    for static in (False, True):
        cache, tokens = prefilled(model, ids, mask)
        decode = Decoder(model, cache, mask, 33, static=static)
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = decode(tokens)[:, -1:].argmax(-1)  # the graph's: its warm-up step and the capture
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(32):
            tokens = decode(tokens)[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        times[decode.how] = (first, (time.perf_counter() - start) / 32)
        del cache, decode
    for how, (first, step) in times.items():
        print(f"{name}, 128 rows, bf16, {how}: {1e3 * step:.1f} ms per step "
              f"(first step {1e3 * first:.0f} ms)")
    assert list(times) == ["eager: static steps off", "cuda_graph"]
