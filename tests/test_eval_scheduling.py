"""lmlab's request scheduling (lmlab.eval.lm, lmlab.eval.scheduling) against lm-eval's own HF model class
(`HFLM`, batch 1) on the same tiny fp32 model, request by request, for every family and HQLT mode
(configs/tiny_*.json): loglikelihood, rolling loglikelihood and greedy generation."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lmlab  # noqa: F401  (registers the model families)
from lmlab.eval import fda, lm, scheduling
from lmlab.eval.lm import LmlabLM
from lmlab.models.cache import Cache, _tensors
from test_eval_harness import GATED_DELTANET, HQLT, write_tokenizer

REPO = Path(__file__).resolve().parents[1]
# default suite: 2-layer, 32-wide models (a recurrent hybrid with one attention layer; the paper's HQLT in
# its most stateful mode); `slow`: every family and HQLT mode of configs/tiny_*.json
SMALL = {"small_gdn_hybrid": {**GATED_DELTANET, "attn": {"layers": [1], "num_heads": 2}}, "small_hqlt_chunk": HQLT}
TINY = [pytest.param(p.stem, marks=pytest.mark.slow) for p in sorted((REPO / "configs").glob("tiny_*.json"))]
MAX_LENGTH = 48  # small, so that truncation and several rolling windows happen
WORDS = "the quick brown fox jumps over the lazy dog while a man walks a dog and she twists the lid".split()


def text(n: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] for i in range(n))


def request(kind: str, args: tuple, task: str = "t", doc_id: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=(task, doc_id, 1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second thread costs more (contention) than it gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_model(name: str, tokenizer) -> torch.nn.Module:
    if name in SMALL:
        spec = {**SMALL[name], "hidden_size": 32, "num_hidden_layers": 2}
    else:
        spec = json.loads((REPO / "configs" / f"{name}.json").read_text())
    # the tokenizer's vocabulary: every generated token decodes to text
    config = AutoConfig.for_model(**{**spec, "vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 1,
                                     "pad_token_id": 2})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def both(model, tokenizer, **kwargs) -> tuple[HFLM, LmlabLM]:
    common = dict(pretrained=model, tokenizer=tokenizer, device="cpu", max_length=MAX_LENGTH, **kwargs)
    return HFLM(batch_size=1, **common), LmlabLM(batch_size=1, **common)


def loglikelihood_requests() -> list[Instance]:
    """Multiple choice (one context, 4 or 5 continuations), short and long contexts (one past max_length: left
    truncation), one-token continuations, two tasks."""
    requests = []
    for doc in range(6):
        context = text(3 + 9 * doc, doc)  # 3 .. 48 words: the last ones are truncated
        for choice in range(5 - doc % 2):  # 5 choices: a continuation batch padded to 6 rows
            requests.append(request("loglikelihood", (context, " " + text(1 + choice, doc + choice)),
                                    task="mc" if doc % 2 else "other", doc_id=doc))
    return requests


@pytest.mark.parametrize("name", [*SMALL, *TINY])
def test_packed_and_shared_context_scoring_equal_lm_evals_hf_model_request_by_request(name, tokenizer, monkeypatch):
    """Every loglikelihood within 1e-4 and the same is_greedy (multiple choice with its context run once,
    truncated requests packed), also where the continuation is the model's own greedy one (is_greedy
    true); rolling loglikelihoods over several windows within 1e-4 or, for sums beyond 100, float32's
    relative precision."""
    model = tiny_model(name, tokenizer)
    hf, ours = both(model, tokenizer, token_budget=100)  # several forwards, several rows each
    assert ours.scheduled and not hasattr(hf, "scheduled")
    # room for the states of 7 rows of 40 tokens: a context and its continuations (padded to 6) per batch
    ours.state_memory = dataclasses.replace(ours.state_memory, budget=7 * ours.state_memory.row_bytes(40))
    shared_groups = []

    batch_sizes = []

    def spy(model, groups, **kwargs):
        shared_groups.extend(groups)
        for index, scores in scheduling.score_shared_context(model, groups, **kwargs):
            batch_sizes.append(len({g for g, _ in index}))
            yield index, scores

    monkeypatch.setattr(lm, "score_shared_context", spy)
    requests = loglikelihood_requests()
    expected, got = hf.loglikelihood(requests), ours.loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(expected, got, strict=True):
        assert b == pytest.approx(a, abs=1e-4) and greedy_a == greedy_b
    assert 2 <= len(shared_groups) < 6 and all(len(conts) in (4, 5) for _, conts in shared_groups)  # the rest: packed
    assert batch_sizes == [1] * len(shared_groups)  # the state budget's bound
    # token level: continuations that are the model's own greedy tokens
    contexts = [tokenizer(text(4 + 5 * i, i))["input_ids"] for i in range(3)]
    greedy = [(None, ctx, model(torch.tensor([ctx])).logits[0, -1:].argmax(-1).tolist()) for ctx in contexts]
    expected, got = hf._loglikelihood_tokens(greedy), ours._loglikelihood_tokens(greedy)
    assert [g for _, g in got] == [g for _, g in expected] == [True] * 3
    rolling = [request("loglikelihood_rolling", (text(20 + 25 * i, i),), task="wiki") for i in range(3)]
    for a, b in zip(hf.loglikelihood_rolling(rolling), ours.loglikelihood_rolling(rolling), strict=True):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-4)  # sums near -1500: 1e-4 is float32's last digit


@pytest.mark.parametrize("name", [*SMALL, *TINY])
def test_batched_greedy_generation_equals_lm_evals_hf_model_at_batch_1(name, tokenizer, monkeypatch):
    """Stop strings that cut early (" " ends most generations after a token or two), one that never comes
    ("\\n": the full max_gen_toks), and an EOS the model emits: the same texts as HFLM's generate()."""
    model = tiny_model(name, tokenizer)
    contexts = [text(3 + 6 * i, i) for i in range(4)]
    requests = [request("generate_until", (c, {"until": ["\n"], "max_gen_toks": 17})) for c in contexts]
    requests += [request("generate_until", (c, {"until": [" "], "max_gen_toks": 8, "do_sample": False}))
                 for c in contexts]
    hf, ours = both(model, tokenizer, token_budget=40)  # the prompts run one or two rows at a time
    first = hf.generate_until(requests)
    assert all(first[:4])  # until "\n": 17 tokens of text
    # an EOS that the first generation reaches: its third token
    context = tokenizer(contexts[0], return_tensors="pt")["input_ids"]
    eos = model.generate(context, max_new_tokens=3, do_sample=False, pad_token_id=2)[0, -1].item()
    cut = model.generate(context, max_new_tokens=17, do_sample=False, pad_token_id=2, eos_token_id=eos)
    assert cut.shape[1] <= context.shape[1] + 3  # the EOS cuts that generation (in tokens: the text after
    model.generation_config.eos_token_id = eos  # it may decode to nothing, e.g. special tokens)
    expected = hf.generate_until(requests)
    pieces = []
    concatenate = Cache.concatenate
    monkeypatch.setattr(Cache, "concatenate", lambda caches: pieces.append(len(caches)) or concatenate(caches))
    assert ours.generate_until(requests) == expected
    assert max(pieces) > 1  # a batch's prompts ran in pieces
    refusal = model.model.static_decoding_refusal()  # a static step on CPU runs eagerly, in place
    assert list(ours.decoding) == [f"eager: {refusal or 'not on CUDA'}"]


