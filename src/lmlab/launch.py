"""`bash train.sh <flags>`: check the flags, then start the trainer on every GPU through torchrun.

Environment (flame's): NNODE (1), NGPU (all visible GPUs; 1 CPU process without GPUs), LOG_RANK (0),
MASTER_ADDR (localhost), MASTER_PORT (0 = pick a free port; multi-node needs a fixed one).
Bad flags fail here, before any process starts, with one line and exit code 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lmlab.config import ConfigError, parse_args


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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
        error_file = Path(tmp) / "error.json"
        env = {
            **os.environ,
            "LMLAB_ERROR_FILE": str(error_file),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
            # Each data worker tokenizes on one thread; a thread pool per worker would oversubscribe the CPUs.
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
        }
        command = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={os.environ.get('NNODE', '1')}",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ.get('MASTER_PORT', '0')}",
            "--local-ranks-filter", os.environ.get("LOG_RANK", "0"),
            "--role", "rank", "--tee", "3", "--log-dir", str(logs),
            "-m", "lmlab.train", *argv,
        ]
        code = subprocess.call(command, env=env)
        if code != 0 and error_file.is_file():
            # torchrun reports a failed child at length; repeat the child's own one-line reason last.
            error = json.loads(error_file.read_text())
            print(f"error: {error['message']}", file=sys.stderr)
            return int(error["exit_code"])
        return code


if __name__ == "__main__":
    sys.exit(main())
