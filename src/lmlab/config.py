"""The job configuration: flame's sections and flags, parsed from a TOML file and the command line.

Precedence: command line > TOML (`--job.config_file`) > the defaults below (flame's defaults; the values of
flame's `fla.toml` live in `flame/models/fla.toml`). Flags are `--section.key value` or `--section.key=value`;
booleans may be bare (`--training.compile`) or explicit (`--training.compile false`), so a TOML `true` can be
switched off from the command line (flame could not). Unknown sections or keys (on the command line AND in
the TOML), wrong types and missing values raise `ConfigError`, whose message is one line naming the key and
suggesting the nearest valid one; entry points turn it into exit code 2. Command-line values are strings,
converted to the option's type; a TOML value must already have it (`steps = "5"` is refused: `_from_toml`).

The option catalogue: every option is declared once, in the section dataclasses below, with its type (the
annotation), its default and its valid values (`option(default, domain)`: `Int(ge=1)`, `Float(gt=0)`,
`Choice(...)`, ...). `catalogue()` collects them; `validate()` checks every value against it in one place,
right after parsing and before anything starts; README's option table states the same valid values
(`python -m lmlab.config` prints them; a test keeps the two equal). A bad value is one line:
`--section.key: <value> is <problem> (expected <valid values>)`, prefixed by the TOML file it came from.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Callable, ClassVar

import tomli_w

from lmlab.errors import UserError
from lmlab.kernels.dispatch import BACKENDS


class ConfigError(UserError, ValueError):
    """A bad flag, TOML key or value. The message is one line meant for the user."""


# ---------------------------------------------------------------------------------------------------
# Domains: the valid values of one option


def show(value: Any) -> str:
    """A value as error lines and the option table show it: true/false, none, 'text', 0.001, inf."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list):
        return repr(",".join(map(str, value)))
    if isinstance(value, str):
        return repr(value)
    return str(value)


class Domain:
    """The valid values of one option. `expected` says them in words (the option table and every error line
    quote it); `problem(value, cfg)` is None for a valid value, else what is wrong with it, a phrase that
    follows "<value> is" ("too small", "not finite"). `cfg` serves the few ranges that depend on another
    option (checked after it: the catalogue's order)."""

    @property
    def expected(self) -> str:
        raise NotImplementedError

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Flag(Domain):
    @property
    def expected(self) -> str:
        return "true or false"

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        return None if isinstance(value, bool) else "not true or false"


@dataclass(frozen=True)
class Relation:
    """A range that depends on other options: `check(value, cfg)` names the problem or returns None."""

    expected: str
    check: Callable[[Any, Any], str | None]


@dataclass(frozen=True)
class Number(Domain):
    """An integer (`Int`) or a finite float (`Float`) within bounds: ge/gt (>=, >) and le/lt (<=, <).
    `also`: valid values outside the bounds (-1: all ranks); `none`: None is valid too; `refused`: invalid
    values with the reason to say instead of "too small"; `relation`: a bound set by another option."""

    ge: int | float | None = None
    gt: int | float | None = None
    le: int | float | None = None
    lt: int | float | None = None
    also: tuple[int, ...] = ()
    none: bool = False
    refused: tuple[tuple[int, str], ...] = ()
    relation: Relation | None = None
    text: str | None = None  # the expected values in words, where the bounds alone would mislead
    integer: ClassVar[bool] = False

    @property
    def expected(self) -> str:
        if self.text is not None:
            return self.text
        low = f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None else None
        high = f"<= {self.le}" if self.le is not None else f"< {self.lt}" if self.lt is not None else None
        if low and high:
            bounds = (f"in {'[' if self.ge is not None else '('}{low.split()[1]}, "
                      f"{high.split()[1]}{']' if self.le is not None else ')'}")
        else:
            bounds = low or high or ("an integer" if self.integer else "a number")
        if not self.integer and not high:
            bounds += ", finite"
        text = " or ".join(["none"] * self.none + [show(v) for v in self.also] + [bounds])
        return f"{text}, {self.relation.expected}" if self.relation else text

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        if value is None:
            return None if self.none else "not set"
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return "not an integer" if self.integer else "not a number"
        if value in self.also:
            return None
        if isinstance(value, float) and math.isnan(value):
            return "not a number"
        if isinstance(value, float) and math.isinf(value):
            return "not finite"
        reason = dict(self.refused).get(value)
        if reason:
            return reason
        if (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt):
            return "too small"
        if (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt):
            return "too large"
        return self.relation.check(value, cfg) if self.relation else None


