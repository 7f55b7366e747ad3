"""Evaluation entry points: `python -m evals.harness ...` (lm-eval's CLI with lmlab registered)."""
