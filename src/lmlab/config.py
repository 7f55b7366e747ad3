"""The job configuration: flame's sections and flags, parsed from a TOML file and the command line.

Precedence: command line > TOML (`--job.config_file`) > the defaults below (flame's defaults; the values of
flame's `fla.toml` live in `flame/models/fla.toml`). Flags are `--section.key value` or `--section.key=value`;
booleans may be bare (`--training.compile`) or explicit (`--training.compile false`), so a TOML `true` can be
switched off from the command line (flame could not). Unknown sections or keys (on the command line AND in
the TOML), wrong types and missing values raise `ConfigError`, whose message is one line naming the key and
suggesting the nearest valid one; entry points turn it into exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from lmlab.errors import UserError
from lmlab.kernels.dispatch import BACKENDS


class ConfigError(UserError, ValueError):
    """A bad flag, TOML key or value. The message is one line meant for the user."""


@dataclass
class Job:
    config_file: str | None = None
    dump_folder: str = "exp"
    description: str = ""
    print_args: bool = False
    # lmlab: allow starting a new run in a dump folder that holds a different run's checkpoints.
    overwrite: bool = False


@dataclass
class Model:
    config: str | None = None  # JSON path or hub id of an fla-schema (or any causal-LM) config
    tokenizer_path: str | None = None  # local dir or hub id
    name: str = "fla"
    converters: list[str] = field(default_factory=list)
    backend: str = "auto"  # lmlab: kernel backend auto | torch | fla | flash | triton
    trust_remote_code: bool = False  # lmlab: never run code from a checkpoint unless asked


@dataclass
class Optimizer:
    name: str = "AdamW"
    eps: float = 1e-8
    lr: float = 8e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    implementation: str = "fused"


@dataclass
class LRScheduler:
    warmup_steps: int = 200
    decay_ratio: float | None = None  # None: decay right after warmup; x: WSD, decay over the last x of steps
    decay_type: str = "linear"
    lr_min: float = 0.0  # a ratio: the floor is lr * lr_min


@dataclass
class Training:
    batch_size: int = 8  # per device, per micro-batch
    seq_len: int = 2048
    context_len: int = 2048  # varlen: documents longer than this are split
    varlen: bool = False
    gradient_accumulation_steps: int = 1
    micro_batch_size: int = 0  # lmlab: rows per forward/backward (0: all of batch_size); must divide batch_size
    steps: int = 10000
    max_norm: float = 1.0
    skip_nan_inf: bool = False
    max_consecutive_skips: int = 10  # lmlab: stop a run whose steps keep being skipped
    dataset: str = "HuggingFaceFW/fineweb-edu"
    dataset_name: str | None = None
    dataset_split: str = "train"
    data_dir: str | None = None
    data_files: str | None = None
    data_probs: str | None = None
    text_column: str | None = None  # lmlab: default "text", then "content"
    streaming: bool = False
    num_workers: int = 32
    prefetch_factor: int = 2
    pin_memory: bool = False
    persistent_workers: bool = False
    data_parallel_replicate_degree: int = 1
    data_parallel_shard_degree: int = -1
    tensor_parallel_degree: int = 1
    enable_cpu_offload: bool = False
    fsdp_reshard_after_forward: str = "default"
    mixed_precision_param: str = "bfloat16"
    mixed_precision_reduce: str = "float32"
    compile: bool = False
    gc_freq: int = 50
    seed: int | None = 42
    deterministic: bool = False


@dataclass
class Checkpoint:
    enable_checkpoint: bool = False
    folder: str = "checkpoint"
    interval: int = 500
    initial_load_path: str | None = None
    initial_load_model_weights_only: bool = True
    last_save_model_weights_only: bool = False
    export_dtype: str = "float32"
    async_mode: str = "disabled"
    keep_latest_k: int = 0  # 0 keeps all
    load_step: int = -1  # -1: the newest complete checkpoint
    exclude_from_loading: list[str] = field(default_factory=list)


@dataclass
class Metrics:
    log_freq: int = 10
    enable_tensorboard: bool = False
    save_tb_folder: str = "tb"
    enable_wandb: bool = False
    disable_color_printing: bool = False


@dataclass
class ActivationCheckpoint:
    mode: str = "none"
    selective_ac_option: str = "2"  # "N": every N-th block; "op": per-op policy


@dataclass
class Experimental:
    context_parallel_degree: int = 1
    pipeline_parallel_degree: int = 1
    custom_model_path: str | None = None  # module imported at start to register custom models


@dataclass
class Profiling:
    enable_profiling: bool = False
    save_traces_folder: str = "profile_traces"
    profile_freq: int = 10


@dataclass
class Comm:
    init_timeout_seconds: int = 300
    train_timeout_seconds: int = 100


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    experimental: Experimental = field(default_factory=Experimental)
    profiling: Profiling = field(default_factory=Profiling)
    comm: Comm = field(default_factory=Comm)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML (None values are left out: TOML has no null)."""
        return tomli_w.dumps(
            {s: {k: v for k, v in sec.items() if v is not None} for s, sec in self.to_dict().items()}
        )


