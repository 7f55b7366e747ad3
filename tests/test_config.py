import re
import subprocess
from pathlib import Path

import pytest

from lmlab.config import (ConfigError, JobConfig, catalogue, default_text, help_text, options_table, parse_args,
                          type_name)
from conftest import CLEAN_ENV
from paper_command import TRAIN

REPO = Path(__file__).resolve().parents[1]


def test_paper_command_parses_every_flag(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = parse_args(TRAIN)
    assert cfg.job.dump_folder == "exp/mymodel"
    assert cfg.model.config == "configs/<model>.json"
    assert cfg.model.tokenizer_path == "fla-hub/transformer-1.3B-100B"
    assert (cfg.optimizer.name, cfg.optimizer.eps, cfg.optimizer.lr) == ("AdamW", 1e-15, 1e-3)
    s = cfg.lr_scheduler
    assert (s.warmup_steps, s.lr_min, s.decay_type) == (1024, 0.1, "cosine")
    t = cfg.training
    assert (t.batch_size, t.seq_len, t.gradient_accumulation_steps, t.steps) == (16, 2048, 4, 28672)
    assert t.max_norm == 1.0 and t.skip_nan_inf and t.compile
    assert (t.dataset, t.dataset_name, t.dataset_split) == ("HuggingFaceFW/fineweb-edu", "sample-100BT", "train")
    assert (t.num_workers, t.prefetch_factor, t.seed) == (12, 2, 42)
    c = cfg.checkpoint
    assert (c.interval, c.load_step, c.keep_latest_k) == (2048, -1, 2)
    assert cfg.metrics.log_freq == 1
    # values that only the TOML sets
    assert c.enable_checkpoint and cfg.metrics.enable_tensorboard and cfg.job.print_args


def test_precedence_cli_over_toml_over_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    assert JobConfig().training.batch_size == 8
    assert parse_args(["--job.config_file", "flame/models/fla.toml"]).training.batch_size == 32
    args = ["--training.batch_size", "4", "--job.config_file", "flame/models/fla.toml"]
    assert parse_args(args).training.batch_size == 4  # the CLI wins wherever config_file appears


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--training.compile"], True),
        (["--training.compile", "true"], True),
        (["--training.compile=true"], True),
        (["--training.compile", "false"], False),
        (["--training.compile=false"], False),
        (["--training.compile", "--training.seq_len", "8"], True),
    ],
)
def test_boolean_forms(args, expected):
    assert parse_args(args).training.compile is expected


@pytest.mark.parametrize("text, value", [("10", 10), ("010", 10), ("007", 7), ("00", 0), ("1_000", 1000),
                                         ("0x10", 16), ("0o20", 16), ("0b1010", 10)])
def test_integer_forms(text, value):
    """Python's integer forms, and leading zeros as decimal (Python's int(text, 0) refuses 010)."""
    assert parse_args(["--training.num_workers", text]).training.num_workers == value


def test_toml_true_can_be_switched_off(monkeypatch):
    monkeypatch.chdir(REPO)
    base = ["--job.config_file", "flame/models/fla.toml"]
    assert parse_args(base).training.skip_nan_inf is True
    assert parse_args(base + ["--training.skip_nan_inf", "false"]).training.skip_nan_inf is False
    assert parse_args(base + ["--checkpoint.enable_checkpoint=false"]).checkpoint.enable_checkpoint is False


