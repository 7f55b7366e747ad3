"""A very small training run for the fault and bad-input tests: a 0.7M-parameter Gated DeltaNet, 2 x 32 tokens a
step, through the paper's command (tests/paper_command.py) with tiny sizes. Helpers run it with `bash train.sh`
or in-process, read its losses, and kill it the way a cluster does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CLEAN_ENV, REPO
from test_train_e2e import tiny_args

SMALL_MODEL = {
    "model_type": "gated_deltanet", "hidden_size": 64, "num_heads": 2, "head_dim": 32, "expand_v": 1,
    "num_hidden_layers": 2, "hidden_ratio": 2, "conv_size": 4, "vocab_size": 4096, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False,
}
STEPS = 20
TRAIN_SH_ENV = {**CLEAN_ENV, "HF_DATASETS_OFFLINE": "1"}


def small_config(corpus: dict) -> Path:
    """The model config as a JSON file next to the session's corpus."""
    path = corpus["tokenizer"].parent / "small_gated_deltanet.json"
    if not path.is_file():
        path.write_text(json.dumps(SMALL_MODEL))
    return path


def small_args(corpus: dict, dump: Path, **extra: str | None) -> list[str]:
    """The paper's flags for a 20-step run saving every 5 steps (keep_latest_k 2, load_step -1, log_freq 1)."""
    return tiny_args(corpus, dump, **{
        "model.config": str(small_config(corpus)),
        "lr_scheduler.warmup_steps": "2",
        "training.batch_size": "2",
        "training.seq_len": "32",
        "training.gradient_accumulation_steps": "1",
        "training.steps": str(STEPS),
        "training.num_workers": "0",
        "checkpoint.interval": "5",
        "metrics.enable_tensorboard": "false",
        **extra,
    })


def train_sh(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "train.sh", *args], cwd=REPO, env=TRAIN_SH_ENV, capture_output=True, text=True)


def start_train_sh(args: list[str]) -> subprocess.Popen:
    """`bash train.sh` in its own session, as a job scheduler starts it."""
    return subprocess.Popen(["bash", "train.sh", *args], cwd=REPO, env=TRAIN_SH_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def metrics_lines(dump: Path) -> list[dict]:
    """Every record of metrics.jsonl in order (a resumed run appends; steps after its checkpoint repeat)."""
    path = dump / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll `condition()` until true; fail if the run ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the moment to act"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> dict[int, int]:
    """`pid`'s children, their children, and so on (from /proc): PID -> start time, which tells a process from
    a later one given the same PID (PIDs wrap at 32768 here, and a CI run's threads use them up in minutes)."""
    parents, started = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if (fields := _stat(int(stat.parent.name))) is not None:
            parents[int(stat.parent.name)], started[int(stat.parent.name)] = int(fields[1]), int(fields[19])
    found = {pid}
    while True:
        more = {child for child, parent in parents.items() if parent in found} - found
        if not more:
            break
        found |= more
    return {child: started[child] for child in found - {pid}}


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants at once, as a cluster kills a job's cgroup (torchrun starts every
    trainer in a session of its own, so killing train.sh's process group would leave the trainer running)."""
    doomed = descendants(pid)
    for victim in [pid, *doomed]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for victim, started in doomed.items():  # reparented children: wait until they are gone (or zombies)
        while alive(victim, started):
            time.sleep(0.01)


def alive(pid: int, started: int | None = None) -> bool:
    """Whether `pid` runs (a zombie, which has ended and closed its files, does not); with `started` (its start
    time, from `descendants`), only the process that started then, not a later one given the same PID."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and (started is None or int(fields[19]) == started)
