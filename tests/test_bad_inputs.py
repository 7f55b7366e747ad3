"""The catalogue of bad inputs. Each one ends the run with exit code 2 and one line (the last on stderr,
"error: ...") naming the problem, no traceback, and leaves the dump folder, which holds an earlier run
(checkpoint, HF export, metrics, config), exactly as it was.

Most cases run `lmlab.train.main` in this process; a few run `bash train.sh` to show that the launcher (and
torchrun) keep the contract. Evaluation inputs are covered by the eval tests.
"""
from __future__ import annotations

import json
import shutil
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
    parse_args, validate,
)
from lmlab.config import Model as ModelOptions
from lmlab.errors import UserError
from lmlab.modeling import MODEL_KEYS, TokenIds, check_model_keys, load_model_config, load_tokenizer, token_id_bound
from tiny_run import SMALL_MODEL, metrics_lines, small_args, train_sh

Value = str | None | Callable[[Path, Path], str]  # a callable gets (tmp_path, dump) and returns the value


@dataclass
class Bad:
    expected: str  # what the error line must contain
    flags: dict[str, Value] = field(default_factory=dict)  # flags replaced, added (or removed: None)
    tail: tuple[str, ...] = ()  # raw arguments appended to the command
    damage: Callable[[Path], None] | None = None  # done to the dump's checkpoint step-2 first


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
    "flag-unsupported-wandb": Bad("--metrics.enable_wandb: true is not supported", {"metrics.enable_wandb": "true"}),
    "toml-missing": Bad("no such file", {"job.config_file": lambda tmp, dump: str(tmp / "nope.toml")}),
    "toml-invalid": Bad("invalid TOML", {"job.config_file": lambda tmp, dump: toml_file(tmp, "[training\n")}),
    "toml-unknown-key": Bad("unknown option --training.batchsize (did you mean training.batch_size?)",
                            {"job.config_file": lambda tmp, dump: toml_file(tmp, "[training]\nbatchsize = 4\n")}),
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
        {"model.config": lambda tmp, dump: model_config(tmp, model_type="transformer", num_heads=3)}),
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
    # --- the dump folder ---
    "dump-holds-another-run": Bad("holds a different run", {"model.config": "configs/tiny_gated_deltanet.json"}),
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
    code = lmlab.train.main(argv)
    check_refusal(code, capsys.readouterr().err, case)
    assert snapshot(dump) == before


@pytest.mark.parametrize("name", ["flag-misspelled", "flag-missing-value-at-end", "config-unknown-model-type",
                                  "data-missing-path"])
def test_train_sh_turns_bad_input_into_one_line_and_exit_2(name, corpus, tmp_path, earlier_run):
    """Flags fail in the launcher before torchrun starts; the others in the trainer, whose line the launcher
    repeats last, after torchrun's report."""
    argv, dump = bad_command(CASES[name], corpus, tmp_path, earlier_run)
    before = snapshot(dump)
    result = train_sh(argv)
    check_refusal(result.returncode, result.stderr, CASES[name])
    assert snapshot(dump) == before


def test_a_dump_folder_is_resumed_with_the_same_config_and_taken_over_only_with_overwrite(
        corpus, tmp_path, earlier_run, monkeypatch, capsys):
    dump = tmp_path / "dump"
    shutil.copytree(earlier_run, dump)
    monkeypatch.chdir(REPO)
    assert lmlab.train.main(run_args(corpus, dump, **{"training.steps": "3"})) == 0  # same model and data
    assert "resumed from step 2" in capsys.readouterr().out
    assert [r["step"] for r in metrics_lines(dump)] == [1, 2, 3]

    other = {"training.seq_len": "64", "job.overwrite": "true"}  # another run: refused above, now started over
    assert lmlab.train.main(run_args(corpus, dump, **other)) == 0
    assert "starting from scratch" in capsys.readouterr().out
    records = metrics_lines(dump)
    assert [r["step"] for r in records] == [1, 2] and records[-1]["tokens_seen"] == 2 * 2 * 63  # the new run's


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
        return [(-1, "not a token id"), ("1", "not a token id"), ([1, "x"], "not a token id"), (True, "not a token id")]
    raise AssertionError(f"no bad values for {type(domain).__name__}")


@pytest.mark.parametrize("key, value, problem", [
    pytest.param(key, value, problem, id=f"{key}={value!r}")
    for key, domain in MODEL_KEYS.items() for value, problem in bad_model_values(domain)])
def test_every_model_config_key_refuses_each_kind_of_bad_value_in_one_line(key, value, problem, tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**SMALL_MODEL, key: value}))
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


def test_every_shipped_model_config_passes_the_key_checks():
    for path in sorted((REPO / "configs").glob("*.json")):
        values = json.loads(path.read_text())
        check_model_keys(values, str(path), values["model_type"])


def test_other_model_types_get_only_the_core_size_checks(tmp_path):
    """Keys of other families may mean other things (per-layer lists of heads): only the sizes every causal
    LM has are checked there; transformers' own types build as before."""
    check_model_keys({"num_kv_heads": [1, 2], "hidden_size": 64}, "x.json", "openelm")
    with pytest.raises(UserError, match=r"^--model.config x.json: hidden_size: 0 is too small"):
        check_model_keys({"hidden_size": 0}, "x.json", "openelm")
    path = tmp_path / "llama.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 100}))
    assert load_model_config(str(path)).num_attention_heads == 2


def test_the_vocabulary_check_counts_the_largest_id_not_the_tokens(corpus, tmp_path):
    tokenizer = load_tokenizer(ModelOptions(tokenizer_path=str(corpus["tokenizer"])))
    assert token_id_bound(tokenizer) == len(tokenizer) == 4096
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "job_config.toml").write_text(f"[model]\ntokenizer_path = '{corpus['tokenizer']}'\n")
    sparse = load_tokenizer(ModelOptions(tokenizer_path=sparse_tokenizer(tmp_path, dump)))
    assert len(sparse) == 4096 and token_id_bound(sparse) == 5001
