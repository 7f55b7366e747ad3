"""Faults and safety: kills at any moment, stop signals, a full disk, non-finite steps, no unsafe loading.

Exact resume and signals go through `bash train.sh` (the launcher and torchrun are part of what must work).
The kill sweep runs `lmlab.train.main` in a forked child instead: no imports to pay, so each moment costs a
second or two, and a patched function lets the child kill itself at an exact point of a checkpoint write.
"""
from __future__ import annotations

import ast
import itertools
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lmlab.checkpoint
import lmlab.train
from conftest import REPO
from lmlab import convert
from lmlab.checkpoint import complete_steps, load_model_weights
from lmlab.config import JobConfig, parse_args
from tiny_run import (STEPS, kill_tree, metrics_lines, small_args, start_train_sh, train_sh,
                      wait_for)


def summary(records: list[dict]) -> list[tuple]:
    """What must be identical between an interrupted and an uninterrupted run, step by step."""
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens_seen"]) for r in records]


@dataclass
class Run:
    dump: Path
    records: list[dict]


# --- lmlab.train.main in a forked child ---------------------------------------------------------------

def run_forked(argv: list[str], setup: Callable[[], None] | None = None,
               meanwhile: Callable[[multiprocessing.Process], None] | None = None) -> int:
    """Run lmlab.train.main(argv) in a forked child; `setup` runs in the child first (patches, limits),
    `meanwhile` in this process while the child runs. Returns the exit code (-9: killed by SIGKILL)."""
    child = multiprocessing.get_context("fork").Process(target=_child_main, args=(argv, setup))
    child.start()
    if meanwhile is not None:
        meanwhile(child)
    child.join(timeout=300)
    if child.is_alive():
        child.kill()
        pytest.fail("the training child hung")
    return child.exitcode


