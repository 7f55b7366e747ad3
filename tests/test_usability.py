"""Everyday use (issue 24): help texts, and what the commands say and write where a user would look."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

import lmlab  # noqa: F401  (imported once for the module: torch and transformers take seconds)
from lmlab import quickstart
from lmlab.eval import harness


def test_quickstart_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        quickstart.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0
    assert "(default: 250)" in out and "(default: configs/quickstart_gated_deltanet.json)" in out


def test_harness_help_is_lm_evals_plus_lmlabs_data_dir(capsys):
    with pytest.raises(SystemExit) as done:
        harness.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "usage: lm-eval" in out
    assert "--data_dir DIR" in out and "LMLAB_EVAL_DATA" in out


def test_one_process_checkpoints_save_and_load_without_warnings(tmp_path):
    """DCP's "torch.distributed is disabled ..." warning is silenced where lmlab calls DCP in one process."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmlab.checkpoint import load_model_weights, save_model_weights
    from lmlab.distributed import Dist

    config = AutoConfig.for_model("gla", hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_model_weights(model, tmp_path / "step-0", Dist(0, 1, 0, torch.device("cpu"), None))
        load_model_weights(model, tmp_path / "step-0")


@pytest.mark.slow  # importing wandb and starting its service: ~2-5 s on 2 cores
def test_wandb_logs_offline_into_the_dump(tmp_path, monkeypatch, capsys):
    """--metrics.enable_wandb with WANDB_MODE=offline (no network in tests): the values go to a local W&B run
    in <dump>/wandb that `wandb sync` uploads later, as one line says."""
    from lmlab.config import Metrics
    from lmlab.metrics import MetricLogger, start_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = start_wandb(tmp_path, {"training": {"steps": 2}}, "gla-run", fresh=True)
    logger = MetricLogger(tmp_path, Metrics(), 2, enabled=True, wandb_run=run)
    logger.log(1, {"loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second_per_device": 10.0,
                   "elapsed_seconds": 1.0, "eta_seconds": 1.0})
    logger.close()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("run-*.wandb"))
    assert f"upload it later with: wandb sync {offline_runs[0]}" in capsys.readouterr().out
    assert offline_runs[0].name.endswith((tmp_path / "wandb" / "lmlab_run_id").read_text())


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_starts_another(tmp_path, monkeypatch):
    from lmlab.metrics import start_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    first = start_wandb(tmp_path, {}, "gla-run", fresh=True)
    first.finish()
    resumed = start_wandb(tmp_path, {}, "gla-run", fresh=False)
    resumed.finish()
    fresh = start_wandb(tmp_path, {}, "gla-run", fresh=True)
    fresh.finish()
    assert resumed.id == first.id != fresh.id


def test_wandb_goes_offline_without_a_login(monkeypatch, tmp_path):
    from lmlab.metrics import wandb_offline_reason

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_offline_reason() == "not logged in: run `wandb login`"


def test_the_eta_comes_from_the_recent_steps_of_this_process(monkeypatch):
    """A slow first step (compilation) or the steps of an earlier run never weigh on the ETA."""
    from lmlab import metrics

    clock = iter([0.0, 100.0, 101.0, 102.0, 103.0])  # step 1 ends after 100 s, then 1 s a step
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    recent = metrics.RecentSteps(window=3)
    recent.step_done()
    assert recent.eta(10) is None  # one step of this process: no rate yet
    for _ in range(4):
        recent.step_done()
    assert recent.eta(10) == 10.0


def test_train_sh_draws_a_per_step_bar_under_the_output_on_a_terminal(tmp_path, capsys):
    """The launcher passes the command's lines through and draws the trainer's progress file as a bar."""
    import sys

    from lmlab.launch import run_forwarding_signals

    progress = tmp_path / "progress"
    script = (f"import pathlib, time\nfor s in (3, 4, 5):\n    pathlib.Path({str(progress)!r}).write_text(f'{{s}} 5')\n"
              "    print('line', s, flush=True)\n    time.sleep(0.3)\n")
    assert run_forwarding_signals([sys.executable, "-c", script], {}, (), progress) == 0
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("line")] == ["line 3", "line 4", "line 5"]
    assert "/5 [" in err and "step/s" in err  # a resumed run's bar starts at its step: 3/5, 4/5, 5/5


def test_evaluation_bars_refresh_once_a_minute_in_a_log_file(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    with harness.bars_throttled_in_logs():  # pytest's stderr is not a terminal
        assert os.environ["TQDM_MININTERVAL"] == "60"
    assert "TQDM_MININTERVAL" not in os.environ


def test_metrics_of_a_resume_or_restart_replace_the_old_timelines_steps(tmp_path):
    """A run killed at step 5 after its checkpoint at 3 resumes there; a run without checkpoints restarts at 1:
    what plot and report read is the newest timeline, not a mix (steps 4-5 of the old one after step 2)."""
    import json

    from lmlab.metrics import read_metrics

    steps = [(1, "a"), (2, "a"), (3, "a"), (4, "a"), (5, "a"), (4, "b"), (5, "b"), (6, "b"), (1, "c"), (2, "c")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "run": r}) + "\n" for s, r in steps))
    assert [(m["step"], m["run"]) for m in read_metrics(tmp_path)] == [(1, "c"), (2, "c")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "run": r}) + "\n" for s, r in steps[:8]))
    assert [(m["step"], m["run"]) for m in read_metrics(tmp_path)] == [(1, "a"), (2, "a"), (3, "a"), (4, "b"),
                                                                        (5, "b"), (6, "b")]


def test_plot_labels_runs_apart_and_writes_next_to_the_run(tmp_path, monkeypatch, capsys):
    from lmlab import plot

    assert plot.run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]
    assert plot.run_labels([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]
    written = []
    monkeypatch.setattr(plot, "plot_runs", lambda dumps, output: written.append(Path(output)) or output)
    monkeypatch.chdir(tmp_path)
    assert plot.main(["exp/a/run"]) == 0 and written == [Path("exp/a/run/loss.png")]  # not ./loss.png
    assert plot.main(["exp/a/run", "exp/b/run"]) == 2
    assert "error: 2 runs: name the PNG to write with -o" in capsys.readouterr().err


def test_the_quickstart_tokenizer_pads(tmp_path):
    from transformers import AutoTokenizer

    quickstart.train_tokenizer(["The for statement is used to iterate over the elements of a sequence."] * 20,
                               tmp_path, vocab_size=300)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token) == (1, 2, "<pad>")
    batch = tokenizer(["The for", "The for statement is used"], padding=True)
    assert len(set(map(len, batch["input_ids"]))) == 1


def test_the_quickstarts_batched_perplexity_is_the_per_document_one(tmp_path):
    """Held-out documents scored in right-padded batches: the same token-level perplexity as one by one."""
    import math

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    docs = ["The for statement is used to iterate over the elements of a sequence.",
            "Return a new list.", "x"] + [f"Document {i} says that {i} + 1 is {i + 1}." for i in range(5)]
    quickstart.train_tokenizer(docs * 5, tmp_path, vocab_size=300)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gated_deltanet", hidden_size=32, num_hidden_layers=1, num_heads=2, head_dim=16, vocab_size=300)).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = tokenizer(doc, return_tensors="pt").input_ids[:, :12]
            if ids.shape[1] >= 2:
                total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
                tokens += ids.shape[1] - 1
    batched = quickstart.heldout_perplexity(model, tokenizer, docs, seq_len=12, batch_size=3)
    assert batched == pytest.approx(math.exp(total / tokens), rel=1e-5)
