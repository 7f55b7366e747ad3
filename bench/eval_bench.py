"""Evaluation wall time (issue 6): the paper's 9-task lm-eval suite and the FDA command, at batch 1 and batched.

    python bench/eval_bench.py --config configs/gated_deltanet_340M.json --limit 200 --batch-sizes 1 16

Needs no network and no trained model: it writes a randomly initialised model of `--config` (timing does not
depend on the weights, but generation length does: random weights rarely emit "\\n", so generation tasks run
their full 48 tokens, an upper bound) and synthetic task data in each hub dataset's schema with lengths close
to the real ones (`SIZES`). Each run is the paper's command with `--limit` docs per task; the table gives the
measured seconds and, scaled by docs (real docs / limited docs per task group), an estimate for the full
suite (an upper bound: start-up, i.e. model load and task building, is scaled too). `--parallel` also runs
FDA with `-p` (one job per visible GPU) and checks that it generates the same as one job. Prints a Markdown
table last and writes JSON to `--out`.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import lmlab  # noqa: E402,F401  (registers the model types)
from lmlab.eval import fda, harness  # noqa: E402
from lmlab.quickstart import python_corpus, train_tokenizer  # noqa: E402

SUITE = "wikitext,lambada_openai,piqa,hellaswag,winogrande,arc_easy,arc_challenge,squad_completion,swde"
HARNESS = ("--model hf --model_args pretrained={model},dtype={dtype} --tasks {tasks} --batch_size {batch} "
           "--num_fewshot 0 --device {device} --show_config")
FDA = ("--batch-size {batch} -m {model} -t based_fda --output_dir {out} --context_length 1000 --answer_length 50 "
       "--cutting_context --limit {limit} --device {device}")
# task: (evaluated split, real number of docs, words per text field) -- doc counts of the hub datasets' splits;
# word counts approximate their typical lengths.
SIZES = {
    "wikitext": ("test", 62, 3000),
    "lambada_openai": ("test", 5153, 70),
    "piqa": ("validation", 1838, 15),
    "hellaswag": ("validation", 10042, 30),
    "winogrande": ("validation", 1267, 20),
    "arc_easy": ("test", 2376, 20),
    "arc_challenge": ("test", 1172, 25),
    "squad_completion": ("validation", 2984, 120),
    "swde": ("validation", 1111, 700),
    "fda": ("validation", 1102, 1400),
}


def synthetic_docs(task: str, n: int, words: int, rng: random.Random, vocab: list[str]) -> list[dict]:
    """n rows of `task`'s hub schema with texts of about `words` words."""
    def text(k: int = words) -> str:
        return " ".join(rng.choice(vocab) for _ in range(max(k, 1)))

    rows = []
    for i in range(n):
        if task == "wikitext":
            rows.append({"page": f" = {text(3)} = \n {text()} \n"})
        elif task == "lambada_openai":
            rows.append({"text": text()})
        elif task == "piqa":
            rows.append({"goal": text(), "sol1": text(), "sol2": text(), "label": i % 2})
        elif task == "hellaswag":
            rows.append({"ind": i, "activity_label": text(2), "ctx_a": text(), "ctx_b": text(5),
                         "ctx": text(), "endings": [text(words // 2) for _ in range(4)], "source_id": str(i),
                         "split": "val", "split_type": "indomain", "label": str(i % 4)})
        elif task == "winogrande":
            rows.append({"sentence": f"{text()} _ {text(5)}.", "option1": text(2), "option2": text(2),
                         "answer": str(1 + i % 2)})
        elif task in ("arc_easy", "arc_challenge"):
            rows.append({"id": str(i), "question": text(), "answerKey": "A",
                         "choices": {"text": [text(5) for _ in range(4)], "label": ["A", "B", "C", "D"]}})
        else:  # squad_completion, swde, fda: a context ending in "key:" and the value to recall
            key, value = text(1), text(2)
            rows.append({"text": f"{text()} {key}: {value}. {text(words // 4)} {key}:", "key": key,
                         "value": value})
    return rows


def write_data(root: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = sorted({w for doc in python_corpus()[:200] for w in doc.split() if w.isalpha()})
    for task, (split, n, words) in SIZES.items():
        path = root / task / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_docs(task, n, words, rng, vocab)))


def write_model(config: Path, root: Path) -> Path:
    """A randomly initialised model of `config` with a 4096-token BPE tokenizer (bf16 safetensors)."""
    train_tokenizer(python_corpus(), root)
    model_config = AutoConfig.for_model(**json.loads(config.read_text()))
    model_config.bos_token_id, model_config.eos_token_id = 1, 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config).to(torch.bfloat16).save_pretrained(root)
    return root


