"""The catalogue of bad inputs. Each one ends the run with exit code 2 and one line (the last on stderr,
"error: ...") naming the problem, no traceback, and leaves the dump folder, which holds an earlier run
(checkpoint, HF export, metrics, config), exactly as it was.

Most cases run `lmlab.train.main` in this process; a few run `bash train.sh` to show that the launcher (and
torchrun) keep the contract. Evaluation inputs are covered by the eval tests.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import lmlab.train
from conftest import REPO
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


CASES: dict[str, Bad] = {
    # --- flags ---
    "flag-unknown": Bad("unknown option --training.foo", {"training.foo": "1"}),
    "flag-misspelled": Bad("did you mean training.batch_size?", {"training.batchsize": "4"}),
    "flag-unknown-section": Bad("unknown option --trainer.steps", {"trainer.steps": "4"}),
    "flag-not-an-integer": Bad("--training.steps expects an integer, got 'ten'", {"training.steps": "ten"}),
    "flag-not-a-number": Bad("--optimizer.lr expects a number, got 'fast'", {"optimizer.lr": "fast"}),
    "flag-not-a-boolean": Bad("--training.compile expects true or false, got 'maybe'", tail=("--training.compile=maybe",)),
    "flag-missing-value-at-end": Bad("--training.steps is missing its value", {"training.steps": None},
                                     tail=("--training.steps",)),
    "flag-missing-value-before-flag": Bad("--model.config is missing its value", {"model.config": None},
                                          tail=("--model.config", "--training.steps", "3")),
    "flag-stray-argument": Bad("unexpected argument 'extra'", tail=("extra",)),
    "flag-not-a-choice": Bad("--lr_scheduler.decay_type must be one of", {"lr_scheduler.decay_type": "cosinus"}),
    "flag-not-positive": Bad("--training.batch_size must be positive", {"training.batch_size": "0"}),
    "flag-ratio-out-of-range": Bad("--lr_scheduler.lr_min is a ratio", {"lr_scheduler.lr_min": "2"}),
    "flag-keep-latest-1": Bad("--checkpoint.keep_latest_k 1 is unsafe", {"checkpoint.keep_latest_k": "1"}),
    "flag-micro-batch-not-dividing": Bad("--training.micro_batch_size must divide --training.batch_size (2), got 3",
                                         {"training.micro_batch_size": "3"}),
    "flag-varlen-context-over-seq-len": Bad("--training.context_len (2048) cannot exceed --training.seq_len (32)",
                                            {"training.varlen": "true"}),
    "flag-replicate-degree": Bad("--training.data_parallel_replicate_degree 2 must be >= 1 and divide the 1 processes",
                                 {"training.data_parallel_replicate_degree": "2"}),
    "flag-cpu-offload-one-process": Bad("--training.enable_cpu_offload needs FSDP2",
                                        {"training.enable_cpu_offload": "true"}),
    "flag-unsupported-wandb": Bad("--metrics.enable_wandb is not supported", {"metrics.enable_wandb": "true"}),
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
    "data-probs-mismatch": Bad("--training.data_probs needs 1 non-negative numbers", {"training.data_probs": "0.5,0.5"}),
    # --- tokenizer ---
    "tokenizer-missing-folder": Bad("no such folder", {"model.tokenizer_path": lambda tmp, dump: str(tmp / "tok")}),
    "tokenizer-folder-without-one": Bad("no tokenizer there", {"model.tokenizer_path": lambda tmp, dump: str(tmp)}),
    "tokenizer-larger-than-vocab": Bad("the tokenizer has 4096 tokens but the model's vocab_size is 1000", {
        "model.config": lambda tmp, dump: model_config(tmp, vocab_size=1000)}),
    # --- checkpoints ---
    "checkpoint-missing-step": Bad("--checkpoint.load_step 7: no complete checkpoint step-7", {
        "checkpoint.load_step": "7"}),
    "checkpoint-corrupt-file": Bad("cannot load checkpoint", damage=lambda step: truncate(step / "__0_0.distcp")),
    "checkpoint-corrupt-metadata": Bad("corrupt or not DCP metadata", damage=lambda step: truncate(step / ".metadata")),
    "checkpoint-unknown-state-excluded": Bad("--checkpoint.exclude_from_loading: unknown state 'optimiser'", {
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
    """Every file in the dump folder but train.sh's logs (each start adds its own)."""
    return {str(p.relative_to(dump)): p.read_bytes() for p in sorted(dump.rglob("*"))
            if p.is_file() and p.relative_to(dump).parts[0] != "logs"}


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