def test_non_lmlab_models_keep_lm_evals_own_path(tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    _, ours = both(LlamaForCausalLM(config).eval(), tokenizer)
    assert not ours.scheduled
    assert "lmlab_scheduling" not in ours.get_model_info()


@pytest.mark.parametrize("add_bos_token", [None, True])
def test_requests_are_tokenised_in_batches_as_hflm_tokenises_each(add_bos_token, tokenizer, monkeypatch):
    """Loglikelihood requests reach _loglikelihood_tokens with HFLM's tokens (contexts ending in spaces or a
    newline, an empty context, a context beginning with BOS's text), with no string encoded one by one;
    generation contexts' lengths likewise."""
    hf, ours = both(tiny_model("small_hqlt_chunk", tokenizer), tokenizer,
                    **({} if add_bos_token is None else {"add_bos_token": add_bos_token}))
    bos = tokenizer.decode(hf.prefix_token_id)
    pairs = [("the fox", " jumps"), ("the fox ", "jumps"), ("a dog\n", "walks"), ("", "the lid"), ("", " the lid"),
             (bos + "the man", " walks"), ("the fox", " jumps over")]
    requests = [request("loglikelihood", pair, doc_id=i) for i, pair in enumerate(pairs)]
    inputs = {}
    for name, model in (("hf", hf), ("ours", ours)):
        monkeypatch.setattr(model, "_loglikelihood_tokens", lambda reqs, *_, name=name, **__:
                            inputs.setdefault(name, reqs) and [(0.0, False)] * len(reqs))
    one_by_one = []
    hflm_tok_encode = HFLM.tok_encode
    monkeypatch.setattr(HFLM, "tok_encode",
                        lambda self, *a, **k: one_by_one.append(a) or hflm_tok_encode(self, *a, **k))
    hf.loglikelihood(requests)
    one_by_one.clear()
    ours.loglikelihood(requests)
    assert inputs["ours"] == inputs["hf"] and one_by_one == []
    assert not ours._encoded  # nothing kept after the call
    contexts = [pair[0] or "x" for pair in pairs]
    with ours._pretokenized((context, None) for context in contexts):
        assert [ours.tok_encode(c) for c in contexts] == [hflm_tok_encode(hf, c) for c in contexts]
        truncated = ours.tok_encode(contexts[0], left_truncate_len=2)
        assert truncated == hflm_tok_encode(hf, contexts[0], left_truncate_len=2)
    assert one_by_one == []


def test_batches_are_tokenised_on_the_tokenizers_threads_and_the_setting_is_restored(tokenizer, monkeypatch):
    """lm-eval's CLI turns a fast tokenizer's threads off for the whole command; lmlab's batches (the requests'
    strings, FDA's windows) run with them on, and the setting is back as it was after each."""
    _, ours = both(tiny_model("small_hqlt_chunk", tokenizer), tokenizer)
    seen = []
    call = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k:
                        seen.append(os.environ.get(lm.TOKENIZER_THREADS)) or call(self, *a, **k))
    monkeypatch.setenv(lm.TOKENIZER_THREADS, "false")  # as lm-eval's CLI sets it
    with ours._pretokenized([("the fox", None), ("", False)]):
        assert os.environ[lm.TOKENIZER_THREADS] == "false"
    assert fda.window_texts(tokenizer, ["the key is here"], [["key"]], 4)
    assert seen == ["true"] * 4 and os.environ[lm.TOKENIZER_THREADS] == "false"
    monkeypatch.delenv(lm.TOKENIZER_THREADS)
    with lm.tokenizer_threads():
        assert os.environ[lm.TOKENIZER_THREADS] == "true"
    assert lm.TOKENIZER_THREADS not in os.environ