def _child_main(argv: list[str], setup: Callable[[], None] | None) -> None:
    torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork: a child using it would hang
    os.chdir(REPO)  # the paper's command names flame/models/fla.toml relative to the repository
    if setup is not None:
        setup()
    sys.exit(lmlab.train.main(argv))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_when(owner: object, name: str, when: Callable[..., bool]) -> None:
    """In the child: replace owner.name by a wrapper that SIGKILLs the process on a call where when(*args)."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            die()
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Run:
    """The uninterrupted in-process run every kill is compared with."""
    dump = tmp_path_factory.mktemp("straight")
    assert run_forked(small_args(corpus, dump)) == 0
    return Run(dump, metrics_lines(dump))


# --- SIGKILL at seeded moments ------------------------------------------------------------------------

# Where a kill can land: inside a checkpoint save after DCP wrote step-N.tmp but before the rename ("save"),
# inside keep_latest_k's deletion of an older step, renamed to *.deleted.tmp but not yet deleted ("retention"),
# inside the HF export with the new weights moved in but not the config ("export"), inside the training step
# N ("step"), or at a random wall-clock moment after step N was logged ("timer").
WRITE_MOMENTS = [("save", 5), ("save", 10), ("save", 15), ("save", 20), ("retention", 15), ("retention", 20),
                 ("export", 20)]


def seeded_kill_moments(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """`n` distinct moments inside training steps or at random times, drawn with a fixed seed."""
    pool = [("step", s) for s in range(1, STEPS + 1)] + [("timer", s) for s in range(1, 16)]
    return sorted(random.Random(seed).sample(pool, n))


def kill_setup(point: str, step: int) -> Callable[[], None] | None:
    """In the child: patch the function in which the kill must land."""
    def setup() -> None:
        if point == "step":
            calls = itertools.count(1)
            die_when(lmlab.train, "forward_backward", lambda *a, **k: next(calls) == step)
        elif point == "save":
            die_when(lmlab.checkpoint, "_finish_write", lambda tmp, *a: tmp.name == f"step-{step}.tmp")
        elif point == "retention":  # the save of `step` deletes the step 10 before it (interval 5, keep 2)
            die_when(shutil, "rmtree", lambda path, *a, **k: Path(path).name == f"step-{step - 10}.deleted.tmp")
        elif point == "export":
            die_when(os, "replace", lambda src, dst: Path(src).parent.name == ".hf-export.tmp"
                     and Path(dst).name == "config.json")
    return None if point == "timer" else setup


def kill_timer(dump: Path, step: int) -> Callable[[multiprocessing.Process], None]:
    """In this process: SIGKILL the child a seeded fraction of a step after it logged `step`."""
    def meanwhile(child: multiprocessing.Process) -> None:
        while len(metrics_lines(dump)) < step:
            assert child.is_alive(), "the run ended before the kill"
            child.join(0.005)
        child.join(random.Random(step).uniform(0, 0.1))
        os.kill(child.pid, signal.SIGKILL)
    return meanwhile


# What a kill at each point leaves behind in the checkpoint folder, besides complete checkpoints.
LEFTOVER = {"save": "step-{step}.tmp", "retention": "step-{earlier}.deleted.tmp"}


@pytest.mark.parametrize("point, step", [  # 21 moments: one in the default suite, 20 more with -m slow
    pytest.param(point, step, marks=[] if (point, step) == ("save", 10) else pytest.mark.slow)
    for point, step in WRITE_MOMENTS + seeded_kill_moments(14)
])
def test_kill_at_any_moment_resumes_exactly_from_the_newest_complete_checkpoint(point, step, corpus, tmp_path,
                                                                                straight):
    args = small_args(corpus, tmp_path)
    meanwhile = kill_timer(tmp_path, step) if point == "timer" else None
    assert run_forked(args, kill_setup(point, step), meanwhile) == -signal.SIGKILL

    folder = tmp_path / "checkpoint"
    complete = complete_steps(folder)
    assert all((folder / f"step-{s}" / "lmlab.json").is_file() for s in complete)  # complete or absent
    if point in LEFTOVER:  # the kill did land inside the write
        assert (folder / LEFTOVER[point].format(step=step, earlier=step - 10)).is_dir()
    logged = len(metrics_lines(tmp_path))

    assert run_forked(args) == 0  # the paper's flags: --checkpoint.load_step -1 --checkpoint.keep_latest_k 2
    newest = max(complete, default=0)
    resumed = metrics_lines(tmp_path)[logged:]
    assert summary(resumed) == summary(straight.records[newest:])  # starts right after `newest`, same losses
    # keep_latest_k counted complete checkpoints only, and leftovers were cleaned up
    assert sorted(p.name for p in folder.iterdir()) == ["step-15", "step-20"]
    assert not (tmp_path / ".hf-export.tmp").exists()
    assert (tmp_path / "model.safetensors").read_bytes() == (straight.dump / "model.safetensors").read_bytes()


# --- through bash train.sh: exact resume (issue 5) and stop signals ------------------------------------

def sh_args(corpus: dict, dump: Path) -> list[str]:
    return small_args(corpus, dump, **{"training.num_workers": "2"})  # loader workers' state resumes too


@pytest.fixture(scope="module")
def straight_sh(corpus, tmp_path_factory) -> Run:
    dump = tmp_path_factory.mktemp("straight_sh")
    result = train_sh(sh_args(corpus, dump))
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(dump, metrics_lines(dump))


def resume_and_check(args: list[str], dump: Path, from_step: int, straight: Run) -> None:
    """Resume with the same command; the first `from_step` records and the new ones equal the straight run's."""
    before = metrics_lines(dump)
    result = train_sh(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {from_step}" in result.stdout
    records = [r for r in before if r["step"] <= from_step] + metrics_lines(dump)[len(before):]
    assert summary(records) == summary(straight.records)


def test_10_steps_kill_and_resume_give_the_losses_of_20_straight_steps(corpus, tmp_path, straight_sh):
    args = sh_args(corpus, tmp_path)
    run = start_train_sh(args)
    wait_for(lambda: 10 in complete_steps(tmp_path / "checkpoint"), run)
    kill_tree(run.pid)
    run.communicate()
    resume_and_check(args, tmp_path, max(complete_steps(tmp_path / "checkpoint")), straight_sh)


def stop_with(sig: signal.Signals, args: list[str], dump: Path, after_step: int, group: bool) -> int:
    """Send `sig` once `after_step` is logged; check the clean stop and return the step it saved."""
    run = start_train_sh(args)
    wait_for(lambda: len(metrics_lines(dump)) >= after_step, run)
    if group:
        os.killpg(run.pid, sig)  # Ctrl-C in a terminal signals the whole foreground process group
    else:
        run.send_signal(sig)  # a scheduler or `kill` signals train.sh
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    saved = re.fullmatch(rf"lmlab: {sig.name} received; saved step (\d+)\. Continue it with: bash train\.sh "
                         rf"--job\.config_file {re.escape(str(dump / 'job_config.toml'))} .*",
                         out.strip().splitlines()[-1])
    assert saved, out[-1000:]
    assert int(saved[1]) in complete_steps(dump / "checkpoint")
    return int(saved[1])


def test_sigterm_saves_the_current_step_exits_0_and_resumes_exactly(corpus, tmp_path, straight_sh):
    args = sh_args(corpus, tmp_path)
    step = stop_with(signal.SIGTERM, args, tmp_path, after_step=7, group=False)
    resume_and_check(args, tmp_path, step, straight_sh)


def test_ctrl_c_saves_the_current_step_and_exits_0(corpus, tmp_path):
    stop_with(signal.SIGINT, sh_args(corpus, tmp_path), tmp_path, after_step=4, group=True)


# --- a full disk ---------------------------------------------------------------------------------------

def test_failing_checkpoint_write_fails_in_one_line_and_keeps_earlier_checkpoints_and_export(
        corpus, tmp_path, straight, capfd):
    dump = tmp_path / "run"
    shutil.copytree(straight.dump, dump)
    # everything but the records of this run's own progress, config and lock
    before = {p: p.read_bytes() for p in dump.rglob("*") if p.is_file() and p.name not in ("metrics.jsonl",
                                                                                          "job_config.toml",
                                                                                          ".lmlab.lock")}

    def full_disk() -> None:  # writes past 1 MiB fail with EFBIG, as on a full disk; a checkpoint is ~8 MB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    capfd.readouterr()
    assert run_forked(small_args(corpus, dump, **{"training.steps": "30"}), full_disk) == 2
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: saving checkpoint \S+/step-25 failed \(.+\); [\d.]+ GiB free there; earlier "
                        r"checkpoints are intact", last), last
    assert {p: p.read_bytes() for p in before} == before  # checkpoints and the HF export are unchanged
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-15", "step-20"]