class Int(Number):
    integer = True


class Float(Number):
    integer = False


@dataclass(frozen=True)
class Choice(Domain):
    values: tuple[str, ...]

    @property
    def expected(self) -> str:
        return "one of " + ", ".join(self.values)

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        return None if value in self.values else "not a valid choice"


@dataclass(frozen=True)
class Only(Domain):
    """An option flame has and lmlab does not support: only its neutral value is accepted."""

    value: Any
    why: str

    @property
    def expected(self) -> str:
        return f"{'empty' if self.value == [] else show(self.value)} only"

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        return None if value == self.value else f"not supported: {self.why}"


@dataclass(frozen=True)
class Text(Domain):
    """A string (`what` says which: a path, a hub id); `empty`: "" is valid; `none`: None is valid."""

    what: str = "any text"
    empty: bool = True
    none: bool = False

    @property
    def expected(self) -> str:
        return f"none or {self.what}" if self.none else self.what

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        if value is None:
            return None if self.none else "not set"
        if not isinstance(value, str):
            return "not a string"
        return "empty" if not self.empty and not value.strip() else None


@dataclass(frozen=True)
class SubFolder(Domain):
    """A folder inside the dump folder (`--job.overwrite` deletes some of them: never the dump or beyond)."""

    @property
    def expected(self) -> str:
        return "a relative path inside the dump folder"

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        if not isinstance(value, str):
            return "not a string"
        path = PurePath(value.strip())
        if not value.strip():
            return "empty"
        if path.is_absolute() or ".." in path.parts:
            return "outside the dump folder"
        return "the dump folder itself" if not path.parts else None


def dataset_count(cfg: JobConfig) -> int:
    """The number of sources in --training.dataset (a comma list), as lmlab.data counts them."""
    return len([s for s in cfg.training.dataset.split(",") if s.strip()])


def _sources(n: int) -> str:
    return f"{n} dataset{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class PerSource(Domain):
    """One value for every dataset, or a comma list with one per dataset (`own_list`: with a single
    dataset the value is that dataset's own comma list, e.g. of data files)."""

    none: bool = False
    own_list: bool = False

    @property
    def expected(self) -> str:
        if self.own_list:
            return "none or files; with several datasets, one entry per dataset"
        return "none, one value or one per dataset" if self.none else "one value, or one per dataset"

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        if value is None:
            return None if self.none else "not set"
        if not isinstance(value, str):
            return "not a string"
        items, n = len(value.split(",")), dataset_count(cfg)
        if n and items > 1 and items != n and not (self.own_list and n == 1):
            return f"{items} entries for {_sources(n)}"
        return None


@dataclass(frozen=True)
class Probs(Domain):
    """--training.data_probs: the sampling weight of each dataset."""

    @property
    def expected(self) -> str:
        return "none or one weight >= 0 per dataset, finite, sum > 0"

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            return "not a string"
        try:
            probs = [float(p) for p in value.split(",")]
        except ValueError:
            return "not a comma list of numbers"
        if not all(math.isfinite(p) for p in probs):
            return "not finite"
        if any(p < 0 for p in probs):
            return "negative"
        n = dataset_count(cfg)
        if n and len(probs) != n:
            return f"{len(probs)} weight{'s' if len(probs) != 1 else ''} for {_sources(n)}"
        return "all zeros" if sum(probs) <= 0 else None


@dataclass(frozen=True)
class Subset(Domain):
    """A comma list whose items are names from `values`."""

    values: tuple[str, ...]

    @property
    def expected(self) -> str:
        return "a comma list of " + ", ".join(self.values)

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        if not isinstance(value, list):
            return "not a list"
        unknown = [v for v in value if v not in self.values]
        if not unknown:
            return None
        return "unknown" if len(value) == 1 else f"not a list of known names ({unknown[0]!r} is unknown)"


@dataclass(frozen=True)
class EveryOrOp(Domain):
    """--activation_checkpoint.selective_ac_option: "op" or every N-th block."""

    @property
    def expected(self) -> str:
        return "op or an integer >= 1"

    def problem(self, value: Any, cfg: JobConfig) -> str | None:
        ok = value == "op" or (isinstance(value, str) and value.isascii() and value.isdigit() and int(value) >= 1)
        return None if ok else "neither op nor an integer >= 1"


