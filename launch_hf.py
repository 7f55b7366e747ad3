r"""FDA by the JRT/Based protocol, with the paper's flags (see lmlab.eval.fda):

    python launch_hf.py --batch-size 1 -m exp/mymodel -t based_fda --output_dir out --context_length 1000 \
        --answer_length 50 --cutting_context --limit -1 -p
"""
import sys

from lmlab.eval.fda import main

if __name__ == "__main__":
    sys.exit(main())