def test_equals_form_and_negative_numbers():
    cfg = parse_args(["--optimizer.lr=2e-4", "--checkpoint.load_step", "-1", "--lr_scheduler.decay_ratio", "0.2"])
    assert cfg.optimizer.lr == 2e-4 and cfg.checkpoint.load_step == -1 and cfg.lr_scheduler.decay_ratio == 0.2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--training.seqlen", "8"], "unknown option --training.seqlen (did you mean training.seq_len?)"),
        (["--trainin.steps", "8"], "did you mean training.steps?"),
        (["--optimiser.lr", "1"], "did you mean optimizer.lr?"),
        (["--training.steps"], "--training.steps is missing its value"),
        (["--training.steps", "--training.seq_len", "3"], "--training.steps is missing its value"),
        (["--training.steps", "many"], "--training.steps: 'many' is not an integer (expected >= 1)"),
        (["--training.steps", "1.0"], "--training.steps: '1.0' is not an integer (expected >= 1)"),
        (["--training.steps", "0x"], "--training.steps: '0x' is not an integer (expected >= 1)"),
        (["--optimizer.lr", "fast"], "--optimizer.lr: 'fast' is not a number (expected > 0, finite)"),
        (["--optimizer.lr", "inf"], "--optimizer.lr: inf is not finite (expected > 0, finite)"),
        (["--optimizer.lr", "nan"], "--optimizer.lr: nan is not a number (expected > 0, finite)"),
        (["--training.compile=maybe"], "--training.compile: 'maybe' is not true or false"),
        (["--optimizer.name", "SGD"], "--optimizer.name: 'SGD' is not a valid choice (expected one of Adam, AdamW)"),
        (["--lr_scheduler.decay_type", "step"], "(expected one of linear, sqrt, cosine)"),
        (["--checkpoint.keep_latest_k", "1"], "--checkpoint.keep_latest_k: 1 is unsafe"),
        (["--training.batch_size", "0"], "--training.batch_size: 0 is too small (expected >= 1)"),
        (["--lr_scheduler.lr_min", "2"], "--lr_scheduler.lr_min: 2.0 is too large (expected in [0, 1])"),
        (["--job.config_file="], "--job.config_file: '' is empty"),
        (["positional"], "unexpected argument 'positional'"),
        (["--job.config_file", "missing.toml"], "no such file"),
    ],
)
def test_errors_are_one_line_with_suggestion(args, message):
    with pytest.raises(ConfigError) as info:
        parse_args(args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_toml_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nseq_length = 5\n")
    with pytest.raises(ConfigError, match=r"unknown option --training.seq_length \(did you mean training.seq_len\?\)"):
        parse_args(["--job.config_file", str(bad)])
    bad.write_text("[training]\nsteps = 'ten'\n")
    with pytest.raises(ConfigError, match=r"bad.toml: --training.steps: 'ten' is not an integer \(expected >= 1\)$"):
        parse_args(["--job.config_file", str(bad)])


@pytest.mark.parametrize("text, message", [
    ('[training]\nsteps = "5"', "--training.steps: '5' is not an integer (expected >= 1)"),
    ("[training]\nsteps = 5.0", "--training.steps: 5.0 is not an integer (expected >= 1)"),
    ("[training]\nsteps = true", "--training.steps: true is not an integer (expected >= 1)"),
    ('[training]\nseed = "42"', "--training.seed: '42' is not an integer (expected none or in [0, 2147483647])"),
    ('[training]\ncompile = "yes"', "--training.compile: 'yes' is not true or false (expected true or false)"),
    ("[training]\ncompile = 1", "--training.compile: 1 is not true or false (expected true or false)"),
    ('[optimizer]\nlr = "1e-3"', "--optimizer.lr: '1e-3' is not a number (expected > 0, finite)"),
    ("[optimizer]\nlr = false", "--optimizer.lr: false is not a number (expected > 0, finite)"),
    ("[job]\ndump_folder = 5", "--job.dump_folder: 5 is not a quoted string (expected a folder path)"),
    ('[job]\ndump_folder = ["a"]', "--job.dump_folder: ['a'] is not a quoted string (expected a folder path)"),
    ("[activation_checkpoint]\nselective_ac_option = 2",
     "--activation_checkpoint.selective_ac_option: 2 is not a quoted string (expected op or an integer >= 1)"),
    ('[checkpoint]\nexclude_from_loading = ["model", 1]', "--checkpoint.exclude_from_loading: ['model', 1] is not "
     "a list of strings (expected a comma list of model, optimizer, lr_scheduler, dataloader, train_state, rng)"),
])
def test_a_toml_value_of_another_type_is_refused_naming_the_file(text, message, tmp_path):
    """TOML values are typed: the command line's conversions ("5" -> 5, "yes" -> true, 5 -> "5") do not apply."""
    toml = tmp_path / "job.toml"
    toml.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--job.config_file", str(toml)])
    assert str(info.value) == f"{toml}: {message}"


def test_toml_values_of_each_type(tmp_path):
    """An integer is a float option's too; a list is an array of strings or a comma list; "none" is None
    where none is valid (TOML has no null), as on the command line."""
    toml = tmp_path / "job.toml"
    toml.write_text('[job]\ndump_folder = "5"\n[optimizer]\nlr = 1\n[lr_scheduler]\ndecay_ratio = "null"\n'
                    '[training]\nsteps = 5\ncompile = true\nseed = "none"\n'
                    '[checkpoint]\nexclude_from_loading = ["optimizer", "rng"]\n')
    cfg = parse_args(["--job.config_file", str(toml)])
    assert cfg.job.dump_folder == "5" and cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert (cfg.training.steps, cfg.training.compile, cfg.training.seed) == (5, True, None)
    assert cfg.lr_scheduler.decay_ratio is None and cfg.checkpoint.exclude_from_loading == ["optimizer", "rng"]
    toml.write_text('[checkpoint]\nexclude_from_loading = "optimizer,rng"\n')
    assert parse_args(["--job.config_file", str(toml)]).checkpoint.exclude_from_loading == ["optimizer", "rng"]


def test_a_bad_value_from_the_toml_names_the_file_and_the_command_line_overrides_it(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text("[optimizer]\nlr = nan\n")
    with pytest.raises(ConfigError, match=r"^\S+job.toml: --optimizer.lr: nan is not a number \(expected > 0, finite\)$"):
        parse_args(["--job.config_file", str(toml)])
    assert parse_args(["--job.config_file", str(toml), "--optimizer.lr", "1e-3"]).optimizer.lr == 1e-3
    with pytest.raises(ConfigError, match=r"^--optimizer.lr: inf is not finite"):  # the CLI's own value: no file
        parse_args(["--job.config_file", str(toml), "--optimizer.lr", "1e999"])


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = parse_args(["--training.steps", "7", "--training.compile", "--optimizer.eps", "1e-15"])
    path = tmp_path / "saved.toml"
    path.write_text(cfg.to_toml())
    again = parse_args(["--job.config_file", str(path)])
    again.job.config_file = cfg.job.config_file
    assert again == cfg


def test_the_recorded_config_never_holds_overwrite():
    """A run's job_config.toml is what `--job.config_file` continues: the destructive flag is never part of it."""
    cfg = parse_args(["--job.overwrite", "--training.steps", "7"])
    assert cfg.job.overwrite and "overwrite = true" in cfg.to_toml()  # what --job.print_args shows
    assert "overwrite = false" in cfg.record_toml() and cfg.job.overwrite


def test_a_job_config_cannot_include_another(tmp_path, monkeypatch):
    """`[job] config_file` in a TOML would be ignored: refused, unless it names that very file."""
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "job.toml"
    for named in ("base.toml", str(REPO / "flame/models/fla.toml")):  # a missing file, an existing one
        toml.write_text(f"[job]\nconfig_file = '{named}'\n[training]\nsteps = 7\n")
        with pytest.raises(ConfigError) as info:
            parse_args(["--job.config_file", str(toml)])
        assert str(info.value) == (f"{toml}: --job.config_file: '{named}' is not allowed in a job config (a job "
                                   "config cannot include another; remove the line)")
    for itself in ("job.toml", str(toml)):
        toml.write_text(f"[job]\nconfig_file = '{itself}'\n[training]\nsteps = 7\n")
        cfg = parse_args(["--job.config_file", "job.toml"])
        assert cfg.training.steps == 7 and cfg.job.config_file == "job.toml"


def test_a_record_continues_whether_or_not_it_names_the_toml_its_run_started_from(tmp_path, monkeypatch):
    """Records leave --job.config_file out; records written before named the TOML the run started from in
    `[job] config_file` (what to_toml still prints): their continue command, `--job.config_file
    <dump>/job_config.toml`, reads them as before."""
    monkeypatch.chdir(REPO)
    run = parse_args(["--job.config_file", "flame/models/fla.toml", "--training.steps", "7"])
    assert "config_file" not in run.record_toml() and "config_file = " in run.to_toml()
    record = tmp_path / "dump" / "job_config.toml"
    record.parent.mkdir()
    for text in (run.record_toml(), run.to_toml()):  # this record, an earlier one
        record.write_text(text)
        continued = parse_args(["--job.config_file", str(record)])
        assert continued.job.config_file == str(record)
        continued.job.config_file = run.job.config_file
        assert continued == run


def test_train_sh_rejects_bad_flag_with_exit_code_2(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "train.sh"), "--job.dump_folder", str(tmp_path), "--training.seqlen", "8"],
        capture_output=True, text=True, env=CLEAN_ENV,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown option --training.seqlen (did you mean training.seq_len?)"


def test_readme_option_table_is_the_catalogue():
    """README's option table is `python -m lmlab.config`'s output: every option, type, default, valid values
    and meaning come from the one catalogue."""
    assert options_table() in (REPO / "README.md").read_text()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_sh_help_lists_every_option_with_type_default_and_meaning(flag, capsys):
    from lmlab.launch import main  # what train.sh runs
    with pytest.raises(SystemExit) as done:
        main(["--job.dump_folder", "x", flag])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for opt in catalogue().values():
        assert f"--{opt.name}  {type_name(opt)}, default {default_text(opt)}; {opt.domain.expected}\n" in out
    assert " ".join(catalogue()["training.micro_batch_size"].meaning.split()[:6]) in out


@pytest.mark.slow
def test_train_sh_help_through_bash():
    result = subprocess.run(["bash", str(REPO / "train.sh"), "-h"], capture_output=True, text=True, env=CLEAN_ENV)
    assert result.returncode == 0 and not result.stderr and result.stdout.strip() == help_text()


def test_lmlab_train_help_is_train_sh_help(capsys):
    from lmlab.cli import main
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == help_text()


def test_options_table_prints_the_catalogue():
    table = options_table().splitlines()
    assert table[0] == "| option | type | default | valid values | meaning |" and len(table) == 2 + len(catalogue())
    assert "| `optimizer.lr` | float | 0.0008 | > 0, finite | peak learning rate |" in table
    assert "| `checkpoint.keep_latest_k` | int | 0 | 0 or >= 2 | keep only the newest k complete checkpoints (0: all) |" \
        in table