def timed(fn, argv: list[str]) -> float:
    start = time.perf_counter()
    code = fn(argv)
    if code:
        raise SystemExit(f"eval_bench: {' '.join(argv)} exited with {code}")
    return time.perf_counter() - start


def fda_generations(out: Path) -> dict[int, str]:
    """doc_id -> generation of an FDA run's per-sample records."""
    (records,) = out.rglob("records_based_fda_*.jsonl")
    return {r["doc_id"]: r["generation"] for r in map(json.loads, records.open())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "gated_deltanet_340M.json")
    p.add_argument("--limit", type=int, default=200, help="docs per task (-1: all)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--fda-only", action="store_true", help="skip the 9-task suite")
    p.add_argument("--parallel", action="store_true",
                   help="FDA also with -p (one job per visible GPU): its wall time, and the same generations")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "eval_results.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    write_data(work / "data")
    model = write_model(args.config, work / "model")
    limit_args = [] if args.limit < 0 else ["--limit", str(args.limit)]
    docs = {t: n if args.limit < 0 else min(n, args.limit) for t, (_, n, _) in SIZES.items()}
    suite_scale = sum(n for t, (_, n, _) in SIZES.items() if t != "fda") / sum(v for t, v in docs.items() if t != "fda")
    fda_scale = SIZES["fda"][1] / docs["fda"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"device": device, "config": str(args.config), "limit": args.limit, "dtype": args.dtype,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": []}
    rows = result["rows"]

    def report(row: dict) -> None:
        """Print and save each row as it comes: a run cut by a time limit keeps the rows it finished."""
        print(f"eval_bench: batch {row['batch']}: {row['run']} {row['seconds']:.0f} s", flush=True)
        args.out.write_text(json.dumps(result, indent=1))

    for batch in args.batch_sizes:
        if not args.fda_only:
            suite = shlex.split(HARNESS.format(model=model, dtype=args.dtype, tasks=SUITE, batch=batch,
                                               device=args.device))
            suite += ["--data_dir", str(work / "data"), "--output_path", str(work / f"suite_{batch}")] + limit_args
            seconds = timed(harness.main, suite)
            rows.append({"run": "9-task suite", "batch": batch, "seconds": seconds,
                         "full_estimate_s": seconds * suite_scale})
            report(rows[-1])
        for parallel in (False, True) if args.parallel else (False,):
            out = work / f"fda_{batch}{'_p' if parallel else ''}"
            fda_argv = shlex.split(FDA.format(batch=batch, model=model, out=out, limit=args.limit, device=args.device))
            seconds = timed(fda.main, fda_argv + ["--data_dir", str(work / "data")] + (["-p"] if parallel else []))
            rows.append({"run": "FDA (launch_hf.py" + (" -p)" if parallel else ")"), "batch": batch,
                         "seconds": seconds, "full_estimate_s": seconds * fda_scale})
            if parallel:
                single, split = (fda_generations(work / f"fda_{batch}{s}") for s in ("", "_p"))
                rows[-1]["same_generations_as_single"] = single == split
            report(rows[-1])

    print(f"\n{args.config.name} ({args.dtype}, random weights, synthetic data) on {device}; --limit {args.limit}")
    print("| run | batch | seconds | full-size estimate (s) |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        same = {True: " (same generations)", False: " (generations DIFFER)"}.get(r.get("same_generations_as_single"), "")
        print(f"| {r['run']}{same} | {r['batch']} | {r['seconds']:.1f} | {r['full_estimate_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
