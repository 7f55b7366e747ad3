"""lmlab.eval.bootstrap: lm-eval's bootstrap standard error of a perplexity, vectorised, to the bit."""
import math
import random
import sys

import numpy as np
import pytest
from lm_eval.api import metrics

from lmlab.eval import bootstrap


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """lm-eval's own function in this process (its pool gives the same values: the same seeds per chunk)."""
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")


def loglikelihoods(n: int, seed: int = 0) -> list[float]:
    """Floats of very different sizes, so the order and kind of summation show in the last bits."""
    rng = random.Random(seed)
    return [-abs(rng.gauss(0, 1)) * 10 ** rng.randint(-8, 1) for _ in range(n)]


@pytest.mark.parametrize("n, iters", [(300, 3000), (50, 700), (1, 1000), (257, 2500)])
def test_perplexity_stderr_is_lm_evals_to_the_bit(n, iters):
    """Several chunks, one short chunk, one item, and iters not a multiple of the chunk (lm-eval drops the rest)."""
    xs = loglikelihoods(n, seed=n)
    assert bootstrap.bootstrap_stderr(metrics.perplexity, xs, iters) == metrics.bootstrap_stderr(
        metrics.perplexity, xs, iters)


def sequential(xs: list[float]) -> float:
    """Python's float sum() before 3.12."""
    total = 0.0
    for x in xs:
        total += x
    return total


def neumaier(xs: list[float]) -> float:
    """CPython 3.12's float sum(), transcribed."""
    total, compensation = 0.0, 0.0
    for x in xs:
        t = total + x
        compensation += (total - t) + x if abs(total) >= abs(x) else (x - t) + total
        total = t
    return total + compensation if compensation and math.isfinite(compensation) else total


@pytest.mark.parametrize("version, python_sum", [((3, 11), sequential), ((3, 12), neumaier)])
def test_each_pythons_sum_is_reproduced(monkeypatch, version, python_sum):
    rows = np.array([loglikelihoods(200, seed) for seed in range(20)])
    expected = [python_sum(row) for row in rows.tolist()]
    assert expected != [(neumaier if python_sum is sequential else sequential)(row) for row in rows.tolist()]
    monkeypatch.setattr(sys, "version_info", version)
    assert bootstrap._sums(rows).tolist() == expected


def test_the_running_pythons_sum_is_reproduced():
    rows = np.array([loglikelihoods(500, seed) for seed in range(10)])
    assert bootstrap._sums(rows).tolist() == [sum(row) for row in rows.tolist()]


def test_other_metrics_and_items_run_lm_evals_own(monkeypatch):
    calls = []

    def lm_evals(f, xs, iters):
        calls.append(f)
        return 0.5

    ints = [random.Random(1).randrange(10) for _ in range(30)]
    assert bootstrap.bootstrap_stderr(metrics.median, loglikelihoods(30), 100, lm_evals) == 0.5
    assert bootstrap.bootstrap_stderr(metrics.perplexity, ints, 100, lm_evals) == 0.5
    assert calls == [metrics.median, metrics.perplexity]
    # a Python whose sum() is neither: the check on the first resample hands over to lm-eval's
    monkeypatch.setattr(bootstrap, "_sums", lambda block: np.zeros(len(block)) + 1.5)
    assert bootstrap.bootstrap_stderr(metrics.perplexity, loglikelihoods(30), 100, lm_evals) == 0.5


def test_the_swap_lasts_the_block():
    original = metrics.bootstrap_stderr
    with bootstrap.vectorised_bootstrap():
        assert metrics.bootstrap_stderr is not original
        xs = loglikelihoods(40)
        assert metrics.stderr_for_metric(metrics.perplexity, 1000)(xs) == original(metrics.perplexity, xs, 1000)
    assert metrics.bootstrap_stderr is original
