"""Crash-safe training checkpoints with torch.distributed.checkpoint (DCP), and the HF export.

Usage (in train.py):

    checkpointer = Checkpointer(dump_folder, cfg.checkpoint, dist)
    states = {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
              "dataloader": dataloader, "train_state": train_state}    # any subset; RNG states are added
    step = checkpointer.load(states)              # the step resumed from; 0 when starting fresh
    while step < last_step:
        step += 1
        ...
        if checkpointer.should_save(step, last_step):     # every `interval` steps and at the last step
            checkpointer.save(step, states, final=step == last_step)
    checkpointer.close()                          # waits for an async save to finish
    export_hf(model, tokenizer, dump_folder, cfg.checkpoint.export_dtype, dist)

Layout: `<dump>/<checkpoint.folder>/step-N/` is a DCP directory. Its flattened keys are
`model.<name>` (the model's own parameter names, e.g. `model.model.layers.0.attn.q_proj.weight`),
`optimizer.*` (from `get_optimizer_state_dict`), `lr_scheduler` and `train_state` (one bytes value each),
and, per rank r, `dataloader.rank<r>` and `rng.rank<r>` (python, numpy, torch and CUDA generators).
Rank 0 adds `lmlab.json` (step, world size, weights-only flag, optimizer class) and the model's `config.json`.
Model and optimizer go through DCP's state-dict helpers, so FSDP2-sharded states reshard on load (any
number of ranks). The per-rank states cannot reshard: loading them with another world size is an error
that names `--checkpoint.exclude_from_loading dataloader` (RNG states are then left as seeded).

Guarantees:
- A `step-N` directory is complete or absent: ranks write `step-N.tmp`; after all have finished,
  rank 0 adds lmlab.json and renames it. Complete = DCP's `.metadata` and a readable lmlab.json of step N
  (`complete_steps`). Leftover `*.tmp` directories (a killed save) and incomplete `step-N` directories
  are never loaded or counted, and are removed when the next Checkpointer starts (except the one
  `load_step` names: its load is a one-line error; and DCP checkpoints of other programs, which `load`
  refuses). `keep_latest_k` deletes older complete checkpoints only after a newer one is complete (and
  renames before deleting, so a half-deleted one is never seen); it counts steps up to the one just
  saved only.
- A save of step N that finds a `step-N` it did not write (another timeline: a longer run before a
  resume from an earlier step) replaces it: old renamed to `*.replaced.tmp`, new renamed in, old deleted.
- Non-finite weights are never written: `save` and `export_hf` check every parameter first
  (`weights_finite`: one fused max-norm, one host sync) and raise a one-line UserError.
- A load keeps this run's hyperparameters (the optimizer's param-group values and the schedule's base
  LR, from the flags) over the saved ones, with the saved moments and schedule position; a checkpoint
  of another optimizer class (lmlab.json's "optimizer") is refused unless the optimizer is excluded.
- The checkpoint folder must be on a filesystem that every node sees (as DCP requires).
- A failing write (read-only or full disk) raises `UserError` with one line on every rank, leaving
  earlier checkpoints intact.
- Nothing executes code from a checkpoint: non-tensor values are read with `torch.load(weights_only=True)`
  and DCP's pickled `.metadata` with an unpickler that admits only DCP's metadata classes.

`load()` picks `load_step` (-1: the newest complete step; N: that step, else an error listing those
available). With no checkpoint in the dump it warm-starts from `initial_load_path` (a DCP directory:
a step of another run, the output of `lmlab convert hf-to-dcp`, or a flame checkpoint whose model keys
lack the `model.` prefix), loading only the model unless `initial_load_model_weights_only` is false.
`exclude_from_loading` names top-level states to skip. `last_save_model_weights_only` makes the final
save model-only, in `export_dtype`. `async_mode` async / async_with_pinned_mem overlaps the write with
training (dcp.async_save); the rename happens at the next save or `close()`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import re
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmlab import allowlist_pickle, dumplock
from lmlab.config import Checkpoint as CheckpointConfig
from lmlab.distributed import DTYPES, Dist
from lmlab.errors import UserError

TMP_SUFFIX = ".tmp"
META_FILE = "lmlab.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_PER_RANK = ("dataloader", "rng")
_INTACT = "; earlier checkpoints are intact"


# --- safe (de)serialization ------------------------------------------------------------------------

def _pack(obj: Any) -> bytes:
    """A state dict of arbitrary structure as one DCP value (a template need not match it on load)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner unpickles non-tensor values with weights_only=False; check them with weights_only first.

    A value that passes holds only plain data and tensors, so DCP's own second read runs no pickled code.
    """

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


def _metadata_class(module: str, name: str) -> bool:
    """The classes DCP's `.metadata` file is made of."""
    return (
        module.startswith("torch.distributed.checkpoint.")
        or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
        or (module == "torch.serialization" and name == "_get_layout")
        or (module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
        or (module == "collections" and name == "OrderedDict")
    )


def read_metadata(path: Path) -> Metadata:
    """DCP's metadata of the checkpoint at `path`, read safely; UserError if it is missing or corrupt."""
    file = path / ".metadata"
    if not file.is_file():
        raise UserError(f"{path} is not a DCP checkpoint (no .metadata file)")
    try:
        with open(file, "rb") as f:
            metadata = allowlist_pickle.load(f, _metadata_class, "checkpoint metadata")
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise UserError(f"{file} is corrupt or not DCP metadata: {_one_line(exc)}") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{file} is not DCP metadata")
    return metadata


def _one_line(exc: BaseException) -> str:
    """The root cause of `exc` in one line (DCP wraps per-rank failures in a CheckpointException)."""
    failures = getattr(exc, "failures", None)
    if failures:  # {rank: (exception, traceback)}
        exc = next(iter(failures.values()))[0]
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# --- RNG -------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {**numpy_state["state"], "key": torch.from_numpy(numpy_state["state"]["key"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": numpy_state["state"]["key"].numpy()}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- model weights ---------------------------------------------------------------------------------

def _model_prefix(metadata: Metadata, model_sd: dict[str, torch.Tensor], source: Path) -> str:
    """'model.' for lmlab's layout; '' for flame/torchtitan checkpoints that store model keys at the top.

    UserError naming a missing weight or a shape mismatch (e.g. weights of another architecture).
    """
    saved = metadata.state_dict_metadata
    prefix = "model." if any(f"model.{k}" in saved for k in model_sd) else ""
    missing = [k for k in model_sd if prefix + k not in saved]
    if missing:
        raise UserError(
            f"{source} lacks {len(missing)} of the model's {len(model_sd)} weights (e.g. {missing[0]}): "
            "a checkpoint of another model architecture or config?"
        )
    for key, tensor in model_sd.items():
        entry = saved[prefix + key]
        if isinstance(entry, TensorStorageMetadata) and tuple(entry.size) != tuple(tensor.shape):
            raise UserError(
                f"{source}: {key} has shape {tuple(entry.size)} in the checkpoint but {tuple(tensor.shape)} in the "
                "model: a checkpoint of another model config?"
            )
    return prefix


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Load only the model weights of the DCP checkpoint at `path` (any layout above) into `model`."""
    metadata = read_metadata(path)
    model_sd = get_model_state_dict(model)
    prefix = _model_prefix(metadata, model_sd, path)
    load_state({"model": model_sd} if prefix else model_sd, path)  # fills model_sd's tensors in place
    set_model_state_dict(model, model_sd)


@contextlib.contextmanager
def _single_process_allowed() -> Iterator[None]:
    """Without a process group DCP warns on every call that it assumes a single process: lmlab's one-process
    runs and conversions are that, by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def load_state(state: dict[str, Any], path: Path) -> None:
    """dcp.load of `state` (templates, filled in place) from `path`, safely, with one-line errors."""
    read_metadata(path)  # refuses a .metadata that would run code when DCP unpickles it
    try:
        with _single_process_allowed():
            dcp.load(state, checkpoint_id=path, planner=_SafeLoadPlanner())
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        raise UserError(f"cannot load checkpoint {path}: {_one_line(exc)}") from None


def _model_config_json(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return config.to_json_string() if hasattr(config, "to_json_string") else None


# --- the checkpointer ------------------------------------------------------------------------------

def complete_steps(folder: Path) -> list[int]:
    """The steps of the complete checkpoints in `folder`, oldest first: `step-N` directories with DCP's
    `.metadata` and a readable lmlab.json of step N (see `incomplete_reason`)."""
    return sorted(step for step, path in step_dirs(folder) if incomplete_reason(path, step) is None)


def load_step_problem(folder: Path, step: int) -> str | None:
    """Why `--checkpoint.load_step step` cannot resume from the checkpoints in `folder`; None if it can."""
    steps = complete_steps(folder)
    if step in steps:
        return None
    path = folder / f"step-{step}"
    reason = incomplete_reason(path, step) if path.is_dir() else None
    problem = f"{path} is incomplete or corrupt ({reason})" if reason else \
        f"no complete checkpoint step-{step} in {folder}"
    return f"--checkpoint.load_step {step}: {problem} (available: {', '.join(map(str, steps)) or 'none'})"


# Model config keys that a resume may change: how the model runs or where it came from, not what it is.
_RUNTIME_CONFIG_KEYS = {"transformers_version", "backend", "use_cache", "architectures", "dtype", "torch_dtype",
                        "_name_or_path"}


def check_same_model(path: Path, model: nn.Module) -> None:
    """UserError when the checkpoint at `path` was saved from another model config than `model`'s: the weights
    of a 4-layer run would load into 2 layers without a word (extra weights are not an error)."""
    saved_file, config = path / "config.json", getattr(model, "config", None)
    if config is None or not saved_file.is_file():
        return
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
        return  # the weights' own checks still apply
    now = json.loads(config.to_json_string())
    changed = [key for key in sorted(saved.keys() | now.keys())
               if key not in _RUNTIME_CONFIG_KEYS and saved.get(key) != now.get(key)]
    if changed:
        key, more = changed[0], f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise UserError(
            f"{path} was saved from another model config: {key} is {json.dumps(saved.get(key))} there and "
            f"{json.dumps(now.get(key))} now{more}; resume with the config it was trained with (a copy: {saved_file}), "
            "or start over with --job.overwrite or another --job.dump_folder"
        )


def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` directory in `folder`, complete or not."""
    if not folder.is_dir():
        return []
    found = ((_STEP_DIR.fullmatch(p.name), p) for p in folder.iterdir() if p.is_dir())
    return [(int(m.group(1)), p) for m, p in found if m]


def _read_meta(path: Path) -> dict[str, Any] | None:
    """lmlab.json of the checkpoint at `path`; None if there is none; ValueError/OSError if unreadable."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"{META_FILE} is not lmlab's checkpoint record")
    return meta


def incomplete_reason(path: Path, step: int) -> str | None:
    """Why `path` (a `step-N` directory) is not a complete checkpoint of `step`; None when it is.

    Complete: DCP's `.metadata` and lmlab.json (written last, before the rename) naming that step. Without
    lmlab.json a step would resume as step 0 (its steps run twice, the schedule wrong), so it never counts."""
    if not (path / ".metadata").is_file():
        return "no DCP .metadata"
    try:
        meta = _read_meta(path)
    except (OSError, ValueError) as exc:
        return f"unreadable {META_FILE}: {_one_line(exc)}"
    if meta is None:
        return f"no {META_FILE}"
    if meta["step"] != step:
        return f"its {META_FILE} is of step {meta['step']}"
    return None


# The top-level state names lmlab writes; a DCP checkpoint with other keys was written by another program.
_LMLAB_GROUPS = {"model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng"}


def _foreign(path: Path) -> bool:
    """Whether `path` is a readable DCP checkpoint that lmlab did not write (e.g. flame's, whose model keys
    are at the top level): such a directory is never cleaned up as an incomplete save of lmlab's."""
    if (path / META_FILE).is_file():
        return False
    try:
        keys = read_metadata(path).state_dict_metadata
    except UserError:
        return False
    return any(key.split(".", 1)[0] not in _LMLAB_GROUPS for key in keys)


def _agree(error: BaseException | None, dist: Dist, what: str, note: str = "") -> None:
    """Raise on every rank if `error` happened on any (rank-0-only work must not leave others waiting)."""
    if not dist.all_true(error is None):
        reason = _one_line(error) if error is not None else "on another rank"
        raise UserError(f"{what} failed ({reason}){note}")


def _begin_write(target: Path, dist: Dist) -> Path:
    """An empty temporary sibling of `target` for the ranks to write into."""
    tmp = target.with_name(target.name + TMP_SUFFIX)
    error = None
    if dist.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            error = exc
    _agree(error, dist, f"saving checkpoint {target}", _INTACT)
    return tmp


def _save_failed(exc: BaseException, tmp: Path, target: Path, dist: Dist) -> UserError:
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    # torch's writer reports a full disk as a short write ("unexpected pos"): say how much space is left
    free = free_space(target.parent)
    return UserError(f"saving checkpoint {target} failed ({_one_line(exc)}){'; ' + free if free else ''}{_INTACT}")


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest existing parent (where it would be created)."""
    return next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())


def free_space(path: Path) -> str:
    """'N GiB (or MiB) free there' for the disk holding `path` (or the folder it would be created in), '' if
    unknown."""
    try:
        free = shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return ""
    return f"{free / 2**30:.1f} GiB free there" if free >= 2**30 else f"{free / 2**20:.1f} MiB free there"


def _finish_write(tmp: Path, target: Path, meta: dict[str, Any], config_json: str | None, dist: Dist) -> None:
    """After every rank has written `tmp` (dcp.save returned), rank 0 adds lmlab.json and renames it.

    An existing `target` (a step of another timeline, or an incomplete one) is replaced: renamed to
    `*.replaced.tmp`, the new one renamed in, the old one deleted; a kill in between leaves `*.tmp`
    directories only (cleaned up at the next start) and no `target`, never a mix."""
    error = None
    if dist.is_main:
        try:
            (tmp / META_FILE).write_text(json.dumps(meta))
            if config_json is not None:
                (tmp / "config.json").write_text(config_json)
            old = None
            if target.is_dir():
                old = target.rename(target.with_name(target.name + ".replaced" + TMP_SUFFIX))
            try:
                tmp.rename(target)
            except OSError:
                if old is not None:
                    old.rename(target)  # put the old one back: a failed save changes nothing
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)  # a leftover *.tmp goes at the next start
        except OSError as exc:
            error = exc
            shutil.rmtree(tmp, ignore_errors=True)
    _agree(error, dist, f"saving checkpoint {target}", _INTACT)


def save_model_weights(model: nn.Module, target: Path, dist: Dist) -> None:
    """Write a weights-only checkpoint at `target` (the layout `Checkpointer.load` and `initial_load_path` read)."""
    tmp = _begin_write(target, dist)
    try:
        with _single_process_allowed():
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=tmp)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        raise _save_failed(exc, tmp, target, dist) from None
    meta = {"step": 0, "world_size": dist.world_size, "model_weights_only": True}
    _finish_write(tmp, target, meta, _model_config_json(model), dist)


@dataclass
class _PendingSave:
    future: Future
    tmp: Path
    target: Path
    meta: dict[str, Any]
    config_json: str | None


class Checkpointer:
    """Saves and restores the training state under `<dump_folder>/<cfg.folder>/step-N` (see the module doc)."""

    def __init__(self, dump_folder: str | Path, cfg: CheckpointConfig, dist: Dist) -> None:
        self.cfg = cfg
        self.dist = dist
        self.folder = Path(dump_folder) / cfg.folder
        self.enabled = cfg.enable_checkpoint
        self._pending: _PendingSave | None = None
        self._current: set[int] = set()  # steps whose step-N holds this run's state (saved or loaded by it)
        self.loaded_from: Path | None = None  # the checkpoint `load` read: a step of this dump or initial_load_path
        self._writer: dcp.FileSystemWriter | None = None  # reused by async saves (keeps pinned buffers)
        # An async save's collectives run in a background thread: give them their own group, so they
        # never interleave with the training loop's collectives on the default one.
        self._async_group = None
        if self.enabled and cfg.async_mode != "disabled" and dist.initialized:
            self._async_group = torch.distributed.new_group(backend="gloo")
        if self.enabled:
            if dist.is_main:
                self._clean_up()
            dist.barrier()

    def _clean_up(self) -> None:
        """Remove what cut-short saves and deletions leave: `*.tmp` directories, and `step-N` directories
        that are not complete (see `incomplete_reason`); keep the one `load_step` names (its load says
        what is wrong with it) and DCP checkpoints that other programs wrote (`load` refuses those)."""
        for leftover in self.folder.glob(f"*{TMP_SUFFIX}") if self.folder.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)
        for step, path in step_dirs(self.folder):
            reason = incomplete_reason(path, step)
            if reason is None or step == self.cfg.load_step or _foreign(path) or dumplock.holds_a_run(path):
                continue  # another run's dump folder is never an incomplete save of this one's
            print(f"lmlab: removing the incomplete checkpoint {path} ({reason})", flush=True)
            try:
                trash = path.rename(path.with_name(path.name + ".deleted" + TMP_SUFFIX))
            except OSError:  # left in place: it is never loaded or counted anyway
                continue
            shutil.rmtree(trash, ignore_errors=True)

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return complete_steps(self.folder)

    def step_dir(self, step: int) -> Path:
        return self.folder / f"step-{step}"

    def should_save(self, step: int, last_step: int) -> bool:
        return self.enabled and (step % self.cfg.interval == 0 or step == last_step)

    # -- saving --

    def save(self, step: int, states: dict[str, Any], *, final: bool = False) -> None:
        """Write `step-N` (unless checkpointing is off or that step is already saved).

        `final`: the run's last save; model weights only (in `export_dtype`) with `last_save_model_weights_only`.
        """
        if not self.enabled:
            return
        self.wait()
        target = self.step_dir(step)
        if step in self._current:
            return
        # A step-N already there is of another timeline (a longer run before a resume from an earlier
        # step) or incomplete: this save replaces it (see _finish_write).
        if not weights_finite(states["model"], self.dist):
            raise UserError(
                f"step {step}: the model weights are not finite (NaN or inf); not saving {target.name}{_INTACT} "
                "(resume from one with a lower --optimizer.lr)"
            )
        weights_only = final and self.cfg.last_save_model_weights_only
        state = self._state_to_save(states, weights_only)
        meta = {"step": step, "world_size": self.dist.world_size, "model_weights_only": weights_only}
        if "optimizer" in states and not weights_only:
            meta["optimizer"] = type(states["optimizer"]).__name__
        config_json = _model_config_json(states["model"])
        tmp = _begin_write(target, self.dist)
        try:
            if self.cfg.async_mode == "disabled":
                with _single_process_allowed():
                    dcp.save(state, checkpoint_id=tmp)
            else:
                if self._writer is None:
                    pinned = self.cfg.async_mode == "async_with_pinned_mem" and torch.cuda.is_available()
                    self._writer = dcp.FileSystemWriter(tmp, cache_staged_state_dict=pinned)
                future = dcp.async_save(
                    state, checkpoint_id=tmp, storage_writer=self._writer, process_group=self._async_group
                )
                self._pending = _PendingSave(future, tmp, target, meta, config_json)
                self._current.add(step)
                return
        except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
            raise _save_failed(exc, tmp, target, self.dist) from None
        self._complete(tmp, target, meta, config_json)
        self._current.add(step)

    def wait(self) -> None:
        """Finish a pending async save (rename it into place)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()
        except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
            raise _save_failed(exc, pending.tmp, pending.target, self.dist) from None
        self._complete(pending.tmp, pending.target, pending.meta, pending.config_json)

    def close(self) -> None:
        self.wait()

    def _state_to_save(self, states: dict[str, Any], weights_only: bool) -> dict[str, Any]:
        model = states["model"]
        model_sd = get_model_state_dict(model)
        if weights_only:
            dtype = DTYPES[self.cfg.export_dtype]
            return {"model": {k: v.to(dtype) for k, v in model_sd.items()}}
        state: dict[str, Any] = {"model": model_sd}
        rank_key = f"rank{self.dist.rank}"
        for name, obj in states.items():
            if name == "optimizer":
                state[name] = get_optimizer_state_dict(model, obj)
            elif name in _PER_RANK:
                state[name] = {rank_key: _pack(obj.state_dict())}
            elif name != "model":
                state[name] = _pack(obj.state_dict())
        state["rng"] = {rank_key: _pack(_rng_state())}
        return state

    def _complete(self, tmp: Path, target: Path, meta: dict[str, Any], config_json: str | None) -> None:
        _finish_write(tmp, target, meta, config_json, self.dist)
        error = None
        if self.dist.is_main and self.cfg.keep_latest_k > 0:
            try:
                # later steps are another timeline's (this run replaces each when it gets there): never
                # counted, so they cannot push this run's own checkpoints out
                for step in [s for s in self.steps() if s <= meta["step"]][: -self.cfg.keep_latest_k]:
                    doomed = self.step_dir(step)
                    # rename first: a deletion cut short leaves a *.tmp directory, never a partial step-N
                    trash = doomed.with_name(doomed.name + ".deleted" + TMP_SUFFIX)
                    doomed.rename(trash)
                    shutil.rmtree(trash)
            except OSError as exc:
                error = exc
        _agree(error, self.dist, f"deleting checkpoints older than {target.name} (keep_latest_k)")

    # -- loading --

    def load(self, states: dict[str, Any], *, fresh: bool = False) -> int:
        """Restore `states` in place from the checkpoint chosen by the config; return its step (0 if none).

        `fresh` (`--job.overwrite`): ignore the checkpoints in the folder (only `initial_load_path` is read).
        """
        if not self.enabled:
            return 0
        unknown = set(self.cfg.exclude_from_loading) - set(states) - {"rng"}
        if unknown:
            raise UserError(
                f"--checkpoint.exclude_from_loading: unknown state {sorted(unknown)[0]!r}; "
                f"choose from {', '.join(sorted([*states, 'rng']))}"
            )
        steps = [] if fresh else self.steps()
        if not fresh:
            for _, path in step_dirs(self.folder):
                if _foreign(path):
                    raise UserError(
                        f"{path} is a checkpoint that lmlab did not write (no {META_FILE}; e.g. flame's): move it out "
                        f"of {self.folder}, or warm-start from it with --checkpoint.initial_load_path in another "
                        "--job.dump_folder"
                    )
        path = None
        if self.cfg.load_step >= 0 and not fresh:
            problem = load_step_problem(self.folder, self.cfg.load_step)
            if problem:
                raise UserError(problem)
            path = self.step_dir(self.cfg.load_step)
        elif steps:
            path = self.step_dir(steps[-1])
        if path is not None:
            check_same_model(path, states["model"])
            step = self._load_step_dir(path, states)
            self.loaded_from = path
            self._current.add(step)
            later = [s for s in steps if s > step]
            if later and self.dist.is_main:
                print(
                    f"lmlab: {', '.join(f'step-{s}' for s in later)} in {self.folder}: later than step {step}, from "
                    "another timeline of this run; each is replaced when this run saves that step (until then, "
                    "--checkpoint.load_step -1 would resume that timeline)",
                    flush=True,
                )
            return step
        if self.cfg.initial_load_path:
            path = self.loaded_from = Path(self.cfg.initial_load_path)
            if self.cfg.initial_load_model_weights_only:
                load_model_weights(states["model"], path)
                return 0
            return self._load_step_dir(path, states)
        return 0

    def _load_step_dir(self, path: Path, states: dict[str, Any]) -> int:
        metadata = read_metadata(path)
        try:
            meta = _read_meta(path) or {}  # none: a checkpoint of another program (initial_load_path)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path / META_FILE} is corrupt ({_one_line(exc)})") from None
        step = int(meta.get("step", 0))
        if meta.get("model_weights_only"):
            load_model_weights(states["model"], path)
            return step
        saved_groups = {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
        wanted = [name for name in [*states, "rng"] if name not in self.cfg.exclude_from_loading]
        optimizer, scheduler = states.get("optimizer"), states.get("lr_scheduler")
        saved_optimizer = meta.get("optimizer")
        if "optimizer" in wanted and optimizer is not None and saved_optimizer not in (None, type(optimizer).__name__):
            raise UserError(
                f"--optimizer.name {type(optimizer).__name__}: {path} was saved with {saved_optimizer}, and a resume "
                "keeps the optimizer (pass --checkpoint.exclude_from_loading optimizer to start its state afresh)"
            )
        # the hyperparameters of this run's flags, which the loaded optimizer and schedule states would replace
        new_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer else []
        new_base_lrs = list(getattr(scheduler, "base_lrs", []))
        if meta.get("world_size", self.dist.world_size) != self.dist.world_size:
            if "dataloader" in wanted and "dataloader" in saved_groups:
                raise UserError(
                    f"{path} was saved by {meta['world_size']} ranks and this run has {self.dist.world_size}: the data "
                    "loader state cannot be resharded; pass --checkpoint.exclude_from_loading dataloader to restart "
                    "the data stream (model and optimizer do reshard)"
                )
            wanted = [name for name in wanted if name not in _PER_RANK]
        missing = [name for name in wanted if name not in saved_groups]
        if missing:
            raise UserError(
                f"{path} holds no {missing[0]!r} state; pass --checkpoint.exclude_from_loading {missing[0]} to start it fresh"
            )

        model = states["model"]
        rank_key = f"rank{self.dist.rank}"
        state: dict[str, Any] = {}
        for name in wanted:
            if name == "model":
                model_sd = get_model_state_dict(model)
                if _model_prefix(metadata, model_sd, path) != "model.":
                    raise UserError(
                        f"{path} is not an lmlab checkpoint (model keys at the top level, as flame writes them); "
                        "load its weights with --checkpoint.initial_load_path"
                    )
                state[name] = model_sd
            elif name == "optimizer":
                state[name] = get_optimizer_state_dict(model, states[name])
            elif name in _PER_RANK:
                state[name] = {rank_key: b""}
            else:
                state[name] = b""
        load_state(state, path)

        for name, value in state.items():
            if name == "model":
                set_model_state_dict(model, value)
            elif name == "optimizer":
                set_optimizer_state_dict(model, states[name], value)
            elif name == "rng":
                _set_rng_state(_unpack(value[rank_key]))
            elif name in _PER_RANK:
                states[name].load_state_dict(_unpack(value[rank_key]))
            else:
                states[name].load_state_dict(_unpack(value))
        if optimizer is not None:
            _use_new_hyperparameters(optimizer, scheduler, new_groups, new_base_lrs)
        return step


def _use_new_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, groups: list[dict[str, Any]],
                             base_lrs: list[float]) -> None:
    """After a load: the optimizer's moments and the schedule's position stay the checkpoint's, its
    hyperparameters become this run's flags' (lr, betas, eps, weight decay, implementation), and the LR is
    the new schedule's at the loaded position. The same flags give the same values: an exact resume."""
    for group, new in zip(optimizer.param_groups, groups):
        group.update(new)
        on_device = group.get("fused") or group.get("capturable")
        for param in group["params"]:  # the step counter lives where the (new) implementation wants it
            state = optimizer.state.get(param, {})
            counter = state.get("step")
            if type(counter) is torch.Tensor:
                want = param.device if on_device else torch.device("cpu")
                if counter.device != want:
                    state["step"] = counter.to(want)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if scheduler is None or lambdas is None or len(base_lrs) != len(optimizer.param_groups):
        return
    scheduler.base_lrs = list(base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, lambdas)]  # as LambdaLR.get_lr
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def weights_finite(model: nn.Module, dist: Dist) -> bool:
    """Whether every parameter is finite on every rank: one fused max-norm reduction over the local shards
    (NaN and inf propagate into it) and one host sync, however many tensors."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
    local = [t for t in local if t.numel()]
    finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(local, float("inf")))) if local else True
    return dist.all_true(finite)


# --- HF export -------------------------------------------------------------------------------------

def write_hf(
    state_dict: dict[str, torch.Tensor], config: Any, tokenizer: Any, out_dir: str | Path, dtype: str | torch.dtype
) -> None:
    """Write `config.json` + `model.safetensors` (+ tokenizer files) into `out_dir`, file by file atomically.

    Files are written into a temporary sibling folder, then moved over the old export's files; any other
    file in `out_dir` (checkpoints, logs, metrics) is left alone.
    """
    out_dir = Path(out_dir)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tmp = out_dir / f".hf-export{TMP_SUFFIX}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, value in state_dict.items():
            value = value.detach().to("cpu", dtype).contiguous()
            if value.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
                value = value.clone()
            seen.add(value.data_ptr())
            tensors[key] = value
        safetensors.torch.save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        config = copy.deepcopy(config)  # the live model's config keeps its dtype
        config.dtype = dtype
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # weights first, config last: a reader never sees a new config next to old weights for long
        names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")
        for name in names:
            os.replace(tmp / name, out_dir / name)
    except (OSError, safetensors.SafetensorError) as exc:
        raise UserError(f"writing the HF export to {out_dir} failed ({_one_line(exc)}); the previous export is intact") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf(model: nn.Module, tokenizer: Any, out_dir: str | Path, dtype: str | torch.dtype, dist: Dist,
              step: int | None = None) -> None:
    """Gather the full weights (a collective: call on every rank); rank 0 writes the HF model into `out_dir`.
    Non-finite weights are refused (UserError naming `step`, when given), before anything is written.

    Afterwards `AutoModelForCausalLM.from_pretrained(out_dir)` works (after `import lmlab` for lmlab's types).
    """
    if not weights_finite(model, dist):
        raise UserError(
            f"{'step ' + str(step) + ': ' if step is not None else ''}the model weights are not finite (NaN or inf); "
            f"not writing the HF export to {out_dir}; the previous export and the checkpoints are intact"
        )
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    error = None
    if dist.is_main:
        try:
            write_hf(full, model.config, tokenizer, out_dir, dtype)
        except UserError as exc:
            error = exc
    if not dist.all_true(error is None):
        raise error if error is not None else UserError(f"writing the HF export to {out_dir} failed on rank 0")