# Values restricted to a set of choices, checked after parsing.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.backend": BACKENDS,
    "optimizer.name": ("Adam", "AdamW"),
    "optimizer.implementation": ("fused", "foreach", "for-loop"),
    "lr_scheduler.decay_type": ("linear", "sqrt", "cosine"),
    "training.fsdp_reshard_after_forward": ("default", "always", "never"),
    "training.mixed_precision_param": ("bfloat16", "float32", "float16"),
    "training.mixed_precision_reduce": ("float32", "bfloat16"),
    "checkpoint.export_dtype": ("float32", "bfloat16", "float16"),
    "checkpoint.async_mode": ("disabled", "async", "async_with_pinned_mem"),
    "activation_checkpoint.mode": ("none", "full", "selective"),
}
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}  # type: ignore[misc]


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _nearest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


def _resolve_key(dotted: str) -> tuple[str, str, Any]:
    """'training.seq_len' -> (section, key, type); ConfigError naming the nearest valid key."""
    sections = _sections()
    all_keys = [f"{s}.{k}" for s, cls in sections.items() for k in _field_types(cls)]
    section, _, key = dotted.partition(".")
    if section not in sections or not key:
        raise ConfigError(f"unknown option --{dotted}{_nearest(dotted, all_keys)}")
    types_ = _field_types(sections[section])
    if key not in types_:
        raise ConfigError(f"unknown option --{dotted}{_nearest(dotted, all_keys)}")
    return section, key, types_[key]


def _is_bool(tp: Any) -> bool:
    return tp is bool


