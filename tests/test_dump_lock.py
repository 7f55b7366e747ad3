"""One run per dump folder, and trainers that end with their launcher (issue 21; lmlab.dumplock).

The lock's rules run in forked processes holding it the way the launcher, torchrun and the trainers do
(milliseconds each); one test goes through `bash train.sh`: a second run on a busy dump folder is refused,
and a `kill -9` of the first run's launcher stops its torchrun and trainer, which save, and frees the folder
(two starts of train.sh, overlapped: about 30 s on this repository's 2-core machine, most of it importing torch
and transformers in the launchers, torchrun and the trainer).
"""
from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from lmlab import dumplock, launch
from lmlab.checkpoint import complete_steps
from lmlab.dumplock import DumpInUse
from lmlab.errors import UserError
from tiny_run import alive, descendants, metrics_lines, small_args, start_train_sh, wait_for

HOST = socket.gethostname()
FORK = multiprocessing.get_context("fork")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and PR_SET_PDEATHSIG: Linux")


def in_use(dump: Path, pid: int) -> str:
    """The refusal's line (without "error: "), as a regex."""
    return (rf"{re.escape(str(dump))} is in use by another lmlab run \(PID {pid} on {re.escape(HOST)}, since "
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d\); wait for it or stop it")


def _hold(acquire: Callable[[], object], ready) -> None:
    lock = acquire()
    ready.send(getattr(lock, "token", None))
    time.sleep(300)


def holder(acquire: Callable[[], object]) -> tuple[multiprocessing.Process, str | None]:
    """A forked process that runs `acquire()` and holds what it got until killed; returns it and the token."""
    receive, send = FORK.Pipe(duplex=False)
    process = FORK.Process(target=_hold, args=(acquire, send), daemon=True)
    process.start()
    assert receive.poll(30), "the holder did not start"
    return process, receive.recv()