def test_pack_rows_best_fit_decreasing():
    rows = scheduling.pack_rows([5, 9, 3, 7, 1, 10], row_len=10)
    assert rows == [[5], [1, 4], [3, 2], [0]]  # 10 | 9+1 | 7+3 | 5: longest first, every index once
    with pytest.raises(ValueError, match="does not fit"):
        scheduling.pack_rows([11], row_len=10)


def test_shared_contexts_group_multiple_choice_only_within_max_length_and_budget():
    pairs = [([1, 2], [3]), ([1, 2], [4, 5]), ([9], [3]),  # a group of two, and a context alone
             ([1] * 8, [2, 3]), ([1] * 8, [4]),  # 8 + 2 tokens > max_length + 1: truncated, so packed
             ([0], [5] * 6), ([0], [6] * 6)]  # 1 + 2 x 6 tokens > token_budget: packed
    assert scheduling.shared_contexts(pairs, max_length=8, token_budget=12) == ([[0, 1]], [2, 3, 4, 5, 6])


def test_bad_token_budget_is_one_line():
    with pytest.raises(lmlab.errors.UserError, match="token_budget must be a positive integer"):
        LmlabLM(pretrained="unused", token_budget="0")


@pytest.mark.parametrize("bad", ["0", "-1", "x", "nan", "inf", 0])
def test_bad_state_memory_is_one_line(bad):
    with pytest.raises(lmlab.errors.UserError, match="state_memory_gib must be a positive number"):
        LmlabLM(pretrained="unused", state_memory_gib=bad)
    with pytest.raises(lmlab.errors.UserError, match="state_memory_gib must be a positive number"):
        lm.positive_gib(None)  # `state_memory_gib=None` in --model_args