def _convert(dotted: str, tp: Any, value: Any) -> Any:
    """Convert a CLI string (or a TOML value) to the field's type; ConfigError on mismatch."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = next(a for a in args if a is not type(None))
    if typing.get_origin(tp) is list:
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [str(v) for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE:
            return True
        if str(value).lower() in _FALSE:
            return False
        raise ConfigError(f"--{dotted} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"--{dotted} expects an integer, got {value!r}")
        try:
            return int(value) if isinstance(value, int) else int(str(value), 0)
        except ValueError:
            raise ConfigError(f"--{dotted} expects an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"--{dotted} expects a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"--{dotted} expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list, bool)):
            raise ConfigError(f"--{dotted} expects a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled config type {tp} for {dotted}")


def _set(cfg: JobConfig, dotted: str, raw: Any) -> None:
    section, key, tp = _resolve_key(dotted)
    setattr(getattr(cfg, section), key, _convert(dotted, tp, raw))


def _split_cli(argv: list[str]) -> list[tuple[str, Any]]:
    """Turn argv into (dotted key, raw value) pairs; bare booleans get True."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        _, _, tp = _resolve_key(name)
        if eq:
            pairs.append((name, value))
            i += 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if _is_bool(tp):
            if nxt is not None and nxt.lower() in _TRUE + _FALSE:
                pairs.append((name, nxt))
                i += 2
            else:
                pairs.append((name, True))
                i += 1
            continue
        if nxt is None or (nxt.startswith("--") and not _looks_numeric(nxt)):
            raise ConfigError(f"--{name} is missing its value")
        pairs.append((name, nxt))
        i += 2
    return pairs


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_toml(cfg: JobConfig, path: str | Path) -> None:
    """Apply a TOML job config onto `cfg`; unknown sections or keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--job.config_file {path}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--job.config_file {path}: invalid TOML: {exc}") from None
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
        for key, value in values.items():
            try:
                _set(cfg, f"{section}.{key}", value)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None


def parse_args(argv: list[str]) -> JobConfig:
    """Build the JobConfig from defaults, the TOML named by --job.config_file, then the command line."""
    pairs = _split_cli(argv)
    cfg = JobConfig()
    for name, value in pairs:
        if name == "job.config_file":
            load_toml(cfg, value)
    for name, value in pairs:
        _set(cfg, name, value)
    validate(cfg)
    return cfg


def validate(cfg: JobConfig) -> None:
    """Check choices and ranges that a single value's type cannot express."""
    for dotted, choices in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"--{dotted} must be one of {', '.join(choices)}, got {value!r}")
    t = cfg.training
    positive = {
        "training.batch_size": t.batch_size,
        "training.seq_len": t.seq_len,
        "training.context_len": t.context_len,
        "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "training.steps": t.steps,
        "checkpoint.interval": cfg.checkpoint.interval,
        "metrics.log_freq": cfg.metrics.log_freq,
    }
    for dotted, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{dotted} must be positive, got {value}")
    if t.num_workers < 0:
        raise ConfigError(f"--training.num_workers must be >= 0, got {t.num_workers}")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"--optimizer.lr must be positive, got {cfg.optimizer.lr}")
    if not 0.0 <= cfg.lr_scheduler.lr_min <= 1.0:
        raise ConfigError(f"--lr_scheduler.lr_min is a ratio of lr in [0, 1], got {cfg.lr_scheduler.lr_min}")
    if cfg.lr_scheduler.warmup_steps < 0:
        raise ConfigError(f"--lr_scheduler.warmup_steps must be >= 0, got {cfg.lr_scheduler.warmup_steps}")
    ratio = cfg.lr_scheduler.decay_ratio
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"--lr_scheduler.decay_ratio must be in [0, 1], got {ratio}")
    if cfg.checkpoint.keep_latest_k == 1:
        # Deleting the only complete checkpoint before the next is written would leave nothing to resume.
        raise ConfigError("--checkpoint.keep_latest_k 1 is unsafe (a crash while saving loses all); use 0 or >= 2")
    if cfg.checkpoint.keep_latest_k < 0:
        raise ConfigError(f"--checkpoint.keep_latest_k must be >= 0, got {cfg.checkpoint.keep_latest_k}")
    if t.max_norm < 0:
        raise ConfigError(f"--training.max_norm must be >= 0 (0 disables clipping), got {t.max_norm}")
    if t.micro_batch_size < 0 or (t.micro_batch_size and t.batch_size % t.micro_batch_size):
        raise ConfigError(
            f"--training.micro_batch_size must divide --training.batch_size ({t.batch_size}), got {t.micro_batch_size}"
        )
    if t.varlen and t.context_len > t.seq_len:
        raise ConfigError(f"--training.context_len ({t.context_len}) cannot exceed --training.seq_len ({t.seq_len})")
    if cfg.experimental.pipeline_parallel_degree != 1 or t.tensor_parallel_degree != 1:
        raise ConfigError("pipeline and tensor parallelism are not supported; use data parallel (FSDP2) degrees")
    if cfg.metrics.enable_wandb:
        raise ConfigError("--metrics.enable_wandb is not supported; lmlab logs to metrics.jsonl and tensorboard")
    if cfg.model.converters:
        raise ConfigError(f"--model.converters {','.join(cfg.model.converters)} is not supported (no float8 training yet)")
    if cfg.profiling.profile_freq <= 0:
        raise ConfigError(f"--profiling.profile_freq must be positive, got {cfg.profiling.profile_freq}")
    if cfg.experimental.context_parallel_degree != 1:
        raise ConfigError("--experimental.context_parallel_degree > 1 is not supported")
