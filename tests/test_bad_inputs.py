"""The catalogue of bad inputs. Each one ends the run with exit code 2 and one line (the last on stderr,
"error: ...") naming the problem, no traceback, and leaves the dump folder, which holds an earlier run
(checkpoint, HF export, metrics, config), exactly as it was.

Most cases run `lmlab.train.main` in this process; a few run `bash train.sh` to show that the launcher (and
torchrun) keep the contract. Evaluation inputs are covered by the eval tests.
"""
from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import lmlab.train
import paper_command
from conftest import REPO
from lmlab.config import (
    Choice, EveryOrOp, Flag, JobConfig, Number, Only, Option, PerSource, Probs, SubFolder, Subset, Text, catalogue,
    parse_args, type_name, validate,
)
from lmlab.config import Model as ModelOptions
from lmlab.errors import UserError
from lmlab.checkpoint import write_hf
from lmlab.modeling import (
    MODEL_KEYS, TokenIds, check_model_keys, family_keys, lmlab_model_types, load_model_config, load_tokenizer,
    token_id_bound,
)
from tiny_run import SMALL_MODEL, metrics_lines, small_args, train_sh

Value = str | None | Callable[[Path, Path], str]  # a callable gets (tmp_path, dump) and returns the value


@dataclass
class Bad:
    expected: str  # what the error line must contain
    flags: dict[str, Value] = field(default_factory=dict)  # flags replaced, added (or removed: None)
    tail: tuple[str, ...] = ()  # raw arguments appended to the command
    damage: Callable[[Path], None] | None = None  # done to the dump's checkpoint step-2 first
    fault: Callable[[pytest.MonkeyPatch, Path], None] | None = None  # a fault of the machine (patch, dump)


def model_config(tmp: Path, **changes: object) -> str:
    """The small model's config with some keys changed (None: removed), as a file."""
    values = {k: v for k, v in {**SMALL_MODEL, **changes}.items() if v is not None}
    path = tmp / "model.json"
    path.write_text(json.dumps(values))
    return str(path)


def data_file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


def toml_file(tmp: Path, text: str) -> str:
    path = tmp / "job.toml"
    path.write_text(text)
    return str(path)


def read_only_disk(patch: pytest.MonkeyPatch, dump: Path) -> None:
    """The dump's disk refuses writes (tests run as root, for whom chmod changes nothing): os.access says so."""
    patch.setattr(os, "access", lambda path, mode, **kw: Path(path).resolve() != dump.resolve())


def full_disk(patch: pytest.MonkeyPatch, dump: Path) -> None:
    """300 KiB free where the dump is."""
    patch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 300 * 2**10, 300 * 2**10))