def option(default: Any, domain: Domain, meaning: str) -> Any:
    """A section field: its default, its valid values and what it means (the catalogue's entry)."""
    metadata = {"domain": domain, "meaning": meaning}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _divides_batch_size(value: int, cfg: JobConfig) -> str | None:
    if value and cfg.training.batch_size % value:
        return f"not a divisor of --training.batch_size {cfg.training.batch_size}"
    return None


def _fits_seq_len(value: int, cfg: JobConfig) -> str | None:
    if cfg.training.varlen and value > cfg.training.seq_len:
        return f"more than --training.seq_len {cfg.training.seq_len} with --training.varlen"
    return None


CHECKPOINT_STATES = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------------
# The sections: every option with its type, default and valid values (the catalogue)


@dataclass
class Job:
    config_file: str | None = option(None, Text("a TOML file", empty=False, none=True),
                                     "the TOML whose values the command line overrides")
    dump_folder: str = option("exp", Text("a folder path", empty=False),
                              "where checkpoints, logs, metrics and the HF export go")
    description: str = option("", Text(), "a free-text label")
    print_args: bool = option(False, Flag(), "print the resolved config")
    overwrite: bool = option(False, Flag(),
                             "start over in a dump folder that holds another run (otherwise refused); once the new "
                             "run has started, deletes the old run's checkpoints, metrics, tensorboard events and HF "
                             "export; never recorded in job_config.toml")


@dataclass
class Model:
    config: str | None = option(None, Text("a config JSON or hub id", empty=False, none=True),
                                "fla-schema model config: a JSON path (e.g. configs/gated_deltanet_340M.json) or hub id")
    tokenizer_path: str | None = option(None, Text("a tokenizer folder or hub id", empty=False, none=True),
                                        "a local tokenizer folder or a hub id; its largest token id must be below "
                                        "the model config's vocab_size")
    name: str = option("fla", Text(), "flame's; ignored (lmlab takes the model type from the config)")
    converters: list[str] = option([], Only([], "no float8 training yet"), "flame's float8 converters; none in lmlab")
    backend: str = option("auto", Choice(BACKENDS),
                          "kernels: auto (accelerated where healthy), torch (portable), fla, flash, triton (lmlab's "
                          "short convolution, selective scan, and HQLT's local attention for windows ≤ 64), flex (FlexAttention for HQLT's local attention); "
                          "not auto: replaces the model config's backend key for this run's model only (the export "
                          "keeps the config's)")
    trust_remote_code: bool = option(False, Flag(), "allow code from a hub checkpoint (never on by default)")


@dataclass
class Optimizer:
    name: str = option("AdamW", Choice(("Adam", "AdamW")),
                       "torch.optim's Adam or AdamW; weight decay applies to every parameter, as in flame")
    eps: float = option(1e-8, Float(gt=0), "Adam's epsilon")
    lr: float = option(8e-4, Float(gt=0), "peak learning rate")
    beta1: float = option(0.9, Float(ge=0, lt=1), "Adam's beta1")
    beta2: float = option(0.95, Float(ge=0, lt=1), "Adam's beta2")
    weight_decay: float = option(0.1, Float(ge=0), "decoupled weight decay (AdamW)")
    implementation: str = option("fused", Choice(("fused", "foreach", "for-loop")),
                                 "the optimizer's kernels: fused (CUDA; foreach on CPU), foreach, for-loop")


@dataclass
class LRScheduler:
    warmup_steps: int = option(200, Int(ge=0), "linear warmup steps: the LR multiplier is (s+1)/warmup_steps")
    decay_ratio: float | None = option(None, Float(gt=0, le=1, none=True),
                                       "none: decay right after warmup; x: WSD, stay at lr, decay over the last "
                                       "fraction x of the steps")
    decay_type: str = option("linear", Choice(("linear", "sqrt", "cosine")), "the shape of the decay")
    lr_min: float = option(0.0, Float(ge=0, le=1), "a ratio: the LR decays to lr x lr_min")


