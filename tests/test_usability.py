"""Everyday use (issue 24): help texts, and what the commands say and write where a user would look."""
from __future__ import annotations

import warnings

import pytest

import lmlab  # noqa: F401  (imported once for the module: torch and transformers take seconds)
from lmlab import quickstart
from lmlab.eval import harness


def test_quickstart_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        quickstart.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0
    assert "(default: 300)" in out and "(default: configs/tiny_gated_deltanet.json)" in out


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