def test_state_memory_sets_the_rows_of_a_batch(tokenizer):
    """`state_memory_gib` replaces the default budget (an eighth of the free GPU memory, 2 GiB on CPU)."""
    model = tiny_model("small_hqlt_chunk", tokenizer)
    _, default = both(model, tokenizer)
    _, ours = both(model, tokenizer, state_memory_gib=0.25)
    assert default.state_memory.budget == 2 << 30 and ours.state_memory.budget == 1 << 28
    assert ours.get_model_info()["lmlab_scheduling"]["decoding_state_bytes"]["budget"] == 1 << 28


def test_batch_rows_are_powers_of_two_and_one_and_a_half_times_them():
    sizes = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert [scheduling.batch_rows_at_most(n) for n in range(1, 65)] == [max(s for s in sizes if s <= n)
                                                                         for n in range(1, 65)]
    assert [scheduling.batch_rows_at_least(n) for n in range(1, 65)] == [min(s for s in sizes if s >= n)
                                                                          for n in range(1, 65)]


@pytest.mark.parametrize("name", ["small_gdn_hybrid", *(param.values[0] for param in TINY)])
def test_state_memory_is_what_a_cache_holds(name, tokenizer):
    """Recurrent, conv and delay states are a fixed size per row; attention keys and values grow per token, a
    sliding window's (HQLT's KV-memory, Samba's attention) only until it is full; and a cache keeps no more
    memory alive than its states (no view of a whole prompt's tensors: HQLT's delay line once kept one)."""
    model = tiny_model(name, tokenizer)
    state = scheduling.measure_state_memory(model, budget=1 << 20)
    windows = [kept for _, kept in state.growing if kept is not None]
    for tokens in (5, 3 * max(windows, default=5), 40):  # within, and past, every window and Delayed-Streaming's delay
        cache = Cache()
        model.model(input_ids=torch.ones(3, tokens, dtype=torch.long), past_key_values=cache, use_cache=True)
        assert 3 * state.row_bytes(tokens) == cache.nbytes() >= held_bytes(cache)
    assert state.rows(5) == (1 << 20) // state.row_bytes(5)
    config = model.config
    attention = config.model_type in ("transformer", "hybrid_qlt") or getattr(config, "attn", None) is not None
    windowed = config.model_type == "hybrid_qlt" or (getattr(config, "attn", None) or {}).get("window_size")
    assert bool(state.growing) == attention and (state.fixed > 0) == (name != "tiny_transformer")
    assert bool(windows) == bool(windowed)


def held_bytes(cache: Cache) -> int:
    """The memory a cache's tensors keep alive: their storages' (a window's view of a whole prompt's keys
    would keep the prompt's)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for states in cache.layers.values() for value in states.values() for t in _tensors(value)}
    return sum(storages.values())


def test_caches_after_different_numbers_of_tokens_are_not_concatenated():
    short, long = Cache(), Cache()
    long.advance(2)
    with pytest.raises(ValueError, match="different numbers of tokens"):
        Cache.concatenate([short, long])
