import json
import math
import os
import subprocess
import sys
from pathlib import Path

# Tests never touch the network: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs one pytest-xdist worker per core: each computes on one thread, and so do the processes it
# starts (on a busy core every multi-threaded op waits for its preempted thread).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (paper_command, ...)

import pytest

REPO = Path(__file__).resolve().parents[1]
# The environment of subprocesses that must not inherit the caller's: they run this checkout's lmlab (not an
# editable install's from another worktree), offline.
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1",
             **{key: os.environ[key] for key in ("OMP_NUM_THREADS",) if key in os.environ}}


def errors_in_triton_interpreter(script: str) -> dict[str, list[float]]:
    """Run tests/<script> on CPU under Triton's interpreter (TRITON_INTERPRET must be set before triton is
    imported, hence the subprocess); it prints one JSON line: case -> max relative errors."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name(script))], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # a NaN error reads as inf: the tests take max(errors), which passes over a NaN that is not the first
    return json.loads(done.stdout.strip().splitlines()[-1], parse_constant=lambda _: math.inf)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A local training corpus (train.jsonl + held-out docs) and a 4096-token BPE tokenizer folder."""
    from lmlab.quickstart import train_tokenizer, write_corpus

    root = tmp_path_factory.mktemp("corpus")
    train_path, valid_docs = write_corpus(root / "data")
    texts = [line for line in train_path.read_text().splitlines()[:400]]
    train_tokenizer(texts, root / "tokenizer")
    return {"train": train_path, "valid": valid_docs, "tokenizer": root / "tokenizer"}