def full_disk_at_the_first_write(patch: pytest.MonkeyPatch, dump: Path) -> None:
    """Room by the numbers (a quota, say), but the first file the run writes in the dump gets ENOSPC."""
    write_text = Path.write_text

    def no_space(path: Path, *args, **kwargs):
        if path.name == "job_config.toml":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_text(path, *args, **kwargs)

    patch.setattr(Path, "write_text", no_space)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def sparse_tokenizer(tmp: Path, dump: Path) -> str:
    """The earlier run's tokenizer (4096 tokens) with the id of a common token moved to 5000: as many tokens
    as the small model's vocab_size, but an id beyond it (an IndexError at step 1 if not refused)."""
    tokenizer = Path(tomllib.loads((dump / "job_config.toml").read_text())["model"]["tokenizer_path"])
    folder = tmp / "sparse_tokenizer"
    shutil.copytree(tokenizer, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["vocab"]["Ġthe"] = 5000
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return str(folder)


CASES: dict[str, Bad] = {
    # --- flags ---
    "flag-unknown": Bad("unknown option --training.foo", {"training.foo": "1"}),
    "flag-misspelled": Bad("did you mean training.batch_size?", {"training.batchsize": "4"}),
    "flag-unknown-section": Bad("unknown option --trainer.steps", {"trainer.steps": "4"}),
    "flag-not-an-integer": Bad("--training.steps: 'ten' is not an integer (expected >= 1)", {"training.steps": "ten"}),
    "flag-not-a-number": Bad("--optimizer.lr: 'fast' is not a number (expected > 0, finite)", {"optimizer.lr": "fast"}),
    "flag-not-a-boolean": Bad("--training.compile: 'maybe' is not true or false", tail=("--training.compile=maybe",)),
    "flag-missing-value-at-end": Bad("--training.steps is missing its value", {"training.steps": None},
                                     tail=("--training.steps",)),
    "flag-missing-value-before-flag": Bad("--model.config is missing its value", {"model.config": None},
                                          tail=("--model.config", "--training.steps", "3")),
    "flag-stray-argument": Bad("unexpected argument 'extra'", tail=("extra",)),
    "flag-not-a-choice": Bad("--lr_scheduler.decay_type: 'cosinus' is not a valid choice (expected one of", {"lr_scheduler.decay_type": "cosinus"}),
    "flag-not-positive": Bad("--training.batch_size: 0 is too small (expected >= 1)", {"training.batch_size": "0"}),
    "flag-ratio-out-of-range": Bad("--lr_scheduler.lr_min: 2.0 is too large (expected in [0, 1])", {"lr_scheduler.lr_min": "2"}),
    "flag-keep-latest-1": Bad("--checkpoint.keep_latest_k: 1 is unsafe", {"checkpoint.keep_latest_k": "1"}),
    "flag-micro-batch-not-dividing": Bad("--training.micro_batch_size: 3 is not a divisor of --training.batch_size 2",
                                         {"training.micro_batch_size": "3"}),
    "flag-varlen-context-over-seq-len": Bad("--training.context_len: 2048 is more than --training.seq_len 32 with --training.varlen",
                                            {"training.varlen": "true"}),
    "flag-replicate-degree": Bad("--training.data_parallel_replicate_degree 2 must be >= 1 and divide the 1 processes",
                                 {"training.data_parallel_replicate_degree": "2"}),
    "flag-cpu-offload-one-process": Bad("--training.enable_cpu_offload needs FSDP2",
                                        {"training.enable_cpu_offload": "true"}),
    "toml-missing": Bad("no such file", {"job.config_file": lambda tmp, dump: str(tmp / "nope.toml")}),
    "toml-invalid": Bad("invalid TOML", {"job.config_file": lambda tmp, dump: toml_file(tmp, "[training\n")}),
    "toml-unknown-key": Bad("unknown option --training.batchsize (did you mean training.batch_size?)",
                            {"job.config_file": lambda tmp, dump: toml_file(tmp, "[training]\nbatchsize = 4\n")}),
    "toml-includes-another": Bad("job.toml: --job.config_file: 'base.toml' is not allowed in a job config (a job config "
                                 "cannot include another; remove the line)", {"job.config_file": lambda tmp, dump: toml_file(
                                     tmp, "[job]\nconfig_file = 'base.toml'\n")}),
    "toml-quoted-integer": Bad("job.toml: --training.steps: '5' is not an integer (expected >= 1)",
                               {"job.config_file": lambda tmp, dump: toml_file(tmp, '[training]\nsteps = "5"\n')}),
    "toml-quoted-boolean": Bad("job.toml: --training.compile: 'yes' is not true or false", {
        "job.config_file": lambda tmp, dump: toml_file(tmp, '[training]\ncompile = "yes"\n')}),
    "toml-unquoted-folder": Bad("job.toml: --job.dump_folder: 5 is not a quoted string (expected a folder path)",
                                {"job.config_file": lambda tmp, dump: toml_file(tmp, "[job]\ndump_folder = 5\n")}),
    # --- model configs (lmlab.models' validation, turned into one line) ---
    "config-no-flag": Bad("--model.config is required", {"model.config": None}),
    "config-missing-file": Bad("no such file", {"model.config": lambda tmp, dump: str(tmp / "nope.json")}),
    "config-invalid-json": Bad("invalid JSON", {"model.config": lambda tmp, dump: data_file(tmp, "m.json", b"{")}),
    "config-no-model-type": Bad("missing 'model_type'", {"model.config": lambda tmp, dump: model_config(
        tmp, model_type=None)}),
    "config-unknown-model-type": Bad("unknown model_type 'mamba9'", {"model.config": lambda tmp, dump: model_config(
        tmp, model_type="mamba9")}),
    "config-hub-id-offline": Bad("not reachable as a hub id", {"model.config": "someone/no-such-model"}),
    "config-attn-layer-out-of-range": Bad("attn['layers'] has layer 5, outside [0, 2)", {
        "model.config": lambda tmp, dump: model_config(tmp, attn={"layers": [5], "num_heads": 2})}),
    "config-attn-without-layers": Bad("attn needs the key 'layers'", {
        "model.config": lambda tmp, dump: model_config(tmp, attn={"num_heads": 2})}),
    "config-gla-head-dims": Bad("must be multiples of num_heads (3)", {
        "model.config": lambda tmp, dump: model_config(tmp, model_type="gla", num_heads=3, head_dim=None)}),
    "config-gdn-v-heads": Bad("num_v_heads (3) must be a multiple of num_heads (2)", {
        "model.config": lambda tmp, dump: model_config(tmp, num_v_heads=3)}),
    "config-transformer-head-dims": Bad(
        "must be divisible by the attention num_heads (3)",
        {"model.config": lambda tmp, dump: model_config(tmp, model_type="transformer", num_heads=3, head_dim=None,
                                                        expand_v=None, conv_size=None)}),  # keys a transformer lacks
    "config-json-not-an-object": Bad("the JSON is a list, expected an object", {
        "model.config": lambda tmp, dump: data_file(tmp, "m.json", b'[{"model_type": "gla"}]')}),
    "config-truncated-json": Bad("invalid JSON", {"model.config": lambda tmp, dump: data_file(
        tmp, "m.json", json.dumps(SMALL_MODEL).encode()[:70])}),
    "config-not-utf8": Bad("not a text file (JSON must be UTF-8)", {
        "model.config": lambda tmp, dump: data_file(tmp, "m.json", b'{"model_type": "\xff"}')}),
    "config-size-not-an-integer": Bad("model.json: hidden_size: 'big' is not an integer (expected >= 1)", {
        "model.config": lambda tmp, dump: model_config(tmp, hidden_size="big")}),
    "config-zero-heads": Bad("model.json: num_heads: 0 is too small (expected >= 1)", {
        "model.config": lambda tmp, dump: model_config(tmp, num_heads=0)}),
    "config-negative-layers": Bad("model.json: num_hidden_layers: -1 is too small (expected >= 1)", {
        "model.config": lambda tmp, dump: model_config(tmp, num_hidden_layers=-1)}),
    "config-zero-vocab": Bad("model.json: vocab_size: 0 is too small (expected >= 1)", {
        "model.config": lambda tmp, dump: model_config(tmp, vocab_size=0)}),
    "config-unknown-key": Bad("model.json: unknown key 'conv_sise' for model_type gated_deltanet (did you mean "
                              "conv_size?)", {"model.config": lambda tmp, dump: model_config(tmp, conv_sise=4)}),
    "config-token-id-beyond-vocab": Bad("model.json: bos_token_id: 99999 is not below vocab_size 4096 (expected none, "
                                        "an integer in [0, vocab_size) or a list of them)", {
        "model.config": lambda tmp, dump: model_config(tmp, bos_token_id=99999)}),
    "config-boolean-as-string": Bad("model.json: use_gate: 'false' is not true or false", {
        "model.config": lambda tmp, dump: model_config(tmp, use_gate="false")}),
    "config-custom-module-missing": Bad("--experimental.custom_model_path no_such_module: cannot import it",
                                        {"experimental.custom_model_path": "no_such_module"}),
    "backend-fla-on-cpu": Bad("backend 'fla' cannot run here (no CUDA device)", {"model.backend": "fla"}),
    # --- data ---
    "data-missing-path": Bad("no such file or folder", {"training.dataset": lambda tmp, dump: str(tmp / "no.jsonl")}),
    "data-empty-file": Bad("the data is empty", {"training.dataset": lambda tmp, dump: data_file(tmp, "e.jsonl", b"")}),
    "data-only-blank-documents": Bad("no non-empty documents in column 'text'", {
        "training.dataset": lambda tmp, dump: data_file(tmp, "b.jsonl", b'{"text": "  "}\n' * 3)}),
    "data-no-text-column": Bad("no 'text' or 'content' column; columns are: body", {
        "training.dataset": lambda tmp, dump: data_file(tmp, "n.jsonl", b'{"body": "hello"}\n')}),
    "data-named-column-missing": Bad("no column 'body' (--training.text_column)", {"training.text_column": "body"}),
    "data-binary-txt": Bad("looks like a binary file", {
        "training.dataset": lambda tmp, dump: data_file(tmp, "x.txt", b"abc\0\1\2" * 100)}),
    "data-binary-jsonl": Bad("cannot be read as json", {
        "training.dataset": lambda tmp, dump: data_file(tmp, "x.jsonl", bytes(range(256)) * 8)}),
    "data-unknown-format": Bad("unknown data format", {
        "training.dataset": lambda tmp, dump: data_file(tmp, "x.csv", b"text\nhello\n")}),
    "data-hub-id-offline": Bad("the Hugging Face Hub is offline", {"training.dataset": "someone/no-such-dataset"}),
    "data-probs-mismatch": Bad("--training.data_probs: '0.5,0.5' is 2 weights for 1 dataset", {"training.data_probs": "0.5,0.5"}),
    # --- tokenizer ---
    "tokenizer-missing-folder": Bad("no such folder", {"model.tokenizer_path": lambda tmp, dump: str(tmp / "tok")}),
    "tokenizer-folder-without-one": Bad("no tokenizer there", {"model.tokenizer_path": lambda tmp, dump: str(tmp)}),
    "tokenizer-larger-than-vocab": Bad("the tokenizer's token ids go up to 4095 (4096 tokens) but the model's vocab_size is 1000", {
        "model.config": lambda tmp, dump: model_config(tmp, vocab_size=1000)}),
    "tokenizer-sparse-id-beyond-vocab": Bad(
        "the tokenizer's token ids go up to 5000 (4096 tokens) but the model's vocab_size is 4096",
        {"model.tokenizer_path": sparse_tokenizer}),
    # --- checkpoints ---
    "checkpoint-missing-step": Bad("--checkpoint.load_step 7: no complete checkpoint step-7", {
        "checkpoint.load_step": "7"}),
    "checkpoint-corrupt-file": Bad("cannot load checkpoint", damage=lambda step: truncate(step / "__0_0.distcp")),
    "checkpoint-corrupt-metadata": Bad("corrupt or not DCP metadata", damage=lambda step: truncate(step / ".metadata")),
    "checkpoint-unknown-state-excluded": Bad("--checkpoint.exclude_from_loading: 'optimiser' is unknown", {
        "checkpoint.exclude_from_loading": "optimiser"}),
    "checkpoint-another-architecture": Bad("a checkpoint of another model architecture or config?", {
        "job.dump_folder": lambda tmp, dump: str(tmp / "fresh"),
        "model.config": "configs/tiny_gated_deltanet.json",
        "checkpoint.initial_load_path": lambda tmp, dump: str(dump / "checkpoint" / "step-2")}),
    "checkpoint-not-a-checkpoint": Bad("is not a DCP checkpoint (no .metadata file)", {
        "job.dump_folder": lambda tmp, dump: str(tmp / "fresh"),
        "checkpoint.initial_load_path": lambda tmp, dump: str(dump)}),
    # --- the dump folder (an empty path: the generated option cases) ---
    "dump-holds-another-run": Bad("holds a different run", {"model.config": "configs/tiny_gated_deltanet.json"}),
    "dump-is-a-file": Bad("is a file, not a folder", {"job.dump_folder": lambda tmp, dump: data_file(tmp, "f", b"x")}),
    "dump-below-a-file": Bad("cannot be created: ", {
        "job.dump_folder": lambda tmp, dump: data_file(tmp, "f", b"x") + "/run"}),
    "dump-read-only": Bad("is not writable: a read-only disk or folder", fault=read_only_disk),
    "dump-disk-full": Bad("the disk is full for this run: 0.3 MiB free there, a checkpoint and the HF export needs about", fault=full_disk),
    "dump-disk-full-at-first-write": Bad("failed (No space left on device; ", fault=full_disk_at_the_first_write),
}


def run_args(corpus: dict, dump: Path, **extra: str | None) -> list[str]:
    """The command of the earlier run (2 steps, a checkpoint at step 2)."""
    return small_args(corpus, dump, **{"training.steps": "2", **extra})


@pytest.fixture(scope="module")
def earlier_run(corpus, tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("earlier") / "dump"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        assert lmlab.train.main(run_args(corpus, dump)) == 0
    return dump


def snapshot(dump: Path) -> dict[str, bytes]:
    """Every file in the dump folder but train.sh's logs (each start adds its own) and the dump's lock file (each
    start records itself there: lmlab.dumplock)."""
    return {str(p.relative_to(dump)): p.read_bytes() for p in sorted(dump.rglob("*"))
            if p.is_file() and p.relative_to(dump).parts[0] != "logs" and p.name != ".lmlab.lock"}


def bad_command(case: Bad, corpus: dict, tmp_path: Path, earlier_run: Path) -> tuple[list[str], Path]:
    """A copy of the earlier run's dump (damaged if the case says so) and the bad command for it."""
    dump = tmp_path / "dump"
    shutil.copytree(earlier_run, dump)
    if case.damage is not None:
        case.damage(dump / "checkpoint" / "step-2")
    flags = {k: v(tmp_path, dump) if callable(v) else v for k, v in case.flags.items()}
    return [*run_args(corpus, dump, **flags), *case.tail], dump


def check_refusal(code: int, stderr: str, case: Bad) -> None:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and case.expected in last, last


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_fails_in_one_line_and_overwrites_nothing(case, corpus, tmp_path, earlier_run, monkeypatch,
                                                            capsys):
    argv, dump = bad_command(case, corpus, tmp_path, earlier_run)
    before = snapshot(dump)
    monkeypatch.chdir(REPO)
    if case.fault is not None:
        case.fault(monkeypatch, dump)
    code = lmlab.train.main(argv)
    check_refusal(code, capsys.readouterr().err, case)
    assert snapshot(dump) == before


@pytest.mark.parametrize("name", ["flag-misspelled", "flag-missing-value-at-end", "config-unknown-model-type",
                                  "data-missing-path", "dump-holds-another-run", "checkpoint-corrupt-metadata"])
def test_train_sh_turns_bad_input_into_one_line_and_exit_2(name, corpus, tmp_path, earlier_run):
    """Flags, configs, tokenizer, data and the dump's contents fail in the launcher before torchrun starts,
    creating nothing; what only the trainer can see (a checkpoint that does not load) fails there, and the
    launcher prints the trainer's line, once, without torchrun's report. Either way stderr is that one line."""
    argv, dump = bad_command(CASES[name], corpus, tmp_path, earlier_run)
    before = snapshot(dump)
    result = train_sh(argv)
    check_refusal(result.returncode, result.stderr, CASES[name])
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(dump) == before
    assert (dump / "logs").exists() == (name == "checkpoint-corrupt-metadata")  # torchrun started only there


def test_a_dump_folder_is_resumed_with_the_same_config_and_taken_over_only_with_overwrite(
        corpus, tmp_path, earlier_run, monkeypatch, capsys):
    dump = tmp_path / "dump"
    shutil.copytree(earlier_run, dump)
    monkeypatch.chdir(REPO)
    assert lmlab.train.main(run_args(corpus, dump, **{"training.steps": "3"})) == 0  # same model and data
    out = capsys.readouterr().out
    assert "resumed from step 2" in out
    # a longer run reshapes the LR schedule: said in one line
    assert "lmlab: resuming at step 2 with --training.steps 3 (was 2): the LR schedule is recomputed" in out
    assert [r["step"] for r in metrics_lines(dump)] == [1, 2, 3]

    other = {"training.seq_len": "64", "job.overwrite": "true"}  # another run: refused above, now started over
    assert lmlab.train.main(run_args(corpus, dump, **other)) == 0
    assert "starting from scratch" in capsys.readouterr().out
    records = metrics_lines(dump)
    assert [r["step"] for r in records] == [1, 2] and records[-1]["tokens_seen"] == 2 * 2 * 63  # the new run's

    # the recorded config never holds --job.overwrite: rerunning it (the command a stopped run prints) continues
    record = dump / "job_config.toml"
    assert "overwrite = false" in record.read_text()
    # records written before records left out --job.config_file named the TOML their run started from: one continues
    record.write_text(record.read_text().replace("[job]\n", '[job]\nconfig_file = "flame/models/fla.toml"\n', 1))
    assert lmlab.train.main(["--job.config_file", str(record), "--training.steps", "3"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert [r["step"] for r in metrics_lines(dump)] == [1, 2, 3]


# --- every option, every kind of bad value its valid values imply (generated from the catalogue) ---------
# Validation runs right after parsing, before anything is built or touched, so these call the trainer's main()
# in-process with nothing but the bad flag (the defaults are valid), milliseconds each. `train` is replaced by
# a failure: a value that slipped through validation fails its case instead of starting a run.

# Values that break a range set by another option: (other flags, value, problem).
RELATIONS = {
    "training.micro_batch_size": ([], "3", "not a divisor of --training.batch_size 8"),
    "training.context_len": (["--training.varlen", "--training.seq_len=32"], "64",
                             "more than --training.seq_len 32 with --training.varlen"),
}


def bad_values(opt: Option) -> list[tuple[list[str], str, str]]:
    """(other flags, CLI value, the problem the error line names) for each kind of bad value of `opt`."""
    d = opt.domain
    if isinstance(d, Number):
        kind = "not an integer" if d.integer else "not a number"
        cases = [([], "many", kind)]
        cases += [([], "1.5", kind)] if d.integer else [([], "nan", kind), ([], "inf", "not finite"),
                                                         ([], "-inf", "not finite")]
        if not d.none:
            cases.append(([], "none", kind))
        low = d.ge if d.ge is not None else d.gt
        if low is not None:  # just below the range (the bound itself if open), and below every other valid value
            for value in sorted({low if d.gt is not None else low - 1, min([low, *d.also]) - 1} - set(d.also)):
                cases.append(([], str(value), dict(d.refused).get(value, "too small")))
        if d.le is not None or d.lt is not None:
            cases.append(([], str(d.lt if d.lt is not None else d.le + 1), "too large"))
        if d.relation is not None:
            cases.append(RELATIONS[opt.name])
        return cases
    if isinstance(d, Flag):
        return [([], "maybe", "not true or false"), ([], "2", "not true or false")]
    if isinstance(d, Choice):
        return [([], "nope", "not a valid choice"), ([], d.values[0].upper() + "x", "not a valid choice")]
    if isinstance(d, Only):
        other = {bool: "true", int: "2"}.get(type(d.value), "something")
        return [([], other, "not supported")]
    if isinstance(d, Text):
        return [] if d.empty else [([], "", "empty"), ([], "  ", "empty")]
    if isinstance(d, SubFolder):
        return [([], "", "empty"), ([], "/tmp/elsewhere", "outside the dump folder"),
                ([], "../up", "outside the dump folder"), ([], "a/../..", "outside the dump folder"),
                ([], ".", "the dump folder itself")]
    if isinstance(d, PerSource):
        if d.own_list:
            return [(["--training.dataset=a,b,c"], "x,y", "2 entries for 3 datasets")]
        return [([], "x,y", "2 entries for 1 dataset"), (["--training.dataset=a,b"], "x,y,z", "3 entries for 2 datasets")]
    if isinstance(d, Probs):
        return [([], "x", "not a comma list of numbers"), ([], "0.5,", "not a comma list of numbers"),
                ([], "nan", "not finite"), ([], "1,inf", "not finite"), ([], "-1", "negative"), ([], "0", "all zeros"),
                ([], "0.5,0.5", "2 weights for 1 dataset"), (["--training.dataset=a,b"], "1", "1 weight for 2 datasets")]
    if isinstance(d, Subset):
        return [([], "optimiser", "unknown"), ([], "model,optimiser", "not a list of known names ('optimiser'")]
    if isinstance(d, EveryOrOp):
        return [([], value, "neither op nor an integer >= 1") for value in ("0", "-1", "x", "ops")]
    raise AssertionError(f"{opt.name}: no bad values for {type(d).__name__}; teach bad_values() this domain")


def toml_literal(value: str) -> str | None:
    """The CLI value as a TOML value of the same kind (numbers and nan/inf as numbers), None if TOML has none."""
    if value == "none":
        return None
    try:
        float(value)
        return value
    except ValueError:
        return json.dumps(value)


def generated_cases() -> list:
    cases = []
    for opt in catalogue().values():
        for flags, value, problem in bad_values(opt):
            cases.append(pytest.param(opt.name, flags, value, problem, False, id=f"{opt.name}={value}"))
            if isinstance(opt.domain, Number) and not flags and toml_literal(value) is not None:
                cases.append(pytest.param(opt.name, flags, value, problem, True, id=f"toml:{opt.name}={value}"))
    return cases


def must_not_start(cfg, stop):
    raise AssertionError("a bad value passed validation: the run started")


@pytest.mark.parametrize("name, flags, value, problem, in_toml", generated_cases())
def test_every_option_refuses_each_kind_of_bad_value_in_one_line(name, flags, value, problem, in_toml, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setattr(lmlab.train, "train", must_not_start)
    monkeypatch.delenv("LMLAB_EXIT_FILE", raising=False)
    if in_toml:
        section, key = name.split(".")
        toml = tmp_path / "job.toml"
        toml.write_text(f"[{section}]\n{key} = {toml_literal(value)}\n")
        argv, where = [*flags, "--job.config_file", str(toml)], f"{toml}: "
    else:
        argv, where = [*flags, f"--{name}={value}"], ""
    code = lmlab.train.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith(f"error: {where}--{name}: ") and f" is {problem}" in line, line
    assert line.endswith(f"(expected {catalogue()[name].domain.expected})"), line


# TOML values of another TOML type than the option's (type column of the option table), with the problem named
WRONG_TOML_TYPES = {
    "int": (['"1"', "1.0", "true"], "not an integer"),
    "float": (['"1"', "true"], "not a number"),
    "bool": (['"true"', "1"], "not true or false"),
    "str": (["1", "true", '["a"]'], "not a quoted string"),
    "list": (["1", "true", "[1]"], "not a list of strings"),
}


@pytest.mark.parametrize("name, literal, problem", [
    pytest.param(opt.name, literal, problem, id=f"{opt.name}={literal}")
    for opt in catalogue().values() for literal in WRONG_TOML_TYPES[type_name(opt)][0]
    for problem in [WRONG_TOML_TYPES[type_name(opt)][1]]])
def test_every_option_refuses_a_toml_value_of_another_type_in_one_line(name, literal, problem, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(lmlab.train, "train", must_not_start)
    monkeypatch.delenv("LMLAB_EXIT_FILE", raising=False)
    section, key = name.split(".")
    toml = tmp_path / "job.toml"
    toml.write_text(f"[{section}]\n{key} = {literal}\n")
    code = lmlab.train.main(["--job.config_file", str(toml)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith(f"error: {toml}: --{name}: ") and f" is {problem} (expected " in err, err


def test_the_generator_covers_every_option_that_can_be_wrong():
    covered = {param.values[0] for param in generated_cases()}
    anything_goes = {o.name for o in catalogue().values() if isinstance(o.domain, Text) and o.domain.empty}
    assert set(catalogue()) - covered == anything_goes
    assert anything_goes == {"job.description", "model.name", "training.text_column",
                             "checkpoint.initial_load_path"}


def test_the_defaults_the_paper_toml_and_command_are_valid(monkeypatch):
    monkeypatch.chdir(REPO)
    validate(JobConfig())
    parse_args(["--job.config_file", "flame/models/fla.toml"])
    parse_args(paper_command.TRAIN)


# --- model config keys, every kind of bad value (lmlab.modeling.MODEL_KEYS), parse only --------------------


def bad_model_values(domain) -> list[tuple[object, str]]:
    if isinstance(domain, Number):
        kind = "not an integer" if domain.integer else "not a number"
        cases = [("big", kind), (True, kind), ([4], kind)] + ([(1.5, kind)] if domain.integer else [])
        low = domain.ge if domain.ge is not None else domain.gt
        cases.append((low if domain.gt is not None else low - 1, "too small"))
        return cases + ([] if domain.none else [(None, "not set")])
    if isinstance(domain, Flag):
        return [("false", "not true or false"), (1, "not true or false")]
    if isinstance(domain, TokenIds):
        vocab_size = SMALL_MODEL["vocab_size"]
        return [(-1, "not a token id"), ("1", "not a token id"), ([1, "x"], "not a token id"), (True, "not a token id"),
                (vocab_size, f"not below vocab_size {vocab_size}"), ([2, 99999], f"not below vocab_size {vocab_size}")]
    raise AssertionError(f"no bad values for {type(domain).__name__}")


@pytest.mark.parametrize("key, value, problem", [
    pytest.param(key, value, problem, id=f"{key}={value!r}")
    for key, domain in MODEL_KEYS.items() for value, problem in bad_model_values(domain)])
def test_every_model_config_key_refuses_each_kind_of_bad_value_in_one_line(key, value, problem, tmp_path):
    # a family that knows the key (another's key is refused as unknown first): the small model's, else the first
    family = next(f for f in [SMALL_MODEL["model_type"], *lmlab_model_types()] if key in family_keys(f))
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"model_type": family, "vocab_size": SMALL_MODEL["vocab_size"], key: value}))
    with pytest.raises(UserError) as info:
        load_model_config(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--model.config {path}: {key}: ") and f" is {problem} (expected " in message, message


def test_hgrn2_may_leave_num_heads_to_expand_ratio(tmp_path):
    """fla's HGRN2 schema: num_heads null means hidden_size // expand_ratio (elsewhere null is refused)."""
    path = tmp_path / "hgrn2.json"
    path.write_text(json.dumps({"model_type": "hgrn2", "hidden_size": 64, "num_heads": None, "expand_ratio": 16}))
    assert load_model_config(str(path)).num_heads == 4
    path.write_text(json.dumps({**SMALL_MODEL, "num_heads": None}))
    with pytest.raises(UserError, match="num_heads: none is not set"):
        load_model_config(str(path))


def test_every_shipped_model_config_loads_and_so_does_its_export(tmp_path):
    """Every file in configs/ (the paper's hqlt files, verbatim, included) loads as --model.config, keys it
    does not use included; so does the config.json of lmlab's HF export of it (lmlab.checkpoint.write_hf)."""
    paths = sorted((REPO / "configs").glob("*.json"))
    assert len(paths) >= 53
    for path in paths:
        config = load_model_config(str(path))
        write_hf({}, config, None, tmp_path / path.stem, "bfloat16")
        load_model_config(str(tmp_path / path.stem / "config.json"))


def test_a_runs_hf_export_loads_as_model_config(earlier_run):
    config = load_model_config(str(earlier_run / "config.json"))
    assert all(getattr(config, key) == value for key, value in SMALL_MODEL.items())


@pytest.mark.parametrize("rename, add, message", [
    ({"chunk_size": "chunk_sise"}, {}, "unknown key 'chunk_sise' for model_type hybrid_qlt (did you mean chunk_size?)"),
    ({"num_heads": "num_head"}, {}, "unknown key 'num_head' for model_type hybrid_qlt (did you mean num_heads?)"),
    ({}, {"foo_bar": 1}, "unknown key 'foo_bar' for model_type hybrid_qlt"),
])
def test_a_key_its_family_does_not_know_is_refused_with_the_nearest(rename, add, message, tmp_path):
    """A typo would be stored unused, the model built with the default (chunk_size 64 here, not 1024)."""
    values = json.loads((REPO / "configs/sync_hqlt_ch1024_dynamic-vector-mixing_noconv_340M.json").read_text())
    values = {rename.get(key, key): value for key, value in values.items()} | add
    path = tmp_path / "model.json"
    path.write_text(json.dumps(values))
    with pytest.raises(UserError) as info:
        load_model_config(str(path))
    assert str(info.value) == f"--model.config {path}: {message}"


def test_known_keys_are_the_familys_transformers_and_the_seeds(tmp_path):
    """transformers' own keys (what save_pretrained writes, the older torch_dtype), the seed's spellings and
    transformers' Mamba config load; only a JSON file is checked this strictly: a model folder (as evaluation
    and `--model.config FOLDER` read) may hold keys of its own, and so may other model types."""
    values = {**SMALL_MODEL, "architectures": ["GatedDeltaNetForCausalLM"], "torch_dtype": "bfloat16",
              "transformers_version": "4.48.0", "_name_or_path": "x", "use_cache": True, "pad_token_id": 0}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(values))
    load_model_config(str(path))
    from transformers import MambaConfig

    MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128, state_size=8).save_pretrained(tmp_path / "mamba")
    assert load_model_config(str(tmp_path / "mamba" / "config.json")).norm_eps == 1e-5
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({**SMALL_MODEL, "foo_bar": 1}))
    assert load_model_config(str(tmp_path / "folder")).foo_bar == 1


def test_other_model_types_get_only_the_core_size_checks(tmp_path):
    """Keys of other families may mean other things (per-layer lists of heads): only the sizes every causal
    LM has are checked there; transformers' own types build as before."""
    check_model_keys({"num_kv_heads": [1, 2], "hidden_size": 64}, "x.json", "openelm")
    with pytest.raises(UserError, match=r"^--model.config x.json: hidden_size: 0 is too small"):
        check_model_keys({"hidden_size": 0}, "x.json", "openelm")
    path = tmp_path / "llama.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 100, "foo_bar": 1}))
    assert load_model_config(str(path)).num_attention_heads == 2


def test_the_vocabulary_check_counts_the_largest_id_not_the_tokens(corpus, tmp_path):
    tokenizer = load_tokenizer(ModelOptions(tokenizer_path=str(corpus["tokenizer"])))
    assert token_id_bound(tokenizer) == len(tokenizer) == 4096
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "job_config.toml").write_text(f"[model]\ntokenizer_path = '{corpus['tokenizer']}'\n")
    sparse = load_tokenizer(ModelOptions(tokenizer_path=sparse_tokenizer(tmp_path, dump)))
    assert len(sparse) == 4096 and token_id_bound(sparse) == 5001


# --- data files: every kind of broken file, read in both modes (lmlab.data) ---------------------------------
# Each fault is one line (a DataError) naming the file (the folder when no single file is at fault) and the
# problem, whether the file is converted at the start (map-style) or streamed; with the start's scan cut to one
# row, streamed rows are checked where the loader reads them, in the middle of a run.

GOOD_DOCS = [{"text": f"document {i} " * 8} for i in range(40)]


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def parquet(**columns: list) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


# name -> (files of the data folder, the file the line names (None: the folder), the problem it names)
DATA_FAULTS = {
    "not-utf8": ({"d.jsonl": jsonl(GOOD_DOCS) + '{"text": "café"}\n'.encode("latin-1")}, "d.jsonl", "not UTF-8"),
    "utf16": ({"d.jsonl": jsonl(GOOD_DOCS).decode().encode("utf-16")}, "d.jsonl", "JSON parse error"),
    "invalid-json-line": ({"d.jsonl": jsonl(GOOD_DOCS) + b"{oops\n"}, "d.jsonl", "JSON parse error"),
    "json-null-line": ({"d.jsonl": jsonl(GOOD_DOCS) + b"null\n"}, "d.jsonl", "no 'text' (null, the field missing"),
    "null-text": ({"d.jsonl": jsonl([*GOOD_DOCS, {"text": None}])}, "d.jsonl", "no 'text'"),
    "text-field-missing": ({"d.jsonl": jsonl([*GOOD_DOCS, {"body": "x"}])}, "d.jsonl", "no 'text'"),
    "number-text": ({"d.jsonl": jsonl([*GOOD_DOCS, {"text": 5}])}, "d.jsonl", "not text"),
    "list-text": ({"d.jsonl": jsonl([*GOOD_DOCS, {"text": ["a"]}])}, "d.jsonl", "not text"),
    "array-line": ({"d.jsonl": jsonl(GOOD_DOCS) + b"[1, 2]\n"}, "d.jsonl", "JSON parse error"),
    "int-parquet-column": ({"d.parquet": parquet(text=[1, 2, 3])}, "d.parquet", "holds Value('int64'), not text"),
    "truncated-gzip": ({"d.jsonl.gz": gzip.compress(jsonl(GOOD_DOCS * 20))[:300]}, "d.jsonl.gz",
                       "Compressed file ended"),
    "not-gzip": ({"d.jsonl.gz": jsonl(GOOD_DOCS)}, "d.jsonl.gz", "Not a gzipped file"),
    "corrupt-parquet": ({"d.parquet": b"PAR1" + b"\0" * 100 + b"PAR1"}, "d.parquet", "cannot be read as parquet"),
    "garbage-arrow": ({"d.arrow": b"garbage" * 100}, "d.arrow", "cannot be read as arrow"),
    "blank-file": ({"d.jsonl": b"\n  \n"}, "d.jsonl", "the data is empty"),
    "stray-metadata-json": ({"d.jsonl": jsonl(GOOD_DOCS), "meta.json": b'{"version": 1}'}, None,
                            "mixes .jsonl data with .json files (meta.json)"),
    "files-with-other-columns": ({"a.jsonl": jsonl(GOOD_DOCS), "b.jsonl": jsonl([{"body": 1}] * 3)}, None,
                                 "Couldn't cast"),
    "bad-file-among-good-ones": ({"a.jsonl": jsonl(GOOD_DOCS), "b.jsonl": b"{oops\n"}, "b.jsonl",
                                 "JSON parse error"),
}


def data_folder(tmp: Path, files: dict[str, bytes]) -> Path:
    folder = tmp / "data"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def read_batches(corpus: dict, dataset: Path, streaming: bool, batches: int = 40) -> None:
    """Open the data as training does and read `batches` batches of 2 x 32 tokens."""
    from lmlab.config import Training
    from lmlab.data import build_dataloader

    tokenizer = load_tokenizer(ModelOptions(tokenizer_path=str(corpus["tokenizer"])))
    training = Training(dataset=str(dataset), streaming=streaming, batch_size=2, seq_len=32, num_workers=0)
    loader = iter(build_dataloader(training, tokenizer, rank=0, world_size=1))
    for _ in range(batches):
        next(loader)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize("name", list(DATA_FAULTS))
def test_every_kind_of_broken_data_file_is_one_line_naming_the_file(name, streaming, corpus, tmp_path, monkeypatch):
    from lmlab.data import DataError

    files, culprit, problem = DATA_FAULTS[name]
    folder = data_folder(tmp_path, files)
    monkeypatch.setattr("lmlab.data.CHECK_ROWS", 1)  # streamed rows are checked as the loader reads them
    dataset = folder / next(iter(files)) if len(files) == 1 else folder
    with pytest.raises(DataError) as info:
        read_batches(corpus, dataset, streaming)
    message = str(info.value)
    assert "\n" not in message and problem in message, message
    assert message.startswith(str(folder / culprit if culprit else folder) + ":"), message


def test_metadata_files_beside_the_data_are_not_data_and_do_not_make_a_save_to_disk_folder(corpus, tmp_path):
    """A folder downloaded with `datasets`' metadata (dataset_info.json, state.json) but not a save_to_disk
    folder: its jsonl is read, the metadata is not."""
    folder = data_folder(tmp_path, {"d.jsonl": jsonl(GOOD_DOCS), "dataset_info.json": b"{}", "state.json": b"{"})
    read_batches(corpus, folder, streaming=False, batches=2)


# --- every other command: broken model folders, malformed results and metrics, impossible arguments -------
# Each case runs the command's main() in this process: exit code 2, one line on stderr (`error: ...`) naming
# the problem, no traceback, and nothing written.

def export_copy(tmp: Path, earlier_run: Path) -> Path:
    """A copy of the earlier run's HF export (config.json, model.safetensors, tokenizer files) alone."""
    folder = tmp / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(earlier_run / name, folder / name)
    return folder


def cut_tail(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def folder_to_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("x")


# name -> (damage to the model folder, the problem the line names)
MODEL_FAULTS = {
    "missing-folder": (shutil.rmtree, "no such folder"),
    "a-file": (folder_to_file, "not a folder"),
    "no-config": (lambda f: (f / "config.json").unlink(), "no config.json, so not a Hugging Face model folder"),
    "config-not-json": (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON"),
    "config-without-model-type": (lambda f: (f / "config.json").write_text("[]"), "config.json has no model_type"),
    "no-weights": (lambda f: (f / "model.safetensors").unlink(), "no weights (model.safetensors or"),
    "corrupt-weights": (lambda f: truncate(f / "model.safetensors"), "model.safetensors is corrupt or truncated"),
    "truncated-weights": (lambda f: cut_tail(f / "model.safetensors"), "model.safetensors is corrupt or truncated"),
    "no-tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                     "no tokenizer files"),
}
# the commands that read a model folder: (module, argv for the folder, label of the folder, needs a tokenizer)
MODEL_COMMANDS = {
    "evals.harness": ("lmlab.eval.harness", lambda f, tmp: ["--model", "hf", "--model_args", f"pretrained={f}",
                                                          "--tasks", "piqa", "--device", "cpu"],
                      "--model_args pretrained={}", True),
    "launch_hf.py": ("lmlab.eval.fda", lambda f, tmp: ["-m", str(f), "-t", "based_fda", "--output_dir", str(tmp / "o")],
                     "-m {}", True),
    "convert hf-to-dcp": ("lmlab.convert", lambda f, tmp: ["hf-to-dcp", "--model", str(f), "--checkpoint",
                                                           str(tmp / "dcp")], "--model {}", False),
}


def run_main(module: str, argv: list[str], capsys) -> tuple[int, str]:
    import importlib

    code = importlib.import_module(module).main(argv)
    return code, capsys.readouterr().err


def check_one_line(code: int, err: str, expected: str) -> None:
    assert code == 2 and "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err[-3000:]


@pytest.mark.parametrize("fault", list(MODEL_FAULTS))
@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_every_command_reading_a_model_folder_refuses_a_broken_one_in_one_line(command, fault, tmp_path, earlier_run,
                                                                              capsys):
    module, argv, label, needs_tokenizer = MODEL_COMMANDS[command]
    damage, problem = MODEL_FAULTS[fault]
    folder = export_copy(tmp_path, earlier_run)
    damage(folder)
    code, err = run_main(module, argv(folder, tmp_path), capsys)
    if fault == "no-tokenizer" and not needs_tokenizer:
        assert code == 0, err[-3000:]
        return
    check_one_line(code, err, f"error: {label.format(folder)}: {problem}")
    assert not (tmp_path / "dcp").exists() and not (tmp_path / "o").exists()


# name -> (the file's bytes, the problem the line names)
RESULT_FAULTS = {
    "not-json": (b'{"results": {', "not a JSON file"),
    "not-utf8": (b"\xff\xfe{}", "not a JSON file"),
    "a-list": (b"[1, 2]", "not an lm-eval results file"),
    "results-not-an-object": (b'{"results": [1]}', "not an lm-eval results file"),
    "task-not-an-object": (b'{"results": {"piqa": 0.5}}', "not an lm-eval results file"),
    "config-not-an-object": (b'{"results": {}, "config": "x"}', "not an lm-eval results file"),
    "metric-a-string": (b'{"results": {"piqa": {"acc,none": "high"}}}', "piqa acc,none is 'high', not a number"),
    "metric-n/a": (b'{"results": {"piqa": {"acc,none": "N/A"}}}', "piqa acc,none is 'N/A', not a number"),
    "stderr-a-string": (b'{"results": {"piqa": {"acc_stderr,none": "low"}}}', "piqa acc_stderr,none is 'low', not a"),
    "date-not-a-time": (b'{"results": {}, "date": "today"}', "date 'today' is not a timestamp"),
}


@pytest.mark.parametrize("fault", list(RESULT_FAULTS))
def test_report_refuses_each_kind_of_malformed_results_file_naming_it(fault, tmp_path, capsys):
    content, problem = RESULT_FAULTS[fault]
    good = tmp_path / "results_good.json"
    good.write_text(json.dumps({"results": {"piqa": {"acc,none": 0.5}}, "config": {"model_args": "pretrained=m"}}))
    bad = tmp_path / "results_bad.json"
    bad.write_bytes(content)
    code, err = run_main("lmlab.eval.report", [str(tmp_path), "--csv", str(tmp_path / "t.csv")], capsys)
    check_one_line(code, err, f"error: {bad}: {problem}")
    assert not (tmp_path / "t.csv").exists()


# name -> (metrics.jsonl's bytes or None for no file, the problem the line names)
METRICS_FAULTS = {
    "no-metrics-file": (None, "no metrics.jsonl, so not an lmlab dump folder"),
    "no-records": (b"\n", "metrics.jsonl: no records yet"),
    "garbage-line": (b'{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "lo', "metrics.jsonl:2: not a JSON record"),
    "not-utf8": (b"\xff\n", "metrics.jsonl:1: not a JSON record"),
    "record-without-step": (b'{"loss": 2.0}\n', "metrics.jsonl:1: not a record of a step"),
    "record-not-an-object": (b"[1]\n", "metrics.jsonl:1: not a record of a step"),
    "record-without-loss": (b'{"step": 3, "lr": 0.1}\n', "the record of step 3 has no numeric loss and lr"),
}


@pytest.mark.parametrize("fault", list(METRICS_FAULTS))
def test_plot_refuses_each_kind_of_broken_metrics_naming_the_file_and_line(fault, tmp_path, capsys):
    content, problem = METRICS_FAULTS[fault]
    dump = tmp_path / "dump"
    dump.mkdir()
    if content is not None:
        (dump / "metrics.jsonl").write_bytes(content)
    code, err = run_main("lmlab.plot", [str(dump), "-o", str(tmp_path / "p.png")], capsys)
    check_one_line(code, err, problem)
    assert str(dump) in err and not (tmp_path / "p.png").exists()


def results_folder_taken(tmp: Path, model: Path) -> str:
    """An --output_path whose subfolder for the model (lm-eval's sanitized name) is a file."""
    from lm_eval.utils import sanitize_model_name

    (tmp / "out").mkdir()
    (tmp / "out" / sanitize_model_name(str(model))).write_text("x")
    return str(tmp / "out")


def sparse_model_tokenizer(tmp: Path, model: Path) -> str:
    """The model's tokenizer with a common token's id moved beyond its vocab_size (an IndexError mid-evaluation)."""
    folder = tmp / "sparse_tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, folder / name)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["vocab"]["Ġthe"] = json.loads((model / "config.json").read_text())["vocab_size"] + 10
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return str(folder)


def dcp_step(tmp: Path) -> str:
    """A training checkpoint's folder (DCP .metadata and the model's config.json), not an HF model."""
    step = tmp / "dump" / "checkpoint" / "step-20"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    (step / "config.json").write_text('{"model_type": "gated_deltanet"}')
    return str(step)


def test_plot_prints_the_path_it_writes(tmp_path, capsys):
    """`-o p2`: matplotlib writes p2.png, and that is the path printed."""
    import lmlab.plot

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "loss": 1.5, "lr": 0.1}\n')
    assert lmlab.plot.main([str(tmp_path), "-o", str(tmp_path / "p2")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "p2.png") and (tmp_path / "p2.png").is_file()


# impossible arguments: (module, argv given tmp_path and a model folder, the problem the line names)
ARGUMENT_FAULTS = {
    "harness-limit-0": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model_args", f"pretrained={m}",
                                                             "--limit", "0"], "--limit 0: expected a count >= 1"),
    "harness-limit-negative": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--limit", "-1"],
                               "--limit -1: expected"),
    "harness-batch-size-0": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--batch_size", "0"],
                             "--batch_size 0: expected an integer >= 1, 'auto' or 'auto:N'"),
    "harness-no-task": ("lmlab.eval.harness", lambda tmp, m: ["--model_args", f"pretrained={m}"], "--tasks: no task"),
    "harness-state-memory-0": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model_args",
                                                                    f"pretrained={m},state_memory_gib=0"],
                               "state_memory_gib must be a positive number"),
    "harness-token-budget-0": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model_args",
                                                                    f"pretrained={m},token_budget=0"],
                               "token_budget must be a positive integer"),
    "harness-data-dir-missing": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--data_dir", str(tmp / "no")],
                                 "--data_dir"),
    "harness-unknown-flag": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--shots", "3"],
                             "lm-eval: unrecognized arguments: --shots 3"),
    "harness-hub-id-offline": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model_args",
                                                                    "pretrained=someone/no-such-model"],
                               "no such folder, and the Hugging Face Hub cannot be reached"),
    "harness-limit-inf": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--limit", "inf"],
                          "--limit inf: expected a count >= 1 or a fraction in (0, 1)"),
    "harness-limit-1e30": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--limit", "1e30"],
                           "--limit 1e+30: more documents than any task has"),
    "harness-limit-not-whole": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--limit", "1.5"],
                                "--limit 1.5: expected a count >= 1"),
    "harness-num-fewshot-negative": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--num_fewshot", "-1"],
                                     "--num_fewshot -1: expected a count >= 0"),
    "harness-empty-tasks": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "", "--model_args", f"pretrained={m}"],
                            "--tasks: no task named"),
    "harness-stray-comma": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa,", "--model_args", f"pretrained={m}"],
                            "--tasks piqa,: an empty task name"),
    "harness-device-unknown": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model_args",
                                                                    f"pretrained={m}", "--device", "gpu"],
                               "--device gpu: not a device of this machine (expected one of cpu"),
    "harness-unknown-model": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model", "hff", "--model_args",
                                                                   f"pretrained={m}"], "--model hff: no such model type"),
    "harness-no-pretrained": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model_args", "dtype=float32"],
                              "--model_args: no pretrained=MODEL"),
    "harness-unknown-dtype": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model_args",
                                                                   f"pretrained={m},dtype=float33"],
                              "--model_args dtype=float33: not a torch dtype"),
    "harness-stock-missing-folder": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model", "hf-stock",
                                                                          "--model_args", f"pretrained={tmp}/no"],
                                     "pretrained=<tmp>/no: no such folder"),
    "harness-tokenizer-beyond-vocab": ("lmlab.eval.harness", lambda tmp, m: [
        "--tasks", "piqa", "--model_args", f"pretrained={m},tokenizer={sparse_model_tokenizer(tmp, m)}"],
        "the tokenizer's token ids go up to 4106 (4096 tokens) but the model's vocab_size is 4096 (--model_args "
        "pretrained=<tmp>/model); --model_args tokenizer=<tmp>/sparse_tokenizer is not the model's"),
    "harness-dcp-checkpoint": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model_args",
                                                                    f"pretrained={dcp_step(tmp)}"],
                               "a DCP training checkpoint, not a Hugging Face model folder; `lmlab convert dcp-to-hf "
                               "--path <tmp>/dump --step 20 --output DIR`"),
    "harness-output-path-a-file": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--model_args",
                                                                        f"pretrained={m}", "--output_path",
                                                                        data_file(tmp, "f", b"")],
                                   "--output_path <tmp>/f: <tmp>/f is a file"),
    "harness-output-path-below-a-file": ("lmlab.eval.harness", lambda tmp, m: [
        "--tasks", "piqa", "--model_args", f"pretrained={m}", "--output_path", data_file(tmp, "f", b"") + "/r.json"],
        "<tmp>/f is a file, and the results go into the folder <tmp>/f"),
    "harness-output-path-model-folder-a-file": ("lmlab.eval.harness", lambda tmp, m: [
        "--tasks", "piqa", "--model_args", f"pretrained={m}", "--output_path", results_folder_taken(tmp, m)],
        "is a file, and the results go into the folder <tmp>/out/"),
    "harness-data-dir-a-file": ("lmlab.eval.harness", lambda tmp, m: ["--tasks", "piqa", "--data_dir",
                                                                     data_file(tmp, "f", b"")], "f: not a folder"),
    "harness-based-fda-empty-window": ("lmlab.eval.harness", lambda tmp, m: [
        "--tasks", "based_fda", "--model_args", f"pretrained={m}", "--metadata",
        '{"context_length": 10, "answer_length": 50}'],
        "--metadata context_length 10 leaves no room for the document's text: it must be more than --metadata "
        "answer_length 50"),
    "harness-based-fda-window-not-a-number": ("lmlab.eval.harness", lambda tmp, m: [
        "--tasks", "based_fda", "--model_args", f"pretrained={m}", "--metadata",
        '{"context_length": "abc", "answer_length": 50}'], "--metadata context_length 'abc': expected an integer"),
    "fda-context-shorter-than-answer": ("lmlab.eval.fda", lambda tmp, m: ["-m", str(m), "--context_length", "40",
                                                                         "--answer_length", "50"],
                                        "--context_length 40 leaves no room for the document's text"),
    "fda-answer-0": ("lmlab.eval.fda", lambda tmp, m: ["-m", str(m), "--answer_length", "0"], "--answer_length 0"),
    "fda-limit-0": ("lmlab.eval.fda", lambda tmp, m: ["-m", str(m), "--limit", "0"], "--limit 0: expected -1"),
    "fda-batch-size-0": ("lmlab.eval.fda", lambda tmp, m: ["-m", str(m), "--batch-size", "0"], "--batch-size 0"),
    "fda-unknown-task": ("lmlab.eval.fda", lambda tmp, m: ["-m", str(m), "-t", "fda"], "invalid choice: 'fda'"),
    "fda-no-model": ("lmlab.eval.fda", lambda tmp, m: ["-t", "based_fda"], "required: -m/--model"),
    "fda-output-dir-a-file": ("lmlab.eval.fda", lambda tmp, m: ["-m", str(m), "--output_dir", data_file(tmp, "f", b"")],
                              "--output_dir <tmp>/f: <tmp>/f is a file"),
    "fda-model-folder-a-file": ("lmlab.eval.fda", lambda tmp, m: ["-m", str(m), "--output_dir",
                                                                 results_folder_taken(tmp, m)],
                                "is a file, and the results go into the folder <tmp>/out/"),
    "fda-device-unknown": ("lmlab.eval.fda", lambda tmp, m: ["-m", str(m), "--device", "gpu"],
                           "--device gpu: not a device of this machine"),
    "fda-unknown-dtype": ("lmlab.eval.fda", lambda tmp, m: ["-m", str(m), "--dtype", "float33"],
                          "--dtype float33: not a torch dtype"),
    "fda-hub-id-offline": ("lmlab.eval.fda", lambda tmp, m: ["-m", "fla-hub/gla-340M-15B"],
                           "-m fla-hub/gla-340M-15B: no such folder, and the Hugging Face Hub cannot be reached"),
    "report-missing-path": ("lmlab.eval.report", lambda tmp, m: [str(tmp / "no")], "no such file or folder"),
    "report-no-results": ("lmlab.eval.report", lambda tmp, m: [str(m)], "no results*.json in"),
    "report-csv-nowhere": ("lmlab.eval.report", lambda tmp, m: [str(m), "--csv", str(tmp / "no" / "t.csv")],
                           "--csv"),
    "plot-a-model-folder": ("lmlab.plot", lambda tmp, m: [str(m)], "no metrics.jsonl, so not an lmlab dump folder"),
    "plot-missing-folder": ("lmlab.plot", lambda tmp, m: [str(tmp / "no")], "no such folder"),
    "plot-output-nowhere": ("lmlab.plot", lambda tmp, m: [str(m), "-o", str(tmp / "no" / "p.png")], "no folder"),
    "plot-unknown-format": ("lmlab.plot", lambda tmp, m: [str(m), "-o", str(tmp / "p.xyz")],
                            "-o <tmp>/p.xyz: matplotlib cannot write .xyz files (expected one of"),
    "convert-path-missing": ("lmlab.convert", lambda tmp, m: ["dcp-to-hf", "--path", str(tmp / "no")],
                             "no such folder"),
    "convert-empty-dump": ("lmlab.convert", lambda tmp, m: ["dcp-to-hf", "--path", str(m)], "no complete checkpoint"),
    "convert-existing-checkpoint": ("lmlab.convert", lambda tmp, m: ["hf-to-dcp", "--model", str(m), "--checkpoint",
                                                                     str(m)], "already exists"),
    "convert-step-not-a-number": ("lmlab.convert", lambda tmp, m: ["dcp-to-hf", "--path", str(m), "--step", "x"],
                                  "argument --step: invalid int value: 'x'"),
    "convert-no-subcommand": ("lmlab.convert", lambda tmp, m: [], "the following arguments are required: command"),
    "lmlab-unknown-subcommand": ("lmlab.cli", lambda tmp, m: ["evaluate"], "unknown subcommand 'evaluate'"),
}


