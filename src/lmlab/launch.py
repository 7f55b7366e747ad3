"""`bash train.sh <flags>`: check the flags, then start the trainer on every GPU through torchrun.

Environment (flame's): NNODE (1), NGPU (all visible GPUs; 1 CPU process without GPUs), LOG_RANK (0),
MASTER_ADDR (localhost), MASTER_PORT (0 = pick a free port; multi-node needs a fixed one).
Bad flags fail here, before any process starts, with one line and exit code 2.

Stopping: SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, `kill`) sent to this process or to its
process group reaches every trainer once, through torchrun; the trainers save a checkpoint and exit, and
train.sh exits 0 with a line saying how to resume.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from lmlab.config import ConfigError, parse_args

# The signals torchrun passes on to the trainers (they save on SIGINT / SIGTERM).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# torchrun's main, minus its traceback when a trainer explained its exit (see torchrun()).
TORCHRUN = "import sys; from lmlab.launch import torchrun; sys.exit(torchrun())"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun() -> int:
    """`torch.distributed.run` with torchrun's argv, without torchrun's traceback when a trainer explained its
    own exit: after a stop signal (torchrun waits for the trainers to save) it returns 128 + the signal's
    number, after a user error (the launcher repeats the trainer's line) 1. A crash keeps torchrun's report."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main()
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError:
        if not Path(os.environ.get("LMLAB_EXIT_FILE", "")).is_file():
            raise
        return 1
    return 0


def run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    """Run `command` in its own session and pass it the signals in FORWARDED that this process gets.

    Its own session: a signal for train.sh's process group (Ctrl-C) must reach torchrun once, through
    us, not twice (a second one would cut short torchrun's wait for the trainers to save).
    """
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    previous = {sig: signal.signal(sig, lambda signum, _: proc.send_signal(signum)) for sig in FORWARDED}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    nproc = os.environ.get("NGPU") or str(max(visible_gpus(), 1))
    logs = Path(cfg.job.dump_folder) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        exit_file = Path(tmp) / "exit.json"
        env = {
            **os.environ,
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
        code = run_forwarding_signals(command, env)
        if code != 0 and exit_file.is_file():
            # torchrun reports a failed or stopped trainer at length; repeat the trainer's own line last
            # (an error, or how to resume after a stop, which is a success).
            report = json.loads(exit_file.read_text())
            print(report["message"], file=sys.stderr if report["exit_code"] else sys.stdout)
            return int(report["exit_code"])
        return code


if __name__ == "__main__":
    sys.exit(main())
