"""Issue 22, slice 2: multiple-choice scoring with the context run once (decoding Cache, continuations from
its state) against packed rows that repeat the context (lmlab.eval.scheduling.score_packed).

    PYTHONPATH=src python bench/experiments/shared_context.py --configs tiny_gated_deltanet tiny_transformer

Hellaswag-sized synthetic requests (random ids): `--docs` contexts of 60-100 tokens, 4 continuations of
20-40 tokens each. Prints seconds per variant (lmlab.eval.scheduling's functions) and the largest log-likelihood difference between them.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lmlab  # noqa: F401
from lmlab.eval.scheduling import Scoring, score_packed, score_shared_context

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=["tiny_gated_deltanet", "tiny_transformer"])
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--token-budget", type=int, default=65536)
    args = p.parse_args()
    rng = random.Random(0)
    docs = [([rng.randrange(4, 4000) for _ in range(rng.randint(60, 100))],
             [[rng.randrange(4, 4000) for _ in range(rng.randint(20, 40))] for _ in range(4)]) for _ in range(args.docs)]
    for name in args.configs:
        config = AutoConfig.for_model(**json.loads((REPO / "configs" / f"{name}.json").read_text()))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        requests = [Scoring(ctx + cont[:-1], cont) for ctx, conts in docs for cont in conts]
        start = time.perf_counter()
        packed = [0.0] * len(requests)
        for order, scores in score_packed(model, requests, token_budget=args.token_budget, max_length=2048):
            for i, (logprob, _) in zip(order, scores):
                packed[i] = logprob
        t_packed = time.perf_counter() - start
        start = time.perf_counter()
        shared = {}
        for index, scores in score_shared_context(model, docs, token_budget=args.token_budget):
            for (d, j), (logprob, _) in zip(index, scores):
                shared[d * 4 + j] = logprob
        t_shared = time.perf_counter() - start
        diff = max(abs(packed[i] - shared[i]) for i in range(len(requests)))
        tokens_packed = sum(len(r.tokens) for r in requests)
        tokens_shared = sum(len(c) + sum(len(x) for x in conts) for c, conts in docs)
        print(f"{name}: packed {t_packed:.2f} s ({tokens_packed} tokens), shared context {t_shared:.2f} s "
              f"({tokens_shared} tokens + padding); max |difference| {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
