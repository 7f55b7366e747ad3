"""`bash train.sh <flags>`: check the flags, then start the trainer on every GPU through torchrun.

Environment (flame's): NNODE (1), NGPU (all visible GPUs; 1 CPU process without GPUs), LOG_RANK (0),
MASTER_ADDR (localhost), MASTER_PORT (0 = pick a free port; multi-node needs a fixed one).
Bad flags fail here, before any process starts, with one line and exit code 2.

Stopping: SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, `kill`) sent to this process or to its
process group reaches every trainer once, through torchrun; the trainers save a checkpoint and exit, and
train.sh exits 0 with a line saying how to resume.

One run per dump folder: the launcher locks `<dump>/.lmlab.lock` before it writes anything there and refuses a
second run on the same folder (one line, exit code 2); torchrun and the trainers hold the lock too, so it
lasts as long as any process of the run. If the launcher is SIGKILLed, torchrun gets SIGTERM (Linux) and stops
the trainers, which save. See lmlab.dumplock.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from lmlab import dumplock
from lmlab.config import JobConfig, parse_args
from lmlab.dump import check_dump_folder, dump_write_failed
from lmlab.errors import command
from lmlab.metrics import PROGRESS_FILE_ENV
from lmlab.train import check_inputs

# The signals torchrun passes on to the trainers (they save on SIGINT / SIGTERM).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# torchrun's main, minus its traceback when a trainer explained its exit (see torchrun()).
TORCHRUN = "import sys; from lmlab.launch import torchrun; sys.exit(torchrun())"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun() -> int:
    """`torch.distributed.run` with torchrun's argv, without torchrun's traceback: after a stop signal (torchrun
    waits for the trainers to save) it returns 128 + the signal's number; after a trainer's own error line (the
    launcher repeats it) 1; after a trainer died without one (a signal, a crash in native code) one line
    naming the rank and how it ended, and 1."""
    from torch.distributed.elastic.multiprocessing import api as elastic_api
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    os.environ[dumplock.AGENT_PID_ENV] = str(os.getpid())  # the trainers' parent: they end with it
    # torch registers this handler when it starts the trainers: this process is torchrun's alone
    elastic_api._terminate_process_handler = launcher_death_once(elastic_api._terminate_process_handler)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_explained_failure_filter)
    try:
        main()
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        if not Path(os.environ.get("LMLAB_EXIT_FILE", "")).is_file():
            rank, failure = exc.get_first_failure()
            how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
            print(f"error: trainer rank {rank} {how} without an error line (out of memory on the host? a crash in "
                  "native code?); its output is above and in the dump's logs folder", file=sys.stderr, flush=True)
        return 1
    return 0


def launcher_death_once(handler: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
    """torchrun's stop-signal `handler`, taking the launcher's death as one signal. The kernel sends the
    parent-death SIGTERM again each time torchrun passes to another thread of the dying launcher (two or
    three within milliseconds, seen under load); the second, raised inside torchrun's wait for the saving
    trainers, cut that wait short: the trainers were never reaped and torchrun hung at exit on its
    log-tailing threads. A signal before the launcher's death is passed on every time (a second Ctrl-C
    still cuts the wait short)."""
    launcher, stopping = os.getppid(), False

    def handle(signum: int, frame: Any) -> None:
        nonlocal stopping
        if os.getppid() != launcher:
            if stopping:
                return
            stopping = True
        handler(signum, frame)

    return handle


def _explained_failure_filter(record: logging.LogRecord) -> bool:
    """Drop torchrun's "failed (exitcode: 2) local_rank: 0 ..." line for a trainer that explained its exit
    (the launcher prints the trainer's line instead); keep it for a crash."""
    explained = Path(os.environ.get("LMLAB_EXIT_FILE", "")).is_file()
    return not (explained and str(record.msg).startswith("failed (exitcode"))


def run_forwarding_signals(command: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = (),
                           progress: Path | None = None) -> int:
    """Run `command` in its own session and pass it the signals in FORWARDED that this process gets; it gets
    SIGTERM if this process dies (Linux), and inherits the descriptors in `pass_fds` (the dump's lock).
    `progress`: the trainer's progress file, shown as a bar under the command's output (`show_progress`).

    Its own session: a signal for train.sh's process group (Ctrl-C) must reach torchrun once, through
    us, not twice (a second one would cut short torchrun's wait for the trainers to save).
    """
    launcher = os.getpid()
    piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True} if progress else {}
    proc = subprocess.Popen(command, env=env, start_new_session=True, pass_fds=pass_fds,
                            preexec_fn=lambda: dumplock.die_with_parent(launcher), **piped)
    previous = {sig: signal.signal(sig, lambda signum, _: proc.send_signal(signum)) for sig in FORWARDED}
    try:
        if progress is not None:
            show_progress(proc, progress)
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def show_progress(proc: subprocess.Popen, progress: Path) -> None:
    """On a terminal: `proc`'s output line by line above a per-step progress bar of the trainer's progress
    file ("step total"). tqdm's ETA is a moving average of the recent steps of this launch (a resumed run's bar
    starts at its step). torchrun turns the trainer's own output into lines, so the bar is drawn here."""
    from tqdm import tqdm

    bar: tqdm | None = None

    def follow() -> None:
        nonlocal bar
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                step, total = map(int, progress.read_text().split())
                if bar is None:
                    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, leave=False)
                else:
                    bar.update(step - bar.n)
            time.sleep(0.2)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    for line in proc.stdout:
        if bar is None:
            print(line, end="", flush=True)
        else:
            bar.write(line.rstrip("\n"))
    follower.join()
    if bar is not None:
        bar.close()


