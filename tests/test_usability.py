"""Everyday use (issue 24): help texts, and what the commands say and write where a user would look."""
from __future__ import annotations

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