@pytest.mark.parametrize("name", list(ARGUMENT_FAULTS))
def test_every_command_refuses_impossible_arguments_in_one_line(name, tmp_path, earlier_run, capsys):
    module, argv, problem = ARGUMENT_FAULTS[name]
    model = export_copy(tmp_path, earlier_run)
    args = argv(tmp_path, model)
    before = sorted(tmp_path.rglob("*"))
    code, err = run_main(module, args, capsys)
    check_one_line(code, err, problem.replace("<tmp>", str(tmp_path)))
    assert sorted(tmp_path.rglob("*")) == before


def test_convert_without_output_never_replaces_the_runs_export(tmp_path, earlier_run, capsys):
    """`dcp-to-hf --path DUMP --step N` on a finished run: refused in one line, the export unchanged; with
    --output the step is written there; a dump without an export (a stopped run) gets one by default."""
    dump = tmp_path / "dump"
    shutil.copytree(earlier_run, dump)
    before = snapshot(dump)
    code, err = run_main("lmlab.convert", ["dcp-to-hf", "--path", str(dump), "--step", "2"], capsys)
    check_one_line(code, err, f"--path {dump} already holds the run's HF export (model.safetensors); pass --output")
    assert snapshot(dump) == before
    assert run_main("lmlab.convert", ["dcp-to-hf", "--path", str(dump), "--output", str(tmp_path / "hf")], capsys)[0] == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and snapshot(dump) == before
    (dump / "model.safetensors").unlink()
    assert run_main("lmlab.convert", ["dcp-to-hf", "--path", str(dump)], capsys)[0] == 0
    assert (dump / "model.safetensors").is_file()


