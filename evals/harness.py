"""`python -m evals.harness <lm-eval flags> [--data_dir DIR]`: lm-eval 0.4.13's CLI with lmlab's models,
tasks and local data (see lmlab.eval.harness)."""
import sys

from lmlab.eval.harness import main

if __name__ == "__main__":
    sys.exit(main())
