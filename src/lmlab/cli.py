"""The `lmlab` command: `lmlab <subcommand> ...`; each subcommand is a module's `main(argv)`."""
from __future__ import annotations

import importlib
import sys

from lmlab.errors import UserError

SUBCOMMANDS = {
    "train": ("lmlab.launch", "train through torchrun (same flags as train.sh)"),
    "quickstart": ("lmlab.quickstart", "the embedded CPU quickstart"),
    "plot": ("lmlab.plot", "loss and lr curves of runs as a PNG"),
    "report": ("lmlab.eval.report", "a Markdown/CSV table of evaluation results"),
    "convert": ("lmlab.convert", "dcp-to-hf / hf-to-dcp checkpoint conversion"),
    "bench-data": ("lmlab.bench_data", "data loader throughput (tokens/s per worker)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: lmlab <subcommand> [args]\n" + "\n".join(lines))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    try:
        return module.main(argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
