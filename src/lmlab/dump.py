"""The dump folder: what a run may write there, what the folder may hold when it starts, and `--job.overwrite`.

Every path a run writes inside the dump (`checkpoint.folder`, `metrics.save_tb_folder`,
`profiling.save_traces_folder`, metrics.jsonl, the logs) must resolve (symlinks and `..` followed) to a
path strictly inside it; anything else is a one-line UserError before the folder is touched. What the
folder holds is checked before anything is written (`check_dump_contents`): a run never replaces files
that no lmlab run wrote, another run's outputs, or (without `--job.overwrite`) the weights of a run it
would start over instead of resuming.

`--job.overwrite` starts over: the old run's checkpoints are not loaded, and once the new run has loaded
what it starts from (`clear_previous_run`, called after `Checkpointer.load`), the old run's outputs are
deleted: the checkpoint folder's `step-N` and temporary directories, the tensorboard event files,
metrics.jsonl and the HF export's files. Nothing else in the dump, and nothing outside it.
"""
from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

from lmlab import dumplock
from lmlab.checkpoint import (
    TMP_SUFFIX, complete_steps, free_space, load_step_problem, nearest_existing, read_metadata, step_dirs,
)
from lmlab.config import RECORD_NAME, JobConfig
from lmlab.distributed import Dist
from lmlab.errors import UserError
from lmlab.metrics import METRICS_FILE

LOGS = "logs"  # train.sh tees each rank's output there
# What write_hf puts into the dump (config, weights, the tokenizer files save_pretrained writes).
HF_EXPORT_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
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


def check_dump_contents(cfg: JobConfig) -> None:
    """UserError unless this run may write where it would (it reads only; train.sh runs it before anything is
    created, the trainer again once it holds the dump's lock):
    - the dump is not inside another run's dump, none of the run's inputs (model config, tokenizer, data)
      is in it, and it is not in the data folder (read with its subfolders);
    - what the run writes there (checkpoints, metrics, the HF export) is absent, or an lmlab run's (its
      job_config.toml): no other file is ever replaced;
    - without --job.overwrite, that run is this one (the same model and data config), and one that saved
      weights (checkpoints or an export) is resumed, not started over: checkpointing on, a complete step to
      load, not past --training.steps."""
    dump, paths = Path(cfg.job.dump_folder).resolve(), dump_paths(cfg)
    _check_placement(cfg, dump)
    outputs = _run_outputs(paths, dump)
    record = dump / RECORD_NAME
    if outputs and not record.is_file():
        named = ", ".join(outputs[:4]) + (f" and {len(outputs) - 4} more" if len(outputs) > 4 else "")
        raise UserError(f"--job.dump_folder {cfg.job.dump_folder} holds {named}, which no lmlab run wrote (no "
                        f"{RECORD_NAME}): this run would replace them; choose an empty or new folder")
    if cfg.job.overwrite:
        if cfg.checkpoint.load_step >= 0:
            raise UserError(f"--job.overwrite starts over (it deletes the dump's checkpoints) but "
                            f"--checkpoint.load_step {cfg.checkpoint.load_step} resumes from one; drop one of them")
        return
    if record.is_file():
        try:
            saved = tomllib.loads(record.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"{record}: unreadable ({exc}); restore it, or start over with --job.overwrite") from None
        difference = _run_difference(saved, cfg)
        if difference:
            raise UserError(f"{dump} holds a different run ({difference}; see {record}); use another "
                            "--job.dump_folder, or --job.overwrite to start over there")
    checkpoints = paths["--checkpoint.folder"]
    steps = complete_steps(checkpoints)
    load_step = cfg.checkpoint.load_step
    if load_step >= 0:
        problem = load_step_problem(checkpoints, load_step) if cfg.checkpoint.enable_checkpoint else \
            f"--checkpoint.load_step {load_step}: checkpointing is off (--checkpoint.enable_checkpoint false)"
        if problem:
            raise UserError(problem)
    start = load_step if load_step >= 0 else (steps[-1] if steps and cfg.checkpoint.enable_checkpoint else None)
    if start is None and (steps or (dump / "model.safetensors").is_file()):
        saved = f"checkpoints (step-{steps[-1]})" if steps else "the HF export of a finished run"
        why = "checkpointing is off" if steps else "it has no checkpoint to resume from"
        raise UserError(f"{dump} holds {saved}, and this run would start over and replace it ({why}); "
                        "use --job.overwrite to start over, or another --job.dump_folder")
    if start is not None and start > cfg.training.steps:
        raise UserError(f"--training.steps {cfg.training.steps}: the run resumes from step {start} "
                        f"({checkpoints / f'step-{start}'}), already past it; pass --training.steps {start} or more")
    if start is None and cfg.checkpoint.initial_load_path:
        read_metadata(Path(cfg.checkpoint.initial_load_path))  # one line unless it is a DCP checkpoint