def kill(process: multiprocessing.Process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join()


def test_a_second_owner_is_refused_in_one_line_naming_the_holder_and_writes_nothing(tmp_path):
    first, _ = holder(lambda: dumplock.take(tmp_path))
    lock_file = (tmp_path / ".lmlab.lock").read_bytes()
    with pytest.raises(DumpInUse) as refused:
        dumplock.take(tmp_path)
    assert re.fullmatch(in_use(tmp_path, first.pid), str(refused.value)), str(refused.value)
    assert (tmp_path / ".lmlab.lock").read_bytes() == lock_file
    assert [p.name for p in tmp_path.iterdir()] == [".lmlab.lock"]
    kill(first)


def test_a_lock_left_by_a_killed_run_is_free(tmp_path):
    """The kernel releases an flock with its holder's last descriptor: the stale file is no obstacle."""
    first, _ = holder(lambda: dumplock.take(tmp_path, shared=True))
    kill(first)
    assert f'"pid": {first.pid}' in (tmp_path / ".lmlab.lock").read_text()  # its record is still there
    with dumplock.take(tmp_path) as lock:
        assert lock.fd is not None
        assert f'"pid": {os.getpid()}' in (tmp_path / ".lmlab.lock").read_text()


def test_trainers_share_their_launchers_lock_which_lasts_until_the_last_of_them_ends(tmp_path):
    launcher, token = holder(lambda: dumplock.take(tmp_path, shared=True))
    trainer, _ = holder(lambda: dumplock.join(tmp_path, token))
    with pytest.raises(DumpInUse):  # a trainer of another run (another launcher's token) is refused
        dumplock.join(tmp_path, "another run's token")
    kill(launcher)
    with pytest.raises(DumpInUse) as refused:  # the trainer left behind still owns the folder, and is named
        dumplock.take(tmp_path)
    assert re.fullmatch(in_use(tmp_path, trainer.pid), str(refused.value)), str(refused.value)
    kill(trainer)
    dumplock.take(tmp_path).close()


def test_a_trainer_whose_launcher_lost_the_folder_is_refused(tmp_path):
    """Its launcher and torchrun died before it joined and a new run took the folder: the token differs."""
    launcher, token = holder(lambda: dumplock.take(tmp_path, shared=True))
    kill(launcher)
    newer, _ = holder(lambda: dumplock.take(tmp_path, shared=True))
    with pytest.raises(DumpInUse) as refused:
        dumplock.join(tmp_path, token)
    assert re.fullmatch(in_use(tmp_path, newer.pid), str(refused.value)), str(refused.value)
    kill(newer)


def _trainer_with_a_worker(dump: Path, worker_pid) -> None:
    lock = dumplock.for_trainer(dump)  # no launcher: the trainer owns the folder
    worker = FORK.Process(target=time.sleep, args=(300,), daemon=False)  # a data-loader worker, say
    worker.start()
    worker_pid.value = worker.pid
    time.sleep(300)
    lock.close()


def test_a_trainers_forked_children_do_not_keep_its_lock(tmp_path):
    worker_pid = FORK.Value("i", 0)
    trainer = FORK.Process(target=_trainer_with_a_worker, args=(tmp_path, worker_pid))
    trainer.start()
    deadline = time.monotonic() + 30
    while not worker_pid.value:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(DumpInUse):
        dumplock.take(tmp_path)
    kill(trainer)
    try:
        assert alive(worker_pid.value)
        dumplock.take(tmp_path).close()  # the worker lives on, without the lock
    finally:
        os.kill(worker_pid.value, signal.SIGKILL)


def test_with_several_nodes_the_trainer_of_rank_0_alone_holds_the_lock(tmp_path, monkeypatch):
    monkeypatch.delenv(dumplock.TOKEN_ENV, raising=False)
    monkeypatch.setenv("NNODE", "2")
    launcher = dumplock.for_launcher(tmp_path)  # it cannot know whether the other nodes share the folder
    assert launcher.fd is None and dumplock.trainer_env(launcher) == {}
    monkeypatch.setenv("RANK", "1")
    assert dumplock.for_trainer(tmp_path).fd is None
    monkeypatch.setenv("RANK", "0")
    with dumplock.for_trainer(tmp_path) as rank_0:
        assert rank_0.fd is not None
        with pytest.raises(DumpInUse):
            dumplock.take(tmp_path)


def test_a_filesystem_without_locks_gets_a_warning_and_no_lock(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(dumplock.fcntl, "flock", no_locks)
    lock = dumplock.take(tmp_path, shared=True)
    assert lock.fd is None and dumplock.trainer_env(lock) == {dumplock.TOKEN_ENV: dumplock.NO_LOCK}
    assert capsys.readouterr().err == (f"warning: cannot lock {tmp_path} (No locks available); nothing stops a "
                                       "second lmlab run from using it at the same time\n")
    monkeypatch.setenv(dumplock.TOKEN_ENV, dumplock.NO_LOCK)
    assert dumplock.for_trainer(tmp_path).fd is None  # its trainers take none, silently
    assert capsys.readouterr().err == ""


def test_a_dump_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.delenv("NNODE", raising=False)
    with pytest.raises(UserError) as refused:
        dumplock.for_launcher(tmp_path / "file" / "dump")
    assert str(refused.value) == f"cannot lock {tmp_path / 'file' / 'dump'}: Not a directory"


def _parent_of_a_sleeper(marker: Path, ready) -> None:
    parent = os.getpid()
    script = ("import pathlib, signal, sys, time\n"
              f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).touch(), sys.exit(0)))\n"
              "print('ready', flush=True)\ntime.sleep(300)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: dumplock.die_with_parent(parent))
    child.stdout.readline()
    ready.send(child.pid)
    time.sleep(300)


def test_a_child_set_to_die_with_its_parent_gets_sigterm_when_the_parent_is_killed(tmp_path):
    receive, send = FORK.Pipe(duplex=False)
    parent = FORK.Process(target=_parent_of_a_sleeper, args=(tmp_path / "got SIGTERM", send), daemon=True)
    parent.start()
    assert receive.poll(60)
    child = receive.recv()
    kill(parent)
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.01)
    assert (tmp_path / "got SIGTERM").exists()


