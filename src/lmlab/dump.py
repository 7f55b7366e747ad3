"""The dump folder: what a run may write there, the refusal to mix two runs, and `--job.overwrite`.

Every path a run writes inside the dump (`checkpoint.folder`, `metrics.save_tb_folder`,
`profiling.save_traces_folder`, metrics.jsonl, the logs) must resolve (symlinks and `..` followed) to a
path strictly inside it; anything else is a one-line UserError before the folder is touched.

`--job.overwrite` starts over: the old run's checkpoints are not loaded, and once the new run has loaded
what it starts from (`clear_previous_run`, called after `Checkpointer.load`), the old run's outputs are
deleted: the checkpoint folder's `step-N` and temporary directories, the tensorboard event files,
metrics.jsonl and the HF export's files. Nothing else in the dump, and nothing outside it.
"""
from __future__ import annotations

import os
import re
import shutil
import tomllib
from pathlib import Path

from lmlab.checkpoint import TMP_SUFFIX, complete_steps, free_space, nearest_existing
from lmlab.config import RECORD_NAME, JobConfig
from lmlab.distributed import Dist
from lmlab.errors import UserError
from lmlab.metrics import METRICS_FILE

LOGS = "logs"  # train.sh tees each rank's output there
# What write_hf puts into the dump (config, weights, the tokenizer files save_pretrained writes).
HF_EXPORT_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
_STEP = re.compile(r"step-\d+")
_TB_EVENTS = "events.out.tfevents.*"


def check_dump_folder(dump: Path) -> None:
    """UserError unless `dump` is a folder this process can write, or can be created as one: not a file, no file
    on its path, not on a read-only disk. Checked before the dump's lock creates it."""
    existing = nearest_existing(dump)
    if not existing.is_dir():
        where = "is a file" if existing == dump.absolute() else f"cannot be created: {existing} is a file"
        raise UserError(f"--job.dump_folder {dump} {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == dump.absolute() else f" ({existing}, where it would be created)"
        raise UserError(f"--job.dump_folder {dump} is not writable{where}: a read-only disk or folder; "
                        "choose another --job.dump_folder")


def check_free_space(dump: Path, needed: int, what: str) -> None:
    """UserError when the disk holding `dump` has fewer than `needed` bytes free (`what` says what needs them)."""
    existing = nearest_existing(dump)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"--job.dump_folder {dump}: the disk is full for this run: {free_space(existing)}, "
                        f"{what} needs about {needed / 2**30:.2f} GiB; free some space or choose another folder")


def dump_write_failed(dump: Path, exc: OSError) -> UserError:
    """A failed write in the dump at the start of a run, as one line with the free space (a full disk?)."""
    return UserError(f"writing to --job.dump_folder {dump} failed ({exc.strerror or exc}; {free_space(dump)})")


def dump_paths(cfg: JobConfig) -> dict[str, Path]:
    """The paths a run writes inside the dump, by the option (or file) that names them, resolved; UserError
    for one that is not strictly inside the dump folder."""
    dump = Path(cfg.job.dump_folder).resolve()
    named = {
        "--checkpoint.folder": cfg.checkpoint.folder,
        "--metrics.save_tb_folder": cfg.metrics.save_tb_folder,
        "--profiling.save_traces_folder": cfg.profiling.save_traces_folder,
        "the metrics file": METRICS_FILE,
        "the logs folder": LOGS,
    }
    paths = {}
    for option, value in named.items():
        path = (dump / value).resolve()
        if path == dump:
            raise UserError(f"{option}: {value!r} is the dump folder {dump} itself (expected a path inside it)")
        if dump not in path.parents:
            raise UserError(f"{option}: {value!r} resolves to {path}, outside the dump folder {dump} "
                            "(expected a path inside it)")
        paths[option] = path
    return paths


def prepare_dump_folder(cfg: JobConfig, dist: Dist) -> Path:
    """Check the paths, create the dump folder, refuse to mix two different runs (train() records the config
    once it starts). Deletes nothing: `--job.overwrite`'s deletion is `clear_previous_run`, later."""
    dump_paths(cfg)
    dump = Path(cfg.job.dump_folder)
    if cfg.job.overwrite and cfg.checkpoint.load_step >= 0:
        raise UserError(
            f"--job.overwrite starts over (it deletes the dump's checkpoints) but --checkpoint.load_step "
            f"{cfg.checkpoint.load_step} resumes from one; drop one of them"
        )
    saved = dump / RECORD_NAME
    if dist.is_main:
        try:
            dump.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise dump_write_failed(dump, exc) from None
        has_run = bool(complete_steps(dump / cfg.checkpoint.folder)) or (dump / "model.safetensors").is_file()
        if has_run and saved.is_file() and not cfg.job.overwrite:
            previous = saved.read_text()
            if _run_defining(previous) != _run_defining(cfg.to_toml()):
                raise UserError(
                    f"{dump} holds a different run (its model/data config in {saved} differs); "
                    "use another --job.dump_folder, or --job.overwrite to start over there"
                )
    dist.barrier()
    return dump


def clear_previous_run(cfg: JobConfig, dist: Dist) -> None:
    """`--job.overwrite`, once the new run is known to start: delete the old run's outputs (see the module doc).

    Checkpoint directories are renamed to `*.tmp` before they are deleted, so a deletion cut short leaves
    nothing that looks like a checkpoint (the next start removes the rest)."""
    paths = dump_paths(cfg)
    dump = Path(cfg.job.dump_folder).resolve()
    error: OSError | None = None
    if dist.is_main:
        try:
            paths["the metrics file"].unlink(missing_ok=True)
            tb = paths["--metrics.save_tb_folder"]
            if tb.is_dir():
                for events in tb.glob(_TB_EVENTS):
                    events.unlink()
                if not any(tb.iterdir()):
                    tb.rmdir()
            checkpoints = paths["--checkpoint.folder"]
            if checkpoints.is_dir():  # leftovers first, so that no rename below meets one
                for leftover in checkpoints.glob(f"*{TMP_SUFFIX}"):
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover)
                for old in sorted(checkpoints.iterdir()):
                    if old.is_dir() and not old.is_symlink() and _STEP.fullmatch(old.name):
                        shutil.rmtree(old.rename(old.with_name(old.name + ".deleted" + TMP_SUFFIX)))
            for name in HF_EXPORT_FILES:  # the weights first: a half-deleted export is no loadable model
                (dump / name).unlink(missing_ok=True)
        except OSError as exc:
            error = exc
    if not dist.all_true(error is None):
        reason = f"{type(error).__name__}: {error}" if error is not None else "on rank 0"
        raise UserError(f"--job.overwrite: deleting the previous run's outputs in {dump} failed ({reason})")


def _run_defining(toml_text: str) -> tuple:
    """The parts of a job config that must match to resume a run (model and data, not the schedule)."""
    data = tomllib.loads(toml_text)
    model = {k: data["model"].get(k) for k in ("config", "tokenizer_path")}
    training = {k: data["training"].get(k) for k in ("dataset", "dataset_name", "seq_len", "varlen")}
    return tuple(sorted(model.items())), tuple(sorted(training.items()))