@command("train.sh")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    check_dump_folder(Path(cfg.job.dump_folder))
    check_inputs(cfg)  # a bad input: one line, nothing started or created
    # before anything in the dump folder is written: a second run there must not touch it
    lock = dumplock.for_launcher(Path(cfg.job.dump_folder))
    with lock:
        return launch(cfg, argv, lock)


def launch(cfg: JobConfig, argv: list[str], lock: dumplock.DumpLock) -> int:
    nproc = os.environ.get("NGPU") or str(max(visible_gpus(), 1))
    logs = Path(cfg.job.dump_folder) / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise dump_write_failed(Path(cfg.job.dump_folder), exc) from None
    with tempfile.TemporaryDirectory() as tmp:
        exit_file = Path(tmp) / "exit.json"
        progress = Path(tmp) / "progress" if sys.stderr.isatty() else None  # no bar in a log file
        env = {
            **({PROGRESS_FILE_ENV: str(progress)} if progress else {}),
            **{k: v for k, v in os.environ.items() if k != dumplock.TOKEN_ENV},
            **dumplock.trainer_env(lock),
            "LMLAB_EXIT_FILE": str(exit_file),
            # Each data worker tokenizes on one thread; a thread pool per worker would oversubscribe the CPUs.
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
        }
        command = [
            sys.executable, "-c", TORCHRUN,
            f"--nnodes={os.environ.get('NNODE', '1')}",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ.get('MASTER_PORT', '0')}",
            "--local-ranks-filter", os.environ.get("LOG_RANK", "0"),
            "--role", "rank", "--tee", "3", "--log-dir", str(logs),
            "-m", "lmlab.train", *argv,
        ]
        code = run_forwarding_signals(command, env, () if lock.fd is None else (lock.fd,), progress)
        if code != 0 and exit_file.is_file():
            # torchrun reports a failed or stopped trainer at length; repeat the trainer's own line last
            # (an error, or how to resume after a stop, which is a success).
            report = json.loads(exit_file.read_text())
            print(report["message"], file=sys.stderr if report["exit_code"] else sys.stdout)
            return int(report["exit_code"])
        return code


if __name__ == "__main__":
    sys.exit(main())
