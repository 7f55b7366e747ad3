"""`lmlab report RESULTS... [--csv PATH]`: one Markdown table row per model, in the paper's column order.

RESULTS are lm-eval results JSON files or folders searched for `results*.json` (`python -m evals.harness
--output_path`, `launch_hf.py --output_dir`, a dump folder). A model is its `pretrained` model argument (`run/`
and `./run` are `run`); when several files hold the same task for a model, the newest (lm-eval's `date`)
counts, and a line on stderr says which file that is and which it replaced.
Columns: Wiki ppl (word_perplexity), LMB ppl, LMB acc, PIQA acc, Hella acc_norm, Wino acc, ARC-e acc,
ARC-c acc_norm, Avg (mean of those six accuracies), SWDE, SQuAD (squad_completion), FDA (based_fda, the
JRT protocol; lm-eval's `fda` marked "*" when only that was run) — `contains`; accuracies in %.
Params: lm-eval's `model_num_parameters`, else the model folder's safetensors. Tokens: the last
`tokens_seen` of the model folder's metrics.jsonl (a dump), else "-".
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from lmlab.errors import ArgumentParser, UserError, command
from lmlab.metrics import METRICS_FILE, read_metrics

# (column, task, metric, scale): lm-eval's "<metric>,none" value of the task, times scale
COLUMNS = [
    ("Wiki ppl", "wikitext", "word_perplexity", 1),
    ("LMB ppl", "lambada_openai", "perplexity", 1),
    ("LMB acc", "lambada_openai", "acc", 100),
    ("PIQA acc", "piqa", "acc", 100),
    ("Hella acc_n", "hellaswag", "acc_norm", 100),
    ("Wino acc", "winogrande", "acc", 100),
    ("ARC-e acc", "arc_easy", "acc", 100),
    ("ARC-c acc_n", "arc_challenge", "acc_norm", 100),
    ("SWDE", "swde", "contains", 100),
    ("SQuAD", "squad_completion", "contains", 100),
    ("FDA", "based_fda", "contains", 100),
]
UNITS = ("Accuracies, Avg, SWDE, SQuAD and FDA (`contains`) are percentages (lm-eval's fractions x 100); "
         "Wiki ppl is word perplexity, LMB ppl token perplexity.")
AVERAGED = ["LMB acc", "PIQA acc", "Hella acc_n", "Wino acc", "ARC-e acc", "ARC-c acc_n"]
HEADER = ["Model", "Params", "Tokens", *[c[0] for c in COLUMNS[:8]], "Avg", *[c[0] for c in COLUMNS[8:]]]


def result_files(paths: list[str]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.rglob("results*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"no results*.json in {' '.join(paths)}")
    return files


def model_name(result: dict[str, Any]) -> str:
    """The model a results file is of: its `pretrained` argument, written one way (`run/` and `./run` are `run`)."""
    args = result.get("config", {}).get("model_args")
    if isinstance(args, str):  # older lm-eval: "pretrained=...,dtype=..."
        args = dict(item.split("=", 1) for item in args.split(",") if "=" in item)
    name = (args or {}).get("pretrained") or result.get("model_name")
    return os.path.normpath(name) if isinstance(name, str) else "?"


def read_result(path: Path) -> dict[str, Any]:
    """One lm-eval results file, checked: UserError naming the file if it is not one."""
    try:
        result = json.loads(path.read_bytes())
    except ValueError:  # invalid JSON or UTF-8
        raise UserError(f"{path}: not a JSON file (a truncated or foreign results*.json?)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    tasks = result.get("results") if isinstance(result, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(metrics, dict) for metrics in tasks.values()) \
            or not isinstance(result.get("config", {}), dict):
        raise UserError(f"{path}: not an lm-eval results file (expected an object whose 'results' maps each task "
                        "to its metrics, and a 'config' object)")
    for task, metrics in tasks.items():
        for metric, value in metrics.items():
            # lm-eval writes "N/A" for a standard error it cannot compute (wikitext's perplexities, `contains`,
            # any metric of a single document)
            no_stderr = metric.endswith("_stderr,none") and value == "N/A"
            if metric.endswith(",none") and not (isinstance(value, (int, float, type(None))) or no_stderr):
                raise UserError(f"{path}: {task} {metric} is {value!r}, not a number")
    try:
        float(result.get("date", 0))
    except (TypeError, ValueError):
        raise UserError(f"{path}: date {result['date']!r} is not a timestamp") from None
    return result


def collect(files: list[Path]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per model: its task results (newest file wins) and the number of parameters lm-eval counted; and one
    note per task that several files evaluated for the same model (which file counts)."""
    models: dict[str, dict[str, Any]] = {}
    source: dict[tuple[str, str], list[Path]] = {}  # (model, task) -> its files, oldest first
    results = sorted(((read_result(f), f) for f in files), key=lambda rf: float(rf[0].get("date", 0)))
    for result, file in results:
        name = model_name(result)
        model = models.setdefault(name, {"tasks": {}, "params": None})
        model["tasks"].update(result["results"])
        model["params"] = result.get("config", {}).get("model_num_parameters") or model["params"]
        for task in result.get("results", {}):
            source.setdefault((name, task), []).append(file)
    notes = [f"lmlab report: {name}: {task} was evaluated in {len(paths)} files; using the newest, {paths[-1]} "
             f"(not {', '.join(map(str, paths[:-1]))})"
             for (name, task), paths in source.items() if len(paths) > 1]
    return models, notes