@dataclass
class Training:
    batch_size: int = option(8, Int(ge=1), "sequences per device per micro-batch")
    seq_len: int = option(2048, Int(ge=2), "tokens per row")
    context_len: int = option(2048, Int(ge=1, relation=Relation("<= seq_len with varlen", _fits_seq_len)),
                              "with varlen, documents longer than this are split")
    varlen: bool = option(False, Flag(),
                          "pass document boundaries (cu_seqlens): attention and recurrent states reset per document")
    gradient_accumulation_steps: int = option(1, Int(ge=1),
                                              "micro-batches per optimizer step; a step's loss is the mean over all "
                                              "its tokens, so 1x16 and 4x4 give the same gradient")
    micro_batch_size: int = option(0, Int(ge=0, relation=Relation("divides batch_size", _divides_batch_size),
                                          text="0 or a divisor of batch_size"),
                                   "lmlab: run each loaded batch as forward/backward passes of this many rows (0: "
                                   "all; on a GPU, the most that fit, measured at the first step): the same step "
                                   "loss in less activation memory")
    steps: int = option(10000, Int(ge=1), "optimizer steps of the run (a resume with another value reshapes the "
                                          "LR schedule, and says so)")
    max_norm: float = option(1.0, Float(ge=0), "gradient clipping norm (0: measure only)")
    skip_nan_inf: bool = option(False, Flag(),
                                "a non-finite loss or gradient norm skips the optimizer step (counted and logged; "
                                "the LR schedule still advances); without it the run stops at once")
    max_consecutive_skips: int = option(10, Int(ge=1), "stop the run after this many skipped steps in a row")
    dataset: str = option("HuggingFaceFW/fineweb-edu", Text("a hub id or path, or a comma list of them", empty=False),
                          "training data: a hub id (streamed) or a local file or folder; a comma list mixes sources")
    dataset_name: str | None = option(None, PerSource(none=True), "passed to datasets.load_dataset as name")
    dataset_split: str = option("train", PerSource(), "the split to read")
    data_dir: str | None = option(None, PerSource(none=True), "passed to datasets.load_dataset as data_dir")
    data_files: str | None = option(None, PerSource(none=True, own_list=True), "one source's files (a comma list)")
    data_probs: str | None = option(None, Probs(), "mixing weights of the sources (none: equal)")
    text_column: str | None = option(None, Text("a column name", none=True),
                                     "the text column (none: text, then content)")
    streaming: bool = option(False, Flag(), "stream local datasets too (hub ids always stream)")
    num_workers: int = option(32, Int(ge=0), "data loader processes per rank (0: in the trainer)")
    prefetch_factor: int = option(2, Int(ge=1), "batches each data worker prepares ahead")
    pin_memory: bool = option(False, Flag(), "pin batches in page-locked memory")
    persistent_workers: bool = option(False, Flag(), "keep the data workers alive between epochs")
    data_parallel_replicate_degree: int = option(1, Int(ge=1), "HSDP replication degree")
    data_parallel_shard_degree: int = option(-1, Int(ge=1, also=(-1,)), "FSDP2 sharding degree (-1: all ranks)")
    tensor_parallel_degree: int = option(1, Only(1, "lmlab trains data parallel: FSDP2 degrees"),
                                         "flame's; lmlab trains data parallel")
    enable_cpu_offload: bool = option(False, Flag(), "FSDP2 CPU offload (several ranks)")
    fsdp_reshard_after_forward: str = option("default", Choice(("default", "always", "never")),
                                             "FSDP2's reshard_after_forward policy")
    mixed_precision_param: str = option("bfloat16", Choice(("bfloat16", "float32", "float16")),
                                        "FSDP2 compute dtype (one GPU: bf16 autocast over fp32 weights; CPU: fp32)")
    mixed_precision_reduce: str = option("float32", Choice(("float32", "bfloat16")),
                                         "FSDP2 gradient-reduction dtype")
    compile: bool = option(False, Flag(), "torch.compile each block")
    gc_freq: int = option(50, Int(ge=1), "run Python's garbage collector every N steps")
    # numpy seeds each rank with seed + rank, below 2**32
    seed: int | None = option(42, Int(ge=0, le=2**31 - 1, none=True), "random seed (none: unseeded)")
    deterministic: bool = option(False, Flag(), "torch.use_deterministic_algorithms")


