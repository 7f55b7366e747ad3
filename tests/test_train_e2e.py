"""The paper's training command end to end on CPU (tiny sizes), and the loop's step-skipping rules."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import lmlab  # noqa: F401
import lmlab.train
from conftest import CLEAN_ENV, REPO
from lmlab.checkpoint import load_model_weights
from paper_command import train_args


def tiny_args(corpus, dump, **extra):
    """The paper's command verbatim except sizes, a tiny config, and local data/tokenizer."""
    overrides = {
        "job.dump_folder": str(dump),
        "model.config": "configs/tiny_gated_deltanet.json",
        "model.tokenizer_path": str(corpus["tokenizer"]),
        "lr_scheduler.warmup_steps": "4",
        "training.batch_size": "4",
        "training.seq_len": "64",
        "training.gradient_accumulation_steps": "2",
        "training.steps": "20",
        "training.dataset": str(corpus["train"]),
        "training.dataset_name": None,  # a hub config name; the local file has none
        "training.num_workers": "2",
        "training.compile": None,  # compiling on CPU takes minutes: covered by a slow test
        "checkpoint.interval": "8",
        **extra,
    }
    return train_args(**overrides)


def read_metrics(dump):
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


def test_paper_train_command_on_cpu(corpus, tmp_path):
    dump = tmp_path / "mymodel"
    result = subprocess.run(["bash", "train.sh", *tiny_args(corpus, dump)], cwd=REPO, capture_output=True,
                            text=True, env=CLEAN_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(dump)
    assert [r["step"] for r in records] == list(range(1, 21))  # log_freq 1
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert records[-1]["tokens_seen"] == 20 * 2 * 4 * 63
    # checkpoints every 8 steps and at the end, keeping the latest 2; logs teed; config saved
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-16", "step-20"]
    assert (dump / "logs").is_dir() and (dump / "job_config.toml").is_file()
    assert (dump / "tb").is_dir()
    # the HF export reloads and equals the final checkpoint's weights exactly
    exported = AutoModelForCausalLM.from_pretrained(dump).eval()
    reference = AutoModelForCausalLM.from_config(exported.config).eval()
    load_model_weights(reference, dump / "checkpoint" / "step-20")
    ids = torch.randint(0, 4000, (2, 32))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)


@pytest.mark.slow  # about a minute per family on 2 CPU cores
@pytest.mark.parametrize("family", ["hgrn2", "gsa", "mamba", "mamba2", "samba"])
def test_paper_train_command_trains_the_tiny_config(corpus, tmp_path, family):
    """The paper's command on the family's tiny config, with packed documents: the loss falls and the HF
    export reloads as lmlab's class."""
    dump = tmp_path / family
    args = tiny_args(corpus, dump, **{"model.config": f"configs/tiny_{family}.json", "training.varlen": "true",
                                      "training.context_len": "64"})
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}  # the lmlab under test, where it is not installed
    result = subprocess.run(["bash", "train.sh", *args], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(dump)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert type(AutoModelForCausalLM.from_pretrained(dump)).__module__ == f"lmlab.models.{family}"


def run_in_process(corpus, dump, monkeypatch, **extra):
    args = tiny_args(corpus, dump, **{"training.steps": "6", "training.num_workers": "0",
                                      "checkpoint.enable_checkpoint": "false", **extra})
    monkeypatch.chdir(REPO)
    return lmlab.train.main(args)


def inject_nan_grad_norm(monkeypatch, at_steps):
    calls = {"n": 0}
    real = lmlab.train.clip_grad_norm

    def fake(model, max_norm):
        calls["n"] += 1
        norm = real(model, max_norm)
        return float("inf") if calls["n"] in at_steps else norm

    monkeypatch.setattr(lmlab.train, "clip_grad_norm", fake)


def test_skip_nan_inf_skips_exactly_that_step(corpus, tmp_path, monkeypatch):
    inject_nan_grad_norm(monkeypatch, at_steps={3})

    assert run_in_process(corpus, tmp_path, monkeypatch) == 0
    records = read_metrics(tmp_path)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[-1]["step"] == 6  # training continued


def test_nan_loss_is_skipped_too(corpus, tmp_path, monkeypatch):
    real = lmlab.train.forward_backward
    calls = {"n": 0}

    def nan_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(lmlab.train, "forward_backward", nan_loss)
    assert run_in_process(corpus, tmp_path, monkeypatch) == 0
    assert [r["skipped_steps"] for r in read_metrics(tmp_path)] == [0, 1, 1, 1, 1, 1]


def test_without_skip_nan_inf_a_non_finite_step_stops_the_run(corpus, tmp_path, monkeypatch, capsys):
    inject_nan_grad_norm(monkeypatch, at_steps={2})
    assert run_in_process(corpus, tmp_path, monkeypatch, **{"training.skip_nan_inf": "false"}) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: step 2: non-finite") and "--training.skip_nan_inf" in err


def test_consecutive_skips_stop_the_run(corpus, tmp_path, monkeypatch, capsys):
    inject_nan_grad_norm(monkeypatch, at_steps={2, 3, 4})
    assert run_in_process(corpus, tmp_path, monkeypatch, **{"training.max_consecutive_skips": "3"}) == 2
    assert "error: step 4: 3 consecutive non-finite steps" in capsys.readouterr().err


def test_varlen_and_profiling_in_the_loop(corpus, tmp_path, monkeypatch):
    """Packed documents (cu_seqlens from the loader) reach the model; the profiler writes traces."""
    extra = {"training.varlen": "true", "training.context_len": "32", "profiling.enable_profiling": "true",
             "profiling.profile_freq": "3"}
    assert run_in_process(corpus, tmp_path, monkeypatch, **extra) == 0
    records = read_metrics(tmp_path)
    assert len(records) == 6 and all(r["loss"] == r["loss"] for r in records)
    assert list((tmp_path / "profile_traces").glob("rank0*"))


def test_micro_batch_size_keeps_the_losses(corpus, tmp_path, monkeypatch):
    """--training.micro_batch_size splits each loaded batch (packed-document boundaries included) into
    smaller forward/backward passes: same data, same losses."""
    varlen = {"training.varlen": "true", "training.context_len": "32"}
    assert run_in_process(corpus, tmp_path / "whole", monkeypatch, **varlen) == 0
    assert run_in_process(corpus, tmp_path / "split", monkeypatch, **varlen, **{"training.micro_batch_size": "1"}) == 0
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [r["tokens_seen"] for r in whole] == [r["tokens_seen"] for r in split]
    for a, b in zip(whole, split):
        assert abs(a["loss"] - b["loss"]) < 1e-5
