"""lm-eval's `hf` model, running lmlab's models at the speed of the hardware (issue 22).

`python -m evals.harness --model hf` builds `LmlabLM`, lm-eval's own `HFLM` with one difference: for
lmlab's model families (decoder-only, `LmlabForCausalLM`) the requests are scheduled by
`lmlab.eval.scheduling` at any `--batch_size`, since the batch size never changes an lmlab model's
results: loglikelihood and rolling loglikelihood as packed documents up to `token_budget` tokens per
forward, requests that share a context (multiple choice) with the context run once, greedy generation in
left-padded batches of up to `token_budget` prompt + new tokens. Tokenisation (HFLM's, done up front in
batches: `_pretokenized`), truncation, stop strings and post-processing are HFLM's own. Any other model, a
sampled or otherwise non-greedy generation, and `think_end_token` take HFLM's own path unchanged.

`--model_args ...,token_budget=N` sets the budget (default `DEFAULT_TOKEN_BUDGET`), `state_memory_gib=G` the
memory for a batch's decoding states (default `default_state_budget`); the results JSON's
`config.lmlab_scheduling` records how the requests were run (`decode`: generation batches per way their
decoding steps ran, e.g. "cuda_graph"), with the seconds per task and request type.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lmlab.errors import UserError
from lmlab.eval.scheduling import (
    Scoring,
    batch_rows_at_most,
    default_state_budget,
    greedy_generate,
    measure_state_memory,
    score_packed,
    score_shared_context,
    shared_contexts,
)
from lmlab.models.blocks import LmlabForCausalLM

# Tokens per forward: 64 packed rows of 1024 tokens; a 340M model's activations for them take a few GiB,
# and 1.3B's fit an 80 GB card.
DEFAULT_TOKEN_BUDGET = 65536
TOKENIZER_THREADS = "TOKENIZERS_PARALLELISM"  # the tokenizers library's switch for its thread pool
# generation_kwargs that greedy decoding by lmlab's scheduler honours; any other one takes HFLM's path
GREEDY_KWARGS = {"do_sample", "temperature"}


def positive_tokens(value: int | str) -> int:
    """`token_budget`; one line naming the problem unless it is a positive integer."""
    if not str(value).isdigit() or int(value) < 1:
        raise UserError(f"token_budget must be a positive integer (tokens per forward); got {value!r}")
    return int(value)


def positive_gib(value: float | str) -> int:
    """`state_memory_gib`'s bytes; one line naming the problem unless it is a positive, finite number."""
    try:
        gib = float(value)
    except (TypeError, ValueError):
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0):
        raise UserError(f"state_memory_gib must be a positive number (GiB for a batch's decoding states); "
                        f"got {value!r}")
    return int(gib * 2**30)


@contextlib.contextmanager
def tokenizer_threads() -> Iterator[None]:
    """A fast tokenizer's batches spread over all its threads in the block. lm-eval's CLI turns the threads
    off for the whole command (TOKENIZERS_PARALLELISM=false, so that a process forked later cannot deadlock
    on them); the tokenizer reads the setting at each call, and the block restores it, so a later fork still
    finds them off (20,000 strings on 2 cores: 6.6-8.2 s -> 5.6 s; the tokens are the same)."""
    saved = os.environ.get(TOKENIZER_THREADS)
    os.environ[TOKENIZER_THREADS] = "true"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[TOKENIZER_THREADS]
        else:
            os.environ[TOKENIZER_THREADS] = saved


def encoded_strings(pairs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, bool | None]]:
    """What HFLM's loglikelihood passes to tok_encode for (context, continuation) pairs: the continuation
    alone after an empty context, else the whole text and the context less its trailing whitespace (which
    TemplateLM._encode_pair moves to the continuation)."""
    for context, continuation in pairs:
        if context:
            yield context + continuation, None
            yield context.rstrip(), None
        else:
            yield continuation, False