def test_a_child_whose_parent_died_before_it_asked_ends_at_once():
    """The race between fork and prctl: the parent it was started by is no longer its parent."""
    child = FORK.Process(target=dumplock.die_with_parent, args=(os.getpid() + 1,))
    child.start()
    child.join(10)
    assert child.exitcode == 128 + signal.SIGTERM


def test_torchrun_takes_the_launchers_death_as_one_stop_signal(monkeypatch):
    """The kernel sends the parent-death SIGTERM again each time torchrun passes to another thread of the
    dying launcher; torchrun's handler sees the first only (a second one cut short its wait for the saving
    trainers, and torchrun then hung at exit). Signals while the launcher lives pass every time."""
    calls, parent = [], [os.getppid()]
    monkeypatch.setattr(os, "getppid", lambda: parent[0])
    handle = launch.launcher_death_once(lambda signum, frame: calls.append(signum))
    handle(signal.SIGINT, None)
    handle(signal.SIGINT, None)  # a second Ctrl-C, forwarded by the launcher
    parent[0] = 1  # the launcher died: torchrun was handed to init
    for _ in range(3):
        handle(signal.SIGTERM, None)
    assert calls == [signal.SIGINT, signal.SIGINT, signal.SIGTERM]


# --- through bash train.sh ------------------------------------------------------------------------------

def survivors_described(pids: list[int]) -> str:
    """Each process's command line and state, for a failure message."""
    described = []
    for pid in pids:
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].strip()
            described.append(f"{pid} ({state}): {command}")
    return "; ".join(described)


def test_a_second_run_is_refused_and_kill_9_of_the_launcher_stops_the_first_which_saves(corpus, tmp_path):
    args = small_args(corpus, tmp_path, **{"training.steps": "1000"})
    first = start_train_sh(args)  # train.sh execs the launcher: this is the launcher's PID
    lock_file = tmp_path / ".lmlab.lock"
    wait_for(lambda: lock_file.is_file() and lock_file.read_text().endswith("\n"), first)  # it owns the folder
    owner = lock_file.read_text()
    second = start_train_sh(args)  # meanwhile, the first run's torchrun and trainer start
    wait_for(lambda: len(metrics_lines(tmp_path)) >= 2, first)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2
    assert re.fullmatch("error: " + in_use(tmp_path, first.pid), err.strip()), err[-3000:]
    assert lock_file.read_text().startswith(owner)  # the owner's record, then its trainer's line
    assert len(list((tmp_path / "logs").iterdir())) == 1  # the first run's torchrun logs only
    processes = descendants(first.pid)  # torchrun and the trainer
    assert len(processes) >= 2

    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    # the current step, a save, torchrun's exit: a few seconds on an idle machine, over 30 on a loaded one
    # (a CI run beside other test processes); the guarantee is that they end, not how fast
    deadline = time.monotonic() + 120
    try:
        while survivors := [pid for pid, started in processes.items() if alive(pid, started)]:
            assert time.monotonic() < deadline, f"outlived the launcher: {survivors_described(survivors)}"
            time.sleep(0.01)
    finally:
        for pid, started in processes.items():
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)
    first.communicate()  # its output pipes, which torchrun and the trainer held
    steps = [r["step"] for r in metrics_lines(tmp_path)]
    time.sleep(1)
    assert [r["step"] for r in metrics_lines(tmp_path)] == steps == list(range(1, len(steps) + 1))
    assert steps[-1] < 1000 and steps[-1] in complete_steps(tmp_path / "checkpoint")  # SIGTERM: saved
    # the folder is free again (that the same command then resumes there: test_reliability.py's
    # test_10_steps_kill_and_resume_…, after a SIGKILL of the whole tree, and test_sigterm_saves_…)
    dumplock.take(tmp_path).close()