@pytest.mark.slow  # lm-eval indexes its thousands of task definitions first (about 20 s on 2 busy cores)
def test_harness_names_an_unknown_task_in_one_line(tmp_path, earlier_run, capsys):
    model = export_copy(tmp_path, earlier_run)
    code, err = run_main("lmlab.eval.harness", ["--tasks", "piqa_typo", "--model_args", f"pretrained={model}"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: lm-eval: Tasks not found: piqa_typo"


# --- one error path for every command (lmlab.errors.run_command) -------------------------------------------
# (command as the user types it, module, arguments that reach `hook`, a function the command calls)
ENTRY_POINTS = [
    ("train.sh", "lmlab.launch", [], "lmlab.launch.parse_args"),
    ("train.sh", "lmlab.train", [], "lmlab.train.parse_args"),
    ("python -m evals.harness", "lmlab.eval.harness", ["--tasks", "piqa"], "lmlab.eval.harness.run"),
    ("launch_hf.py", "lmlab.eval.fda", ["-m", "x"], "lmlab.eval.fda.parse_args"),
    ("lmlab report", "lmlab.eval.report", ["x"], "lmlab.eval.report.result_files"),
    ("lmlab plot", "lmlab.plot", ["x"], "lmlab.plot.read_metrics"),
    ("lmlab convert", "lmlab.convert", ["dcp-to-hf", "--path", "x"], "lmlab.convert.dcp_to_hf"),
    ("python -m lmlab.quickstart", "lmlab.quickstart", ["--out", "OUT"], "lmlab.quickstart.write_corpus"),
    ("lmlab bench-data", "lmlab.bench_data", ["--dir", "OUT"], "lmlab.bench_data.corpus_documents"),
    ("lmlab", "lmlab.cli", ["plot", "x"], "lmlab.plot.main"),
]


def boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("command, module, argv, hook", ENTRY_POINTS, ids=[e[1] for e in ENTRY_POINTS])
def test_every_command_reports_a_bug_in_one_line_with_a_saved_traceback(command, module, argv, hook, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.setattr(hook, boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exit_file = tmp_path / "exit.json"
    monkeypatch.setenv("LMLAB_EXIT_FILE", str(exit_file))  # the trainer tells its launcher
    code, err = run_main(module, [str(tmp_path) if a == "OUT" else a for a in argv], capsys)
    assert code == 1 and "Traceback" not in err, err
    if module == "lmlab.train":  # under train.sh the launcher prints the trainer's line, once
        assert err.strip() == ""
        err = json.loads(exit_file.read_text())["message"]
    (line,) = err.strip().splitlines()
    match = re.fullmatch(rf"error: {re.escape(command)} failed unexpectedly \(RuntimeError: boom\); this is a bug in "
                         r"lmlab: the traceback is in (\S+)", line)
    assert match, line
    saved = Path(match[1]).read_text()
    assert saved.startswith(f"{command}: ") and "Traceback (most recent call last)" in saved and "in boom" in saved
    if module == "lmlab.train":
        assert json.loads(exit_file.read_text()) == {"message": line, "exit_code": 1}


@pytest.mark.parametrize("command, module, argv, hook", ENTRY_POINTS, ids=[e[1] for e in ENTRY_POINTS])
def test_every_command_refuses_an_unknown_flag_in_one_line(command, module, argv, hook, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.delenv("LMLAB_EXIT_FILE", raising=False)
    code, err = run_main(module, [*(str(tmp_path) if a == "OUT" else a for a in argv), "--no-such-flag"], capsys)
    assert code == 2 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "--no-such-flag" in line, line


@pytest.mark.parametrize("exitcode, how", [(-9, "was killed by SIGKILL"), (-11, "was killed by SIGSEGV"),
                                           (3, "exited with 3")])
def test_a_trainer_dying_without_a_word_is_one_line_from_torchrun(exitcode, how, tmp_path, monkeypatch, capsys):
    """No error line from the trainer (killed, a native crash): torchrun's wrapper names the rank and how it
    ended in one line instead of torchrun's traceback and report."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    import lmlab.launch
    from lmlab import dumplock

    def trainer_dies():
        failure = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file=str(tmp_path / "none.json"))
        raise ChildFailedError("lmlab.train", {1: failure})

    monkeypatch.setattr(torch.distributed.run, "main", trainer_dies)
    monkeypatch.setenv("LMLAB_EXIT_FILE", str(tmp_path / "exit.json"))  # not written: the trainer said nothing
    # torchrun() names itself the trainers' parent in the environment: restored after the test, or a later
    # in-process trainer would take pytest's parent for torchrun and end the run (dumplock.die_with_parent)
    monkeypatch.setenv(dumplock.AGENT_PID_ENV, "")
    assert lmlab.launch.torchrun() == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: trainer rank 1 {how} without an error line"), line


@pytest.mark.parametrize("damage, problem", [
    (lambda f: truncate(f / "model.safetensors"), "model.safetensors: corrupt or truncated safetensors"),
    (lambda f: (f / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"st'), "metrics.jsonl:2: not a JSON record"),
], ids=["corrupt-weights", "truncated-metrics"])
def test_report_names_a_broken_file_of_the_model_folder_it_reads(damage, problem, tmp_path, earlier_run, capsys):
    """`lmlab report` counts the parameters (safetensors) and tokens (metrics.jsonl) of a results file's model
    folder: a broken one is a line naming the file."""
    model = export_copy(tmp_path, earlier_run)
    damage(model)
    results = tmp_path / "results_1.json"
    results.write_text(json.dumps({"results": {"piqa": {"acc,none": 0.5}}, "config": {"model_args": f"pretrained={model}"}}))
    code, err = run_main("lmlab.eval.report", [str(results)], capsys)
    check_one_line(code, err, f"{model}/{problem}")