# --- non-finite steps ----------------------------------------------------------------------------------

def faulty_forward_backward(fault: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """A setup for run_forked: lmlab.train.forward_backward becomes fault(step, forward_backward, *args)."""
    def setup() -> None:
        real = lmlab.train.forward_backward
        steps = itertools.count(1)
        lmlab.train.forward_backward = lambda *args, **kwargs: fault(next(steps), real, *args, **kwargs)
    return setup


def nan_gradients_at(steps: set[int]) -> Callable[[], None]:
    """In the child: after the backward pass of these steps, every gradient is NaN."""
    def poisoned(step, real, model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        if step in steps:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        return loss
    return faulty_forward_backward(poisoned)


def test_consecutive_non_finite_steps_stop_the_run_and_nothing_corrupted_is_saved(corpus, tmp_path, capfd):
    args = small_args(corpus, tmp_path, **{"checkpoint.interval": "2", "training.max_consecutive_skips": "3"})
    capfd.readouterr()
    assert run_forked(args, nan_gradients_at({3, 4, 5})) == 2
    assert capfd.readouterr().err.strip().splitlines()[-1].startswith("error: step 5: 3 consecutive non-finite steps")

    folder = tmp_path / "checkpoint"
    assert complete_steps(folder) == [2, 4]  # step 4 was saved while skipping: with step 2's weights
    weights = []
    for step in (2, 4):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder / f"step-{step}"))
        load_model_weights(model, folder / f"step-{step}")
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.isfinite(weights[1]).all()
    assert torch.equal(weights[0], weights[1])  # skipped steps changed nothing

    logged = len(metrics_lines(tmp_path))
    assert run_forked(args) == 0  # resuming without the fault trains on from step 4
    resumed = metrics_lines(tmp_path)[logged:]
    assert resumed[0]["step"] == 5 and all(r["skipped_steps"] == 2 for r in resumed)


