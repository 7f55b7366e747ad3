"""lm-eval's index of its own task files, kept between evaluation commands.

On every run lm-eval 0.4.13 indexes every task, group and tag it ships by parsing all ~14k YAML files under
`lm_eval/tasks`: 11 s of each evaluation command on this project's 2-core CPU, where reading the kept index
takes 1.4 s. The index depends only on those files, so lmlab keeps it in its cache folder (`LMLAB_CACHE`,
else $XDG_CACHE_HOME/lmlab or ~/.cache/lmlab), one file per installation of lm-eval, named by its version
and a digest of its task files' paths, sizes and modification times: an upgrade or an edited task file
builds it anew, the same way lm-eval does. Other task folders (lmlab's, a user's `--include_path`) are
indexed by lm-eval as before, after it, as lm-eval merges them (a later folder's task overrides an earlier
one's, with lm-eval's warning).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from lmlab import allowlist_pickle

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """lmlab's cache folder."""
    if os.environ.get("LMLAB_CACHE"):
        return Path(os.environ["LMLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmlab"


def digest(root: Path) -> str:
    """What the index of the YAML files below `root` depends on besides the folder: their paths, sizes and
    modification times."""
    entries, prefix = [], len(os.fspath(root))
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".yaml"):
                stat = os.stat(os.path.join(folder, name))
                entries.append(f"{folder[prefix:]}/{name}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def cached_index(root: Path, build: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """`build([root])` (lm-eval's `TaskIndex.build`), from the cache when it holds this state of `root`'s files.
    The file is a pickle of lm-eval's entries (an exact copy, which JSON would not be of YAML's dates or
    integer keys), read back building those classes only (`allowlist_pickle`); a damaged or foreign file is
    built and written anew."""
    import lm_eval

    # one file per installation (its entries name the task files by absolute path), for its files' state
    folder = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    path = cache_dir() / "lm_eval_task_index" / f"{folder}_{lm_eval.__version__}_{digest(root)}.pickle"
    try:
        with path.open("rb") as file:
            return allowlist_pickle.load(file, lambda *name: name in _INDEX_CLASSES, "lm-eval's task index")
    except FileNotFoundError:
        pass
    except Exception as exc:  # any unreadable file (truncated, damaged, foreign) is only a cache miss
        log.info("lmlab: rebuilding lm-eval's task index (%s: %s)", path, exc)
    index = build([root], resolve_includes=True)
    _write(path, index)
    for stale in path.parent.glob(f"{folder}_*.pickle"):  # this installation's earlier states
        if stale != path:
            with contextlib.suppress(OSError):
                stale.unlink(missing_ok=True)
    return index


# what lm-eval's index entries are made of (YAML's own types besides plain data)
_INDEX_CLASSES = {("lm_eval.tasks._index", "Entry"), ("lm_eval.tasks._index", "Kind"),
                  *((module, name) for module in ("pathlib", "pathlib._local")
                    for name in ("PosixPath", "WindowsPath")),
                  ("builtins", "set"), ("builtins", "frozenset"), ("datetime", "date"), ("datetime", "datetime"),
                  ("datetime", "timedelta"), ("datetime", "timezone")}


def _write(path: Path, index: dict[str, Any]) -> None:
    """Written whole, then renamed: a concurrent command reads the old file or the new one, never a part."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
            temporary = file.name
            pickle.dump(index, file, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temporary, path)
    except OSError as exc:  # a read-only or full disk: each command indexes the files itself, as lm-eval does
        log.info("lmlab: lm-eval's task index not cached (%s)", exc)
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


@contextlib.contextmanager
def lm_eval_tasks_cached(root: Path | None = None) -> Iterator[None]:
    """Within the block, lm-eval's task index takes its entries for `root` (default: lm-eval's own task
    folder) from `cached_index`."""
    from lm_eval.tasks import _index, manager

    root = Path(manager.__file__).parent if root is None else root
    original = _index.TaskIndex.__dict__["build"]
    build = original.__func__

    def build_cached(paths, *, resolve_includes=True):
        paths = [Path(p) for p in paths]
        if not paths or paths[0] != root or not resolve_includes:
            return build(paths, resolve_includes=resolve_includes)
        index = cached_index(root, build)
        for name, entry in build(paths[1:], resolve_includes=True).items():
            if name in index:  # lm-eval's own warning, on its logger (lmlab's harness filters its own choices)
                _index.log.warning("Task '%s' from %s overrides existing task from %s", name, entry.yaml_path,
                                   index[name].yaml_path)
            index[name] = entry
        return index

    _index.TaskIndex.build = staticmethod(build_cached)
    try:
        yield
    finally:
        _index.TaskIndex.build = original