def _check_placement(cfg: JobConfig, dump: Path) -> None:
    """UserError when the dump lies in another run's dump or in the data, or holds one of the run's inputs."""
    for parent in dump.parents:
        if dumplock.holds_a_run(parent):
            raise UserError(f"--job.dump_folder {dump} is inside {parent}, another run's dump folder; "
                            "choose a folder outside it")
    inputs = {"--model.config": cfg.model.config, "--model.tokenizer_path": cfg.model.tokenizer_path,
              "--training.dataset": cfg.training.dataset}
    for option, value in inputs.items():
        path = _local(value)
        if path is None:
            continue  # a hub id
        if path == dump or dump in path.parents:
            raise UserError(f"{option} {value} is inside the dump folder {dump}, whose files the run replaces (the "
                            "HF export) or deletes (--job.overwrite); keep the run's inputs outside it")
        if option == "--training.dataset" and path in dump.parents:
            raise UserError(f"--job.dump_folder {dump} is inside the data folder {value}, which is read with its "
                            "subfolders: the run's outputs would become data; choose a folder outside it")


def _run_outputs(paths: dict[str, Path], dump: Path) -> list[str]:
    """The files and folders of `dump` that a run writes (checkpoints, metrics, tensorboard events, the HF
    export; `paths`: `dump_paths`), as paths relative to it."""
    found = [paths["the metrics file"], *(dump / name for name in HF_EXPORT_FILES)]
    found += sorted(paths["--metrics.save_tb_folder"].glob(_TB_EVENTS))
    checkpoints = paths["--checkpoint.folder"]
    found += [path for _, path in sorted(step_dirs(checkpoints))]
    return [str(path.relative_to(dump)) for path in found if path.exists()]


def prepare_dump_folder(cfg: JobConfig, dist: Dist) -> Path:
    """Check the paths and what the dump holds (`check_dump_contents`), then create the dump folder (train()
    records the config once it starts). Deletes nothing: `--job.overwrite`'s deletion is `clear_previous_run`."""
    dump = Path(cfg.job.dump_folder)
    if dist.is_main:
        check_dump_contents(cfg)
        try:
            dump.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise dump_write_failed(dump, exc) from None
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
                for _, old in sorted(step_dirs(checkpoints)):
                    if not old.is_symlink():
                        shutil.rmtree(old.rename(old.with_name(old.name + ".deleted" + TMP_SUFFIX)))
            for name in HF_EXPORT_FILES:  # the weights first: a half-deleted export is no loadable model
                (dump / name).unlink(missing_ok=True)
        except OSError as exc:
            error = exc
    if not dist.all_true(error is None):
        reason = f"{type(error).__name__}: {error}" if error is not None else "on rank 0"
        raise UserError(f"--job.overwrite: deleting the previous run's outputs in {dump} failed ({reason})")


def _run_difference(saved: dict, cfg: JobConfig) -> str | None:
    """How the recorded config `saved` (a job_config.toml) and `cfg` differ in what makes a run (model and data,
    not the schedule), e.g. "--model.config a.json there, b.json now"; None if they do not. Paths count as
    the same file wherever they are written from."""
    defining = {"model": ("config", "tokenizer_path"), "training": ("dataset", "dataset_name", "seq_len", "varlen")}
    for section, keys in defining.items():
        for key in keys:
            before, now = saved.get(section, {}).get(key), getattr(getattr(cfg, section), key)
            if before != now and (_local(before) is None or _local(before) != _local(now)):
                return f"--{section}.{key} {before} there, {now} now"
    return None


def _local(value: object) -> Path | None:
    """An existing local path named by an option's value, resolved; None for a hub id or nothing."""
    return Path(value).resolve() if isinstance(value, str) and value and Path(value).exists() else None
