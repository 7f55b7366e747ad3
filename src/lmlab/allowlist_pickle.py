"""Reading pickles that lmlab did not necessarily write, building only the classes a caller names.

`pickle.load` runs whatever a file names (any importable function, with any arguments); lmlab reads no
pickle that way (tests/test_reliability.py checks). Its two pickle readers (DCP's checkpoint metadata, the
kept lm-eval task index) admit the classes of their format and refuse a file that names anything else
before any of it runs.
"""
from __future__ import annotations

import pickle
from typing import IO, Any, Callable


def load(file: IO[bytes], allowed: Callable[[str, str], bool], what: str) -> Any:
    """Unpickle `file`, whose classes and functions (module, name) must pass `allowed`; pickle.UnpicklingError
    naming the first other one, "unexpected object <module>.<name> in <what>"."""

    class AllowListUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if not allowed(module, name):
                raise pickle.UnpicklingError(f"unexpected object {module}.{name} in {what}")
            return super().find_class(module, name)

    return AllowListUnpickler(file).load()
