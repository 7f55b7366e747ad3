"""Issue 22: where a multiple-choice task's time goes on a GPU. Hellaswag-sized synthetic documents (random
ids: contexts of 40-120 tokens, 4 endings of 15-45) scored by lmlab.eval.scheduling's two paths: the
context once with every ending from a copy of its state (`score_shared_context`) at several state
budgets, and packed rows that repeat the context (`score_packed`). Each variant runs twice (the first
meets new batch sizes: autotuning); the second's seconds, batches and peak memory are printed, then
a profile of the shared path at the default budget.
    PYTHONPATH=src python bench/experiments/multiple_choice.py --configs gated_deltanet_340M transformer_340M
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lmlab  # noqa: F401
from lmlab.eval.lm import DEFAULT_TOKEN_BUDGET
from lmlab.eval.scheduling import Scoring, default_state_budget, measure_state_memory, score_packed, \
    score_shared_context

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from profiling import profile_to  # noqa: E402


def timed(run) -> tuple[float, int, dict[int, float]]:
    """(seconds, forwards, log-likelihood per request) of one pass over a scoring generator."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, forwards, scores = time.perf_counter(), 0, {}
    for order, results in run():
        forwards += 1
        scores.update((i, logprob) for i, (logprob, _) in zip(order, results))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, forwards, scores


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=["gated_deltanet_340M", "transformer_340M"])
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 4], help="multiples of the default")
    p.add_argument("--profile", type=Path)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    for name in args.configs:
        config = AutoConfig.for_model(**json.loads((REPO / "configs" / f"{name}.json").read_text()))
        rng = random.Random(0)
        docs = [([rng.randrange(4, config.vocab_size) for _ in range(rng.randint(40, 120))],
                 [[rng.randrange(4, config.vocab_size) for _ in range(rng.randint(15, 45))] for _ in range(4)])
                for _ in range(args.docs)]
        requests = [Scoring(context + ending[:-1], ending) for context, endings in docs for ending in endings]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(args.device, torch.bfloat16).eval()
        default = default_state_budget(torch.device(args.device))

        def shared(multiple: float):
            state = measure_state_memory(model, int(default * multiple))
            return score_shared_context(model, docs, token_budget=DEFAULT_TOKEN_BUDGET, state=state)

        variants = {f"shared x{m:g}": functools.partial(shared, m) for m in args.budgets}
        variants["packed"] = lambda: score_packed(model, requests, token_budget=DEFAULT_TOKEN_BUDGET, max_length=2048)
        reference = None
        for variant, run in variants.items():
            first, _, _ = timed(run)
            seconds, forwards, scores = timed(run)
            if variant != "packed":  # (document, ending) -> the request's index
                scores = {d * 4 + j: s for (d, j), s in scores.items()}
            reference = reference or scores
            diff = max(abs(scores[i] - reference[i]) for i in reference)
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
            print(f"{name} {variant}: {seconds:.2f} s ({first:.2f} s the first time), {forwards} batches, "
                  f"peak {peak:.1f} GiB, max |diff| vs the first {diff:.3g}", flush=True)
        if args.profile:
            variant = f"shared x{args.budgets[0]:g}"
            with profile_to(args.profile, f"{name} {variant}, {args.docs} documents", torch.device(args.device)):
                timed(variants[variant])
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
