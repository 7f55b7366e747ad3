"""Evaluation: lm-eval integration (lmlab.eval.harness), lmlab's task definitions (lmlab.eval.tasks), FDA by
the JRT/Based protocol (lmlab.eval.fda) and the results table (lmlab.eval.report)."""
