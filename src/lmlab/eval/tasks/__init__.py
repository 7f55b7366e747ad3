"""lm-eval task definitions (yaml + classes); this folder is on lm-eval's --include_path (lmlab.eval.harness)."""
