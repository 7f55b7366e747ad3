"""The `lmlab` command: `lmlab <subcommand> ...`; each subcommand is a module's `main(argv)`."""
from __future__ import annotations

import importlib
import sys

from lmlab.errors import UserError, run_command

SUBCOMMANDS = {
    "train": ("lmlab.launch", "train through torchrun (same flags as train.sh)"),
    "quickstart": ("lmlab.quickstart", "the embedded CPU quickstart"),
    "plot": ("lmlab.plot", "loss and lr curves of runs as a PNG"),
    "report": ("lmlab.eval.report", "a Markdown/CSV table of evaluation results"),
    "convert": ("lmlab.convert", "dcp-to-hf / hf-to-dcp checkpoint conversion"),
    "bench-data": ("lmlab.bench_data", "data loader throughput (tokens/s per worker)"),
}


def usage() -> str:
    lines = [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "usage: lmlab <subcommand> [args]\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    return run_command("lmlab", lambda: dispatch(argv[0], argv[1:]))


def dispatch(subcommand: str, argv: list[str]) -> int:
    if subcommand not in SUBCOMMANDS:
        raise UserError(f"lmlab: unknown subcommand {subcommand!r} (expected one of {', '.join(SUBCOMMANDS)}; "
                        "see lmlab --help)")
    # each subcommand's main runs under lmlab.errors.run_command itself (it is also called directly)
    return importlib.import_module(SUBCOMMANDS[subcommand][0]).main(argv)


if __name__ == "__main__":
    sys.exit(main())
