"""`lmlab plot DUMP... [-o out.png]`: loss and learning-rate curves of one or more runs in one PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.metrics import read_metrics


def plot_runs(dumps: list[str | Path], output: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for dump in dumps:
        records = read_metrics(dump)
        steps = [r["step"] for r in records]
        label = Path(dump).name
        ax_loss.plot(steps, [r["loss"] for r in records], label=label)
        ax_lr.plot(steps, [r["lr"] for r in records], label=label)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmlab plot", description=__doc__)
    parser.add_argument("dumps", nargs="+", help="dump folders (each holds metrics.jsonl)")
    parser.add_argument("-o", "--output", default="loss.png")
    args = parser.parse_args(argv)
    print(plot_runs(args.dumps, args.output))
    return 0
