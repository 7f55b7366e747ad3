"""lmlab's one error path, shared by every command (train.sh and its trainers, `lmlab <subcommand>`,
`python -m evals.harness`, `launch_hf.py`, the quickstart).

- `UserError`: a problem the user can fix (bad flags, configs, data, checkpoints, folders). The command prints
  its message as one line, `error: ...`, and exits with code 2.
- Any other exception is a bug in lmlab (or a library failure lmlab did not foresee): the command prints one
  line naming it and a file holding the full traceback, and exits with code 1. No traceback reaches the
  terminal.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

USER_ERROR = 2  # exit code of a UserError (argparse's for bad arguments too)
BUG = 1  # exit code of an unexpected failure
INTERRUPTED = 130  # Ctrl-C outside the trainer (which saves and exits 0): 128 + SIGINT


class UserError(Exception):
    """A problem with the user's input; the message is one line saying what is wrong and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad-argument errors are UserErrors (one `error:` line, exit code 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def save_traceback(command: str, exc: BaseException) -> Path:
    """Write `exc`'s traceback to a new file in the temporary directory and return its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^A-Za-z0-9]+", "-", command).strip("-")
    with tempfile.NamedTemporaryFile("w", prefix=f"lmlab-{name}-{stamp}-", suffix=".traceback.txt", delete=False) as f:
        f.write(f"{command}: {' '.join(sys.argv)}\n\n")
        f.writelines(traceback.format_exception(exc))
    return Path(f.name)


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for an error line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def run_command(command: str, body: Callable[[], int],
                report: Callable[[str, int], bool] | None = None) -> int:
    """Run a command's `body` and return its exit code; every failure ends as one `error:` line on stderr
    (see the module doc). `report(line, code)` is told the line first and returns True when it takes the line
    over (a trainer hands it to train.sh's launcher, which prints it once, last)."""
    try:
        return body()
    except UserError as exc:
        line, code = f"error: {exc}", USER_ERROR
    except KeyboardInterrupt:
        line, code = f"error: {command}: interrupted (Ctrl-C)", INTERRUPTED
    except Exception as exc:  # a bug: the line names it and where its traceback is
        try:
            where = f"the traceback is in {save_traceback(command, exc)}"
        except OSError as write_error:
            where = f"its traceback could not be saved ({one_line(write_error)})"
        line, code = f"error: {command} failed unexpectedly ({one_line(exc)}); this is a bug in lmlab: {where}", BUG
    if report is None or not report(line, code):
        print(line, file=sys.stderr, flush=True)
    return code


def command(name: str, report: Callable[[str, int], bool] | None = None
            ) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's `main(argv)` with `run_command`: the command `name` (as the user typed it) fails in
    one line, whoever calls its main."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args: object, **kwargs: object) -> int:
            return run_command(name, lambda: main(*args, **kwargs), report)

        return guarded

    return wrap