class LmlabLM(HFLM):
    def __init__(self, *args: Any, token_budget: int | str = DEFAULT_TOKEN_BUDGET,
                 state_memory_gib: float | str | None = None, **kwargs: Any):
        token_budget = positive_tokens(token_budget)
        state_bytes = None if state_memory_gib is None else positive_gib(state_memory_gib)
        self._encoded: dict[tuple[str, bool | None], list[int]] = {}  # tok_encode's, see _pretokenized
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget
        self.scheduled = isinstance(self.model, LmlabForCausalLM) and self.backend == "causal"
        if self.scheduled:
            with self._autocast():  # the states' dtypes are the evaluation's
                budget = default_state_budget(self.device) if state_bytes is None else state_bytes
                self.state_memory = measure_state_memory(self.model, budget)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)  # (request type, task) -> seconds
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.decoding: dict[str, int] = defaultdict(int)  # how a generation batch decoded -> batches
        self._bar: tqdm | None = None

    # -- request types: lmlab's scheduling for lmlab's models, HFLM's otherwise -------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not self.scheduled:
            return super().loglikelihood(requests, disable_tqdm)

        def run(reqs: list[Instance]) -> list[tuple[float, bool]]:
            with self._pretokenized(encoded_strings(req.args for req in reqs)):
                return super(LmlabLM, self).loglikelihood(reqs, True)

        return self._per_task("loglikelihood", requests, run)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        if not self.scheduled:
            return super().loglikelihood_rolling(requests, disable_tqdm)
        return self._per_task("loglikelihood_rolling", requests, self._rolling)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        if not self.scheduled or self.think_end_token is not None:
            return super().generate_until(requests, disable_tqdm)

        def run(reqs: list[Instance]) -> list[str]:
            with self._pretokenized((req.args[0], None) for req in reqs):  # the contexts' lengths
                return self._generate(reqs)

        return self._per_task("generate_until", requests, run)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        ids = self._encoded.get((string, add_special_tokens))
        if ids is None:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    @contextlib.contextmanager
    def _pretokenized(self, keys: Iterable[tuple[str, bool | None]]) -> Iterator[None]:
        """tok_encode's results for `keys` ((string, add_special_tokens) pairs) encoded up front, each string
        once, in one batch per set of tokenizer arguments, on the tokenizer's threads, where HFLM encodes every
        string alone (twice per loglikelihood request, a shared context each time)."""
        bos = self.tokenizer.decode(self.prefix_token_id)
        batches: dict[bool | None, list[tuple[str, bool | None]]] = defaultdict(list)
        for key in dict.fromkeys(keys):
            string, add_special_tokens = key  # the tokenizer's argument as HFLM.tok_encode sets it:
            add = _add_special_kwargs(add_special_tokens, self.add_bos_token).get("add_special_tokens")
            batches[False if add_special_tokens is None and has_bos_prefix(string, bos) else add].append(key)
        with tokenizer_threads():
            for add, batch in batches.items():
                kwargs = {} if add is None else {"add_special_tokens": add}
                self._encoded.update(zip(batch, self.tokenizer([s for s, _ in batch], **kwargs)["input_ids"]))
        try:
            yield
        finally:
            self._encoded.clear()

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        if not self.scheduled:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)

        def record(i: int, score: tuple[float, bool]) -> None:
            results[i] = score
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], score)

        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"cannot score a continuation of {len(continuation)} tokens after a context of "
                                 f"{len(context)} (max_length {self.max_length})")
        pairs = [(context, continuation) for _, context, continuation in requests]
        groups, alone = shared_contexts(pairs, self.max_length, self.token_budget)
        with self._autocast():
            contexts = [(pairs[g[0]][0], [pairs[i][1] for i in g]) for g in groups]
            for index, scores in score_shared_context(self.model, contexts, token_budget=self.token_budget,
                                                      state=self.state_memory, softmax_dtype=self.softmax_dtype):
                for (g, j), score in zip(index, scores):
                    record(groups[g][j], score)
                self._advance(len(index))
            # HFLM's input: left-truncated to max_length + 1 tokens, the last one only a target
            scorings = [Scoring((pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1], pairs[i][1]) for i in alone]
            for order, scores in score_packed(self.model, scorings, token_budget=self.token_budget,
                                              max_length=self.max_length, softmax_dtype=self.softmax_dtype):
                for k, score in zip(order, scores):
                    record(alone[k], score)
                self._advance(len(order))
        return results

    # -- lmlab's paths -----------------------------------------------------------------------------------

    def _rolling(self, requests: list[Instance]) -> list[float]:
        """HFLM's rolling windows (max_length tokens, context 1), all of them scored together."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            (string,) = request.args
            for window in get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(i)
        self._bar.total += len(windows) - len(requests)  # the bar counts windows
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _generate(self, requests: list[Instance]) -> list[str]:
        """Greedy generations in left-padded batches of as many rows as StateMemory allows (prompts run
        token_budget tokens at a time), longest contexts first; other generation settings go to HFLM."""
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = set([] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else eos_ids)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            if kwargs["do_sample"] or set(kwargs) - GREEDY_KWARGS - {"until", "max_gen_toks"}:
                for i, text in zip(indices, super().generate_until([requests[i] for i in indices], True)):
                    results[i] = text
                self._advance(len(indices))
                continue
            until = handle_stop_sequences(kwargs["until"], eos=eos_text)
            max_new = kwargs["max_gen_toks"]
            max_context = self.max_length - max_new
            if max_context <= 0:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in max_length {self.max_length}")
            lengths = {i: min(len(self.tok_encode(requests[i].args[0])), max_context) for i in indices}
            order = sorted(indices, key=lambda i: -lengths[i])
            stopped = self._stop_check(until)
            while order:
                tokens = lengths[order[0]] + max_new
                rows = batch_rows_at_most(min(len(order), self.state_memory.rows(tokens)))
                batch, order = order[:rows], order[rows:]
                contexts = [requests[i].args[0] for i in batch]
                input_ids, mask = self.tok_batch_encode(contexts, left_truncate_len=max_context,
                                                        truncation=self.truncation)
                with self._autocast():
                    generated, how = greedy_generate(self.model, input_ids.to(self.device), mask.to(self.device),
                                                     max_new, eos_ids, stopped, max(1, self.token_budget // tokens))
                self.decoding[how] += 1
                for i, tokens in zip(batch, generated):
                    results[i] = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                self._advance(len(batch))
        return results

    def _stop_check(self, until: list[str]) -> Callable[[list[int]], bool]:
        return lambda tokens: any(stop in self.tok_decode(tokens) for stop in until if stop)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """HFLM's `mixed_precision_dtype` autocast, as around its own model calls."""
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    # -- progress, timing and the record in the results JSON -------------------------------------------

    def _per_task(self, kind: str, requests: list[Instance], run: Callable[[list[Instance]], list]) -> list:
        """Run one request type task by task under a progress bar with ETA, timing each task."""
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_task[request.task_name or "?"].append(i)
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), desc=f"lmlab {kind}", disable=self.rank != 0, file=sys.stderr) as bar:
            self._bar = bar
            for task, indices in by_task.items():
                bar.set_postfix_str(task)
                start = time.perf_counter()
                for i, result in zip(indices, run([requests[i] for i in indices])):
                    results[i] = result
                self.seconds[kind, task] += time.perf_counter() - start
                self.requests[kind, task] += len(indices)
            self._bar = None
        return results

    def _advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def time_summary(self) -> str:
        """Seconds per task and request type, and the total."""
        lines = [f"  {task:<24} {kind:<22} {self.requests[kind, task]:>7} requests {seconds:8.1f} s"
                 for (kind, task), seconds in self.seconds.items()]
        return "\n".join(["lmlab: time per task", *lines, f"  {'total':<24} {'':<22} {'':>16} "
                          f"{sum(self.seconds.values()):8.1f} s"])

    def get_model_info(self) -> dict:
        """HFLM's model info and, for lmlab's models, how their requests were run. lm-eval calls this once,
        when the evaluation is done, so the closing time summary is printed here."""
        info = super().get_model_info()
        if self.scheduled:
            info["lmlab_scheduling"] = {
                "loglikelihood": "packed documents (cu_seqlens), longest first, any --batch_size",
                "generate_until": "greedy, left-padded batches from the decoding cache, longest first",
                "token_budget": self.token_budget,
                "batch_rows": "1, 2, 3, 4, 6, 8, 12, ... (shared contexts, generation)",
                "decoding_state_bytes": dataclasses.asdict(self.state_memory),
                "decode": dict(self.decoding),
                "seconds": {f"{task}/{kind}": round(s, 3) for (kind, task), s in self.seconds.items()},
            }
            print(self.time_summary(), file=sys.stderr)
        return info


def use_for_hf() -> None:
    """Make lm-eval's `--model hf` (and its aliases) build LmlabLM; `--model hf-stock` is lm-eval's own HFLM
    (bench/eval_bench.py compares the two). lm-eval's registry refuses to register a second class under a
    name, so those entries are replaced directly."""
    for name in ("hf", "hf-auto", "huggingface"):
        model_registry._objs[name] = LmlabLM
    model_registry.register("hf-stock")(HFLM)