def out_of_memory_at(failing_step: int) -> Callable[[], None]:
    """In the child: forward_backward runs out of device memory at `failing_step`."""
    def failing(step, real, *args, **kwargs):
        if step == failing_step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 192.00 MiB.")
        return real(*args, **kwargs)
    return faulty_forward_backward(failing)


def test_out_of_memory_names_the_flags_that_need_less_and_keeps_earlier_checkpoints(corpus, tmp_path, capfd):
    args = small_args(corpus, tmp_path, **{"checkpoint.interval": "2"})
    capfd.readouterr()
    assert run_forked(args, out_of_memory_at(3)) == 2
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "error: step 3: out of memory on cpu with micro-batches of 2 x 32 tokens; pass "
        "--training.micro_batch_size 1 (gradient accumulation keeps the batch), or --activation_checkpoint.mode full")
    assert complete_steps(tmp_path / "checkpoint") == [2]


# --- safety ---------------------------------------------------------------------------------------------

def python_sources() -> list[Path]:
    return [*sorted((REPO / "src").rglob("*.py")), *sorted((REPO / "evals").rglob("*.py")), REPO / "launch_hf.py"]


def test_every_torch_load_is_weights_only_and_nothing_unpickles_freely():
    unsafe = []
    for path in python_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and "pickle.Unpickler" in map(ast.unparse, node.bases) and not any(
                    isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in node.body):
                unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name} without find_class")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            call = f"{owner}.{node.func.attr}"
            weights_only = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in node.keywords)
            if (call == "torch.load" and not weights_only) or call in ("pickle.load", "pickle.loads",
                                                                       "pickle.Unpickler"):
                unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}: {call}")
    assert not unsafe


def test_hf_export_holds_safetensors_only(straight):
    assert (straight.dump / "model.safetensors").is_file()
    assert not [p.name for p in straight.dump.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hf_weights_are_read_from_safetensors_never_unpickled(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text((REPO / "configs/tiny_gated_deltanet.json").read_text())
    torch.save({"model.embeddings.weight": _RunsCode(tmp_path / "ran")}, folder / "pytorch_model.bin")
    assert convert.main(["hf-to-dcp", "--model", str(folder), "--checkpoint", str(tmp_path / "ckpt")]) == 2
    assert "model.safetensors" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "ran").exists()


def test_trust_remote_code_is_off_unless_the_flag_is_passed(corpus, tmp_path, monkeypatch, capsys):
    assert JobConfig().model.trust_remote_code is False
    assert parse_args(["--model.trust_remote_code"]).model.trust_remote_code is True
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "config.json").write_text(
        '{"model_type": "custom_lm", "vocab_size": 4096, "auto_map": {"AutoConfig": "custom.Config"}}')
    (folder / "custom.py").write_text(
        f"import pathlib, transformers\npathlib.Path({str(marker)!r}).touch()\n"
        "class Config(transformers.PretrainedConfig):\n    model_type = 'custom_lm'\n"
    )
    monkeypatch.chdir(REPO)
    args = small_args(corpus, tmp_path / "dump", **{"model.config": str(folder)})
    assert lmlab.train.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --model.config {folder} holds custom code; lmlab runs it only with --model.trust_remote_code "
        "(read that code first)")
    assert not marker.exists()
    # passed through: the config's code runs (it defines no model, so the run stops there)
    assert lmlab.train.main([*args, "--model.trust_remote_code"]) == 2
    assert marker.exists()