@dataclass
class Checkpoint:
    enable_checkpoint: bool = option(False, Flag(), "save checkpoints and resume from them")
    folder: str = option("checkpoint", SubFolder(), "where the step-N directories go")
    interval: int = option(500, Int(ge=1), "save every N steps and at the last step")
    initial_load_path: str | None = option(None, Text("a checkpoint folder", none=True),
                                           "warm-start from this checkpoint when the dump has none")
    initial_load_model_weights_only: bool = option(True, Flag(), "warm-start the model weights only")
    last_save_model_weights_only: bool = option(False, Flag(), "the final checkpoint holds the model only")
    export_dtype: str = option("float32", Choice(DTYPE_NAMES), "the HF export's dtype")
    async_mode: str = option("disabled", Choice(("disabled", "async", "async_with_pinned_mem")),
                             "write checkpoints in the background")
    # 1 would delete the only complete checkpoint before the next is written
    keep_latest_k: int = option(0, Int(ge=2, also=(0,), refused=(
        (1, "unsafe: a crash while saving would leave no complete checkpoint"),)),
        "keep only the newest k complete checkpoints (0: all)")
    load_step: int = option(-1, Int(ge=0, also=(-1,)), "resume from step N (-1: the newest complete checkpoint)")
    exclude_from_loading: list[str] = option([], Subset(CHECKPOINT_STATES), "states a resume leaves out")


@dataclass
class Metrics:
    log_freq: int = option(10, Int(ge=1), "log every N steps")
    enable_tensorboard: bool = option(False, Flag(), "write tensorboard events in the dump folder")
    save_tb_folder: str = option("tb", SubFolder(), "where the tensorboard events go")
    enable_wandb: bool = option(False, Flag(),
                                "log to Weights & Biases too, named as flame does: project $WANDB_PROJECT (fla), "
                                "run $WANDB_NAME (model type-dump folder name), entity $WANDB_ENTITY; a resume "
                                "continues the same W&B run; offline without a login or network (upload later "
                                "with the wandb sync command it prints)")
    disable_color_printing: bool = option(False, Flag(), "plain log lines in a terminal")


@dataclass
class ActivationCheckpoint:
    mode: str = option("none", Choice(("none", "full", "selective")), "recompute activations in the backward")
    selective_ac_option: str = option("2", EveryOrOp(), "selective mode: N, every N-th block; op, save matmul outputs")


@dataclass
class Experimental:
    context_parallel_degree: int = option(1, Only(1, "no context parallelism yet"), "flame's; not in lmlab")
    pipeline_parallel_degree: int = option(1, Only(1, "lmlab trains data parallel: FSDP2 degrees"),
                                           "flame's; not in lmlab")
    custom_model_path: str | None = option(None, Text("a module name", empty=False, none=True),
                                           "a module imported at start to register your own model types")


@dataclass
class Profiling:
    enable_profiling: bool = option(False, Flag(), "a torch profiler trace of one step every profile_freq steps")
    save_traces_folder: str = option("profile_traces", SubFolder(), "where the traces go")
    profile_freq: int = option(10, Int(ge=1), "profile one step every N steps")


@dataclass
class Comm:
    init_timeout_seconds: int = option(300, Int(ge=1), "collective timeout at the start")
    train_timeout_seconds: int = option(100, Int(ge=1), "collective timeout per step after the first")


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

    def record_toml(self) -> str:
        """The config a run records in its dump (job_config.toml), which `--job.config_file` continues: without
        the destructive --job.overwrite, so that rerunning the record never deletes the run, and without
        --job.config_file (the record holds every value; a job config includes no other)."""
        record = copy.deepcopy(self)
        record.job.overwrite = False
        record.job.config_file = None
        return record.to_toml()


@dataclass(frozen=True)
class Option:
    """One entry of the catalogue."""

    name: str  # "training.seq_len"
    type: Any  # the annotation: int, float, bool, str, list[str] or X | None
    default: Any
    domain: Domain
    meaning: str


