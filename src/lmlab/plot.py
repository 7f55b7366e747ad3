"""`lmlab plot DUMP... [-o out.png]`: loss and learning-rate curves of one or more runs in one PNG.

Without -o, one run's plot goes into its dump folder (`DUMP/loss.png`); several runs need -o. Each run is
labelled by the shortest ending of its path that tells it from the others (exp/a/run, exp/b/run: a/run, b/run).
"""
from __future__ import annotations

from pathlib import Path

from lmlab.errors import ArgumentParser, UserError, command
from lmlab.metrics import METRICS_FILE, read_metrics

CURVES = ("loss", "lr")


def run_labels(dumps: list[str | Path]) -> list[str]:
    """The shortest path endings that tell the runs apart (the folder names when those do)."""
    parts = [Path(dump).resolve().parts for dump in dumps]
    for length in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-length:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(Path(dump).resolve()) for dump in dumps]  # the same folder twice


def writable_output(output: str | Path) -> Path:
    """The image's path as matplotlib writes it (a name without a suffix gets ".png"), once its folder is known
    to exist and its suffix a format matplotlib writes (UserError otherwise)."""
    from matplotlib.backend_bases import FigureCanvasBase

    output = Path(output).expanduser()
    if not output.parent.is_dir():
        raise UserError(f"-o {output}: no folder {output.parent} to write it in")
    formats = FigureCanvasBase.get_supported_filetypes()
    if not output.suffix:
        return output.with_name(output.name + ".png")
    if output.suffix[1:].lower() not in formats:
        raise UserError(f"-o {output}: matplotlib cannot write {output.suffix} files (expected one of "
                        f"{', '.join('.' + name for name in formats)})")
    return output


def plot_runs(dumps: list[str | Path], output: str | Path) -> Path:
    """Every dump's metrics are read and checked (UserError) before the PNG is drawn."""
    runs = []  # (label, records)
    for dump, label in zip(dumps, run_labels(dumps)):
        records = read_metrics(dump)
        if not records:
            raise UserError(f"{Path(dump) / METRICS_FILE}: no records yet")
        lacking = next((r for r in records if not all(isinstance(r.get(key), (int, float)) for key in CURVES)), None)
        if lacking is not None:
            raise UserError(f"{Path(dump) / METRICS_FILE}: the record of step {lacking['step']} has no numeric "
                            f"{' and '.join(CURVES)}")
        runs.append((label, records))
    output = writable_output(output)

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in runs:
        steps = [r["step"] for r in records]
        ax_loss.plot(steps, [r["loss"] for r in records], label=label)
        ax_lr.plot(steps, [r["lr"] for r in records], label=label)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=100)
    except OSError as exc:
        raise UserError(f"-o {output}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return output


@command("lmlab plot")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="lmlab plot", description=__doc__)
    parser.add_argument("dumps", nargs="+", help="dump folders (each holds metrics.jsonl)")
    parser.add_argument("-o", "--output", help="the PNG to write (default for one run: DUMP/loss.png)")
    args = parser.parse_args(argv)
    if args.output is None and len(args.dumps) > 1:
        raise UserError(f"{len(args.dumps)} runs: name the PNG to write with -o (e.g. -o compare.png)")
    if args.output is not None:
        writable_output(args.output)  # an argument: checked before the runs are read
    print(plot_runs(args.dumps, args.output or Path(args.dumps[0]) / "loss.png"))
    return 0