def safetensors_params(folder: Path) -> int | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    numel = 1
                    for size in f.get_slice(key).get_shape():
                        numel *= size
                    total += numel
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{file}: corrupt or truncated safetensors ({exc}); its parameters cannot be counted") from None
    return total


def tokens_trained(folder: Path) -> int | None:
    if not (folder / METRICS_FILE).is_file():
        return None
    records = read_metrics(folder)
    return records[-1].get("tokens_seen") if records else None


def human(count: int | None) -> str:
    if not count:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def row(name: str, model: dict[str, Any]) -> list[str]:
    tasks, folder = model["tasks"], Path(name)
    values: dict[str, float] = {}
    for column, task, metric, scale in COLUMNS:
        value = tasks.get(task, {}).get(f"{metric},none")
        if value is not None:
            values[column] = value * scale
    cells = {column: f"{value:.2f}" for column, value in values.items()}
    if "FDA" not in values and "contains,none" in tasks.get("fda", {}):
        cells["FDA"] = f"{tasks['fda']['contains,none'] * 100:.2f}*"
    if all(column in values for column in AVERAGED):
        cells["Avg"] = f"{sum(values[c] for c in AVERAGED) / len(AVERAGED):.2f}"
    params = model["params"] or (safetensors_params(folder) if folder.is_dir() else None)
    cells |= {"Model": name, "Params": human(params), "Tokens": human(tokens_trained(folder))}
    return [cells.get(column, "-") for column in HEADER]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append(f"\n{UNITS}")
    if any(r[-1].endswith("*") for r in rows):
        lines.append("\n\\* FDA from lm-eval's `fda` task, not the JRT protocol of launch_hf.py (`based_fda`).")
    return "\n".join(lines)


@command("lmlab report")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="lmlab report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="lm-eval results JSON files or folders holding them")
    parser.add_argument("--csv", help="also write the table as CSV to this path")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.csv and not Path(args.csv).parent.is_dir():
        raise UserError(f"--csv {args.csv}: no folder {Path(args.csv).parent} to write it in")
    models, notes = collect(result_files(args.results))
    for note in notes:
        print(note, file=sys.stderr)
    rows = [row(name, model) for name, model in models.items()]
    print(markdown(rows))
    if args.csv:
        try:
            with open(args.csv, "w", newline="") as f:
                csv.writer(f).writerows([HEADER, *rows])
        except OSError as exc:
            raise UserError(f"--csv {args.csv}: cannot write it ({exc.strerror or exc})") from None
    return 0