def _optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for X | None, (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


@functools.cache
def catalogue() -> dict[str, Option]:
    """Every option, in the order of the sections and their fields (validation checks them in this order)."""
    options: dict[str, Option] = {}
    defaults = JobConfig()
    for section in dataclasses.fields(JobConfig):
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name, domain = f"{section.name}.{f.name}", f.metadata.get("domain")
            assert isinstance(domain, Domain), f"{name} has no domain: declare it with option(default, domain)"
            base, optional = _optional(hints[f.name])
            if isinstance(domain, Number):  # the domain agrees with the annotation
                assert base is (int if domain.integer else float) and optional == domain.none, name
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            assert domain.problem(default, defaults) is None, f"{name}: the default is not valid"
            options[name] = Option(name, hints[f.name], default, domain, f.metadata["meaning"])
    return options


# ---------------------------------------------------------------------------------------------------
# Parsing

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def nearest(name: str, options: list[str]) -> str:
    """` (did you mean X?)` for the closest of `options` to a misspelt `name`, "" if none is close."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


def _resolve_key(dotted: str) -> Option:
    """'training.seq_len' -> its Option; ConfigError naming the nearest valid key."""
    options = catalogue()
    if dotted not in options:
        raise ConfigError(f"unknown option --{dotted}{nearest(dotted, list(options))}")
    return options[dotted]


# What a value of each option type is called in an error line (only a TOML value can fail to be a string)
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a quoted string"}
# The TOML types each option type takes (exact types: a TOML boolean is no integer); a float option takes `lr = 1`
_TOML_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _bad_type(opt: Option, value: Any, kind: str) -> ConfigError:
    # a TOML array or table as Python writes it (show() writes a list as the comma string it stands for)
    shown = repr(value) if isinstance(value, (list, dict)) else show(value)
    return ConfigError(f"--{opt.name}: {shown} is not {kind} (expected {opt.domain.expected})")


def _integer(text: str) -> int:
    """An integer as Python writes one (10, 0x10, 0o20, 0b1010, 1_000), with leading zeros read as decimal: 010 is
    10 (Python's base 0 refuses them). ValueError for anything else."""
    try:
        return int(text, 0)
    except ValueError:
        return int(text, 10)


def _is_none(opt: Option, value: Any) -> bool:
    """`none` or `null` (any case) for an optional option: None, on the command line and in a TOML (no null there)."""
    return _optional(opt.type)[1] and isinstance(value, str) and value.lower() in ("none", "null")


def _convert(opt: Option, value: str | bool) -> Any:
    """A command-line value (a string; True for a bare boolean flag) as the option's type; ConfigError if the
    string is none of that type."""
    tp, _ = _optional(opt.type)
    if _is_none(opt, value):
        return None
    if typing.get_origin(tp) is list:
        return [v for v in value.split(",") if v]
    if isinstance(value, bool) or tp is str:
        return value
    if tp is bool and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    try:
        if tp is int:
            return _integer(value)
        if tp is float:
            return float(value)
    except ValueError:
        pass
    raise _bad_type(opt, value, _KINDS[tp])


def _from_toml(opt: Option, value: Any) -> Any:
    """A TOML value as the option's value; ConfigError unless it has the option's TOML type. The command line's
    conversions do not apply: an integer option takes `5`, not `"5"`, a string option `"5"`, not `5`, a boolean
    `true`, not `"yes"`. A list option takes an array of strings or a comma list (as on the command line), an
    optional option `"none"`."""
    tp, _ = _optional(opt.type)
    if _is_none(opt, value):
        return None
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            return _convert(opt, value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise _bad_type(opt, value, "a list of strings")
    if type(value) not in _TOML_TYPES[tp]:
        raise _bad_type(opt, value, _KINDS[tp])
    return float(value) if tp is float else value


def _set(cfg: JobConfig, dotted: str, raw: str | bool) -> None:
    """Set an option from the command line."""
    opt = _resolve_key(dotted)
    section, key = dotted.split(".")
    setattr(getattr(cfg, section), key, _convert(opt, raw))


def _split_cli(argv: list[str]) -> list[tuple[str, Any]]:
    """Turn argv into (dotted key, raw value) pairs; bare booleans get True."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        opt = _resolve_key(name)
        if eq:
            pairs.append((name, value))
            i += 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if opt.type is bool:
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


RECORD_NAME = "job_config.toml"  # the config a run records in its dump folder (JobConfig.record_toml)


def _check_not_an_include(path: Path, named: str | None) -> None:
    """A job config cannot include another: ConfigError if its `[job] config_file` names another file (it would
    be ignored). Exempt: a run's record written before records left the key out, where it named the TOML the run
    started from (the record holds every value already), so that the record's continue command still works."""
    if named is None or path.name == RECORD_NAME or Path(named).resolve() == path.resolve():
        return
    raise ConfigError(f"--job.config_file: {show(named)} is not allowed in a job config (a job config cannot include "
                      "another; remove the line)")


def load_toml(cfg: JobConfig, path: str | Path, origins: dict[str, str] | None = None) -> None:
    """Apply a TOML job config onto `cfg`; unknown sections or keys are errors. `origins` records which
    options the file set (dotted name -> path), so that validation can name the file of a bad value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--job.config_file {path}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--job.config_file {path}: invalid TOML: {exc}") from None
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
        for key, value in values.items():
            name = f"{section}.{key}"
            try:
                value = _from_toml(_resolve_key(name), value)
                if name == "job.config_file":
                    _check_not_an_include(path, value)
                    continue  # the command line names the file being read
                setattr(getattr(cfg, section), key, value)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            if origins is not None:
                origins[name] = str(path)


def parse_args(argv: list[str]) -> JobConfig:
    """Build the JobConfig from defaults, the TOML named by --job.config_file, then the command line, and
    validate every value. `-h` / `--help` prints `help_text()` and exits 0, as argparse does."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(help_text())
        raise SystemExit(0)
    pairs = _split_cli(argv)
    cfg = JobConfig()
    origins: dict[str, str] = {}
    for name, value in pairs:
        if name == "job.config_file":
            _set(cfg, name, value)
            _check(catalogue()[name], cfg)
            if cfg.job.config_file is not None:
                load_toml(cfg, cfg.job.config_file, origins)
    for name, value in pairs:
        _set(cfg, name, value)
        origins.pop(name, None)
    validate(cfg, origins)
    return cfg


def validate(cfg: JobConfig, origins: dict[str, str] | None = None) -> None:
    """Check every option's value against the catalogue, in its order; the first bad one is a ConfigError:
    `[<toml file>: ]--section.key: <value> is <problem> (expected <valid values>)`."""
    for opt in catalogue().values():
        _check(opt, cfg, origins)


def _check(opt: Option, cfg: JobConfig, origins: dict[str, str] | None = None) -> None:
    section, key = opt.name.split(".")
    value = getattr(getattr(cfg, section), key)
    problem = opt.domain.problem(value, cfg)
    if problem:
        where = f"{origins[opt.name]}: " if origins and opt.name in origins else ""
        raise ConfigError(f"{where}--{opt.name}: {show(value)} is {problem} (expected {opt.domain.expected})")


def type_name(opt: Option) -> str:
    """int, float, bool, str or list (the option's annotation, without its None)."""
    base, _ = _optional(opt.type)
    return "list" if typing.get_origin(base) is list else base.__name__


def default_text(opt: Option) -> str:
    return "empty" if opt.default in ([], "") else show(opt.default).strip("'")


def options_table() -> str:
    """The catalogue as a Markdown table (option, type, default, valid values, meaning): README's option
    table is this table."""
    rows = ["| option | type | default | valid values | meaning |", "|---|---|---|---|---|"]
    for opt in catalogue().values():
        rows.append(f"| `{opt.name}` | {type_name(opt)} | {default_text(opt)} | {opt.domain.expected} | {opt.meaning} |")
    return "\n".join(rows)


HELP_FLAGS = ("-h", "--help")


def help_text() -> str:
    """`bash train.sh --help`: every option with its type, default, valid values and meaning (the catalogue)."""
    lines = [
        "usage: bash train.sh [--section.key value | --section.key=value ...]   (lmlab train: the same flags)",
        "",
        "Trains through torchrun on every GPU (one process without GPUs); environment: NGPU, NNODE, MASTER_ADDR,",
        "MASTER_PORT, LOG_RANK. Precedence: command line > --job.config_file TOML > the defaults below. Booleans",
        "may be bare (--training.compile) or explicit (--training.compile false). flame/models/fla.toml holds the",
        "paper's values.",
        "",
        "options (type, default; valid values):",
    ]
    for opt in catalogue().values():
        lines.append(f"  --{opt.name}  {type_name(opt)}, default {default_text(opt)}; {opt.domain.expected}")
        lines.append(textwrap.fill(opt.meaning, width=110, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_table())
