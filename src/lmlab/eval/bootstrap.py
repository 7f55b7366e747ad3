"""lm-eval's bootstrap standard error of a perplexity (lambada_openai's `perplexity_stderr`), computed with
the same random draws and the same arithmetic, vectorised.

lm-eval 0.4.13 estimates it from 100,000 resamples (`--bootstrap_iters`): chunk i of 1000 resamples draws
`random.Random(i).choices(xs, k=len(xs))` for each, and takes `math.exp(-sum(sample) / len(sample))`. In
Python that is 2 ms a resample: lambada's 5,153 documents took 106 s of the 2-core CPU's wall time (a
process pool over its cores), more than the rest of lm-eval's own work for the 9-task suite. Here the
draws come from numpy's Mersenne Twister started in each chunk's `random.Random(i)` state (the same
generator and the same 53-bit doubles, so the same indices `floor(u * n)`), and each resample's sum is
Python's `sum()` done over arrays: left to right before Python 3.12, Neumaier's compensated sum since
(CPython's float `sum`). The first resample is checked against Python's own `sum()`; where the two ever
differ, or for any other metric or non-float items, lm-eval's own function runs. Same result to the bit.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from lm_eval.api import metrics

CHUNK = 1000  # lm-eval's resamples per seed
BLOCK_DRAWS = 1 << 20  # draws held at once per thread (8 MiB)


def bootstrap_stderr(f: Callable[[Sequence[Any]], float], xs: Sequence[Any], iters: int,
                     lm_eval_stderr: Callable[..., float] = metrics.bootstrap_stderr) -> float:
    """lm-eval's `bootstrap_stderr(f, xs, iters)`: vectorised for `perplexity` over floats, else lm-eval's."""
    if f is not metrics.perplexity or not xs or not all(type(x) is float for x in xs):
        return lm_eval_stderr(f, xs, iters)
    values = np.array(xs, dtype=np.float64)
    chunk = min(CHUNK, iters)
    first = _resampled(_generator(0), values, 1)
    with np.errstate(all="ignore"):
        vectorised = _sums(first)[0]
    if vectorised != sum(first[0].tolist()):  # this Python sums floats some other way
        return lm_eval_stderr(f, xs, iters)
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # numpy releases the GIL in the draws and the sums
        sums = np.concatenate(list(pool.map(lambda seed: _chunk_sums(seed, values, chunk), range(iters // chunk))))
    return metrics.sample_stddev([math.exp(-(s / len(xs))) for s in sums.tolist()])


def _chunk_sums(seed: int, values: np.ndarray, resamples: int) -> np.ndarray:
    """The sums of chunk `seed`'s `resamples` resamples of `values`, in lm-eval's order."""
    draws, out = _generator(seed), np.empty(resamples)
    rows = max(1, BLOCK_DRAWS // len(values))
    for start in range(0, resamples, rows):
        block = _resampled(draws, values, min(rows, resamples - start))
        with np.errstate(all="ignore"):  # per thread: inf - inf in the unused branch of the compensation
            out[start:start + len(block)] = _sums(block)
    return out


def _generator(seed: int) -> np.random.RandomState:
    """numpy's Mersenne Twister in the state of Python's `random.Random(seed)`."""
    _, state, _ = random.Random(seed).getstate()
    generator = np.random.RandomState()
    generator.set_state(("MT19937", np.array(state[:-1], dtype=np.uint32), state[-1]))
    return generator


def _resampled(draws: np.random.RandomState, values: np.ndarray, rows: int) -> np.ndarray:
    """`rows` resamples of `values` [rows, n]: Random.choices' `population[floor(random() * n)]`, per row in
    turn (the product is never negative, so truncation is the floor)."""
    n = len(values)
    return values[(draws.random_sample((rows, n)) * float(n)).astype(np.intp)]


def _sums(block: np.ndarray) -> np.ndarray:
    """Each row's Python `sum()`: sequential before 3.12, Neumaier's compensated sum since."""
    if sys.version_info < (3, 12):
        return np.cumsum(block, axis=1)[:, -1]
    total, compensation = np.zeros(len(block)), np.zeros(len(block))
    for x in block.T:
        t = total + x
        compensation += np.where(np.abs(total) >= np.abs(x), (total - t) + x, (x - t) + total)
        total = t
    return np.where((compensation != 0) & np.isfinite(compensation), total + compensation, total)


@contextlib.contextmanager
def vectorised_bootstrap() -> Iterator[None]:
    """lm-eval's bootstrap standard errors through `bootstrap_stderr` above, for the block."""
    original = metrics.bootstrap_stderr
    metrics.bootstrap_stderr = lambda f, xs, iters: bootstrap_stderr(f, xs, iters, original)
    try:
        yield
    finally:
        metrics.bootstrap_stderr = original
