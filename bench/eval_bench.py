"""Evaluation wall time (issues 6, 22): the paper's 9-task lm-eval suite and its FDA command, full size,
lmlab's scheduling against lm-eval's stock HF model in the same run.

    python bench/eval_bench.py --config configs/gated_deltanet_340M.json          # one GPU: the issue's targets

Needs no network and no trained model: it writes a randomly initialised model of `--config` (timing does not
depend on the weights, but generation length does: random weights rarely emit "\\n", so generation tasks run
their full 48 tokens, an upper bound) and synthetic task data in each hub dataset's schema with the real
numbers of documents and lengths close to the real ones (`SIZES`).

Rows (wall time of the whole command: model load and task building included):
- `lmlab`: the paper's two commands verbatim (`--model hf`, i.e. lmlab.eval.lm.LmlabLM) at each of
  `--batch-sizes` (default 1, the paper's), on all documents: measured, not scaled;
- `stock`: the same commands on lm-eval's own `HFLM` (`--model hf-stock`) with `--stock-limit` documents per
  task (default 20; 0 skips), and its full-size estimate (seconds x real / limited documents per task group;
  start-up is scaled too, so an upper bound): the stock path takes hours at full size.
`--compare N`: both paths on the first N documents of each task only, for the comparison of their
outputs (e.g. `--dtype float32 --compare 5`: issue 22's loglikelihoods within 1e-4 and same generations), in
place of the full-size timing; log-likelihood differences are also given in spacings of the dtype, and each
differing pair of generations is followed to the step where they part: which path took the token a float32
model likes less there, and the two tokens' logit margin (`Divergence`).
`--parallel` also runs FDA with `-p` (one job per visible GPU) and checks that it generates the same as one
job. `--tasks` runs a part of the suite (e.g. `--tasks hellaswag`), `--lmlab-model-args` adds model args to
lmlab's suite rows (e.g. `state_memory_gib=18`); `--profile` runs lmlab's commands (not `-p`'s) under the
torch profiler and appends their tables of kernels and host ops to `<--out>.profile.txt` (their wall times
then include the profiler's cost). Prints a Markdown table last and writes JSON to `--out`
after every row, with lmlab's seconds per task and request type (from the results JSON). The work folder
(model, data, outputs) goes at the end unless `--keep`.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import lmlab  # noqa: E402,F401  (registers the model types)
from lmlab.eval import fda, harness  # noqa: E402
from lmlab.quickstart import python_corpus, train_tokenizer  # noqa: E402
from profiling import profile_to  # noqa: E402

SUITE = "wikitext,lambada_openai,piqa,hellaswag,winogrande,arc_easy,arc_challenge,squad_completion,swde"
HARNESS = ("--model {lm} --model_args pretrained={model},dtype={dtype}{extra} --tasks {tasks} --batch_size {batch} "
           "--num_fewshot 0 --device {device} --show_config")
FDA = ("--batch-size {batch} -m {model} -t based_fda --output_dir {out} --context_length 1000 --answer_length 50 "
       "--cutting_context --limit {limit} --device {device} --dtype {dtype}")
GENERATION_TASKS = {"squad_completion", "swde", "based_fda"}
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
    """A randomly initialised model of `config` with a 4096-token BPE tokenizer (bf16 safetensors), given one
    visible added token for each further id of the model's vocabulary: a random model generates mostly ids
    past the BPE's, which would decode to nothing and hide differing generations from the comparisons."""
    train_tokenizer(python_corpus(), root)
    model_config = AutoConfig.for_model(**json.loads(config.read_text()))
    tokenizer = AutoTokenizer.from_pretrained(root)
    if len(tokenizer) < model_config.vocab_size:
        tokenizer.add_tokens([f"⟨{i}⟩" for i in range(len(tokenizer), model_config.vocab_size)])
        tokenizer.save_pretrained(root)
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


def fda_command(model: Path, out: Path, batch: int, limit: int, device: str, dtype: str) -> list[str]:
    """launch_hf.py's arguments: the paper's FDA command, with the run's device and dtype (its own default
    dtype is bfloat16 on a GPU, whatever the suite's)."""
    return shlex.split(FDA.format(batch=batch, model=model, out=out, limit=limit, device=device, dtype=dtype))


def fda_generations(out: Path) -> dict[int, str]:
    """doc_id -> generation of an FDA run's per-sample records."""
    (records,) = out.rglob("records_based_fda_*.jsonl")
    return {r["doc_id"]: r["generation"] for r in map(json.loads, records.open())}


def lmlab_seconds(out: Path) -> dict[str, float]:
    """lmlab's seconds per task and request type, from a run's results JSON."""
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())["config"].get("lmlab_scheduling", {}).get("seconds", {})


def samples(out: Path) -> dict[tuple[str, int], dict]:
    """(task, doc_id) -> lm-eval's sample (its responses and arguments), from a run's samples files."""
    found = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        for sample in map(json.loads, path.open()):
            found[task, sample["doc_id"]] = sample
    return found


def ulps(a: float, b: float, dtype: torch.dtype) -> float:
    """|a - b| in units of `dtype`'s spacing at the larger magnitude: lm-eval rounds a request's log-likelihood
    to the logits' dtype, so in bf16 a sum of -300 moves in steps of 2."""
    magnitude = max(abs(a), abs(b))
    spacing = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude)) if magnitude else torch.finfo(dtype).eps
    return abs(a - b) / spacing


class Divergence:
    """Why two greedy generations of one prompt differ. Both are followed token by token against a float32
    model at batch 1 (the whole context recomputed at each step) to the step where they part; there it gives
    each path's token's rank among float32's 10 best (None: not among them), which path took the token
    float32 likes less (`leaves`; "both" when neither token is among the 10), float32's logit margin between
    the two tokens and the same margin in the run's dtype at batch 1 (negative: that forward prefers the
    other token), and the step where the shared tokens had already left float32's greedy path together
    (`both_left_at`, or None). A margin at float32's rounding level, or smaller than the dtype's own error
    there (the two margins' difference), is a near-tie that a change of kernel or padding may flip (random
    weights make them common); a large one, or a token outside the 10 best, would be a bug."""

    def __init__(self, model: Path, device: str, dtype: str):
        self.path, self.device, self.dtype = model, device, getattr(torch, dtype)

    @functools.cached_property
    def models(self) -> list[torch.nn.Module]:  # loaded at the first difference only: float32, the run's dtype
        dtypes = [torch.float32] + ([self.dtype] if self.dtype != torch.float32 else [])
        return [AutoModelForCausalLM.from_pretrained(self.path, dtype=d).to(self.device).eval() for d in dtypes]

    @functools.cached_property
    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.path)

    def text(self, tokens: list[int], until: list[str]) -> str:
        """The generated text as lm-eval keeps it: decoded, cut at each stop string."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in until:
            text = text.split(stop)[0]
        return text

    def ended(self, tokens: list[int], until: list[str], max_tokens: int) -> bool:
        """Whether generating `tokens` ends the generation: the token limit, end of text or a stop string."""
        return (len(tokens) == max_tokens or tokens[-1] == self.tokenizer.eos_token_id
                or any(stop in self.tokenizer.decode(tokens) for stop in until))

    def follows(self, path: str, tokens: list[int], until: list[str], max_tokens: int) -> bool:
        """Whether a generated `path` is `tokens`' generation: their text once they end it, else a continuation
        of it (a path that runs on where the other stops parts from it there). A trailing partial UTF-8
        character (byte-level tokens may split one) decodes as U+FFFD until a later token completes it."""
        text = self.text(tokens, until)
        return path == text if self.ended(tokens, until, max_tokens) else path.startswith(text.rstrip("\ufffd"))

    @torch.no_grad()
    def __call__(self, prompt: str, ours: str, theirs: str, bos: bool, gen_kwargs: dict) -> dict:
        """`gen_kwargs`: the request's, as lm-eval's samples record them (`until`, `max_gen_toks`)."""
        context, until, limit = (self.tokenizer.encode(prompt, add_special_tokens=bos), gen_kwargs["until"],
                                 gen_kwargs["max_gen_toks"])
        shared: list[int] = []
        both_left_at = None
        while not shared or not self.ended(shared, until, limit):
            ids = torch.tensor([context + shared], device=self.device)
            logits = self.models[0](ids).logits[0, -1].float()
            best = logits.topk(10).indices.tolist()
            ours_token, theirs_token = (next((t for t in best if self.follows(path, shared + [t], until, limit)), None)
                                        for path in (ours, theirs))
            if ours_token is not None and ours_token == theirs_token:
                if ours_token != best[0] and both_left_at is None:
                    both_left_at = len(shared)
                shared.append(ours_token)
                continue
            ranks = {"ours": None if ours_token is None else best.index(ours_token),
                     "theirs": None if theirs_token is None else best.index(theirs_token)}
            worse = {name: len(best) if rank is None else rank for name, rank in ranks.items()}
            # equally bad only when neither token is among the 10
            leaves = "both" if worse["ours"] == worse["theirs"] else max(worse, key=worse.get)
            found = {"leaves": leaves, "step": len(shared), "ranks": ranks, "both_left_at": both_left_at}
            if None not in ranks.values():
                preferred, other = sorted((ours_token, theirs_token), key=best.index)
                run = self.models[-1](ids).logits[0, -1].float()
                found |= {"margin_fp32": float(logits[preferred] - logits[other]),
                          "margin": float(run[preferred] - run[other])}
            return found
        return {"leaves": None}  # the same tokens: they differ in something other than tokens


def differences(stock: Path, ours: Path, dtype: torch.dtype, divergence: Divergence | None = None) -> dict:
    """lmlab's responses against the stock model's on the documents both ran: the largest loglikelihood
    difference, also in units of `dtype`'s spacing (lm-eval rounds each sum to it), wikitext's rolling sums
    (of tens of thousands) relatively, how many is_greedy flags and generations differ, and, given
    `divergence`, where each differing generation parts and by what logit margin."""
    stock_samples, our_samples = samples(stock), samples(ours)
    counts = {"requests": 0, "max_abs_loglikelihood_diff": 0.0, "max_loglikelihood_diff_ulps": 0.0,
              "max_rel_rolling_diff": 0.0, "is_greedy_differ": 0, "generations_differ": 0}
    diverged = []
    for (task, doc), sample in stock_samples.items():
        for (a,), (b,) in zip(sample["resps"], our_samples[task, doc]["resps"]):  # one response per request
            counts["requests"] += 1
            if task in GENERATION_TASKS:
                counts["generations_differ"] += a != b
                if a != b and divergence is not None:  # FDA's prompts have no BOS (launch_hf.py's add_bos_token)
                    prompt, gen_kwargs = (sample["arguments"]["gen_args_0"][arg] for arg in ("arg_0", "arg_1"))
                    diverged.append({"task": task, "doc": doc,
                                     **divergence(prompt, b, a, bos=task != "based_fda", gen_kwargs=gen_kwargs)})
            elif task == "wikitext":  # the rolling loglikelihood of a whole document
                diff = abs(float(a) - float(b)) / max(abs(float(a)), 1.0)
                counts["max_rel_rolling_diff"] = max(counts["max_rel_rolling_diff"], diff)
            else:  # loglikelihood: (logprob, is_greedy)
                counts["is_greedy_differ"] += str(a[1]) != str(b[1])
                theirs, mine = float(a[0]), float(b[0])
                counts["max_abs_loglikelihood_diff"] = max(counts["max_abs_loglikelihood_diff"], abs(theirs - mine))
                counts["max_loglikelihood_diff_ulps"] = max(counts["max_loglikelihood_diff_ulps"],
                                                            ulps(theirs, mine, dtype))
    if diverged:
        counts["diverged"] = diverged
    return counts


def config_file(name: str) -> Path:
    """`--config`: a name in configs/ or a JSON path, as train_bench.py's --configs; checked before any work."""
    path = Path(name) if name.endswith(".json") else REPO / "configs" / f"{name}.json"
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def suite_tasks(names: str) -> str:
    """`--tasks`: a comma-separated part of the paper's suite, in the suite's order; checked before any work."""
    asked = names.split(",")
    unknown = [t for t in asked if t not in SUITE.split(",")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"not in the paper's suite ({SUITE}): {','.join(unknown) or repr(names)}")
    return ",".join(t for t in SUITE.split(",") if t in asked)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=config_file, default=REPO / "configs" / "gated_deltanet_340M.json",
                   help="a name in configs/ or a JSON path")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                   help="lmlab rows (1: the paper's); a size given twice runs twice (the second on warm caches)")
    p.add_argument("--stock-limit", type=int, default=20,
                   help="docs per task for lm-eval's stock HF model at batch 1 (0: no stock rows)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--fda-only", action="store_true", help="skip the 9-task suite")
    p.add_argument("--tasks", type=suite_tasks, default=SUITE, help="a part of the suite, comma-separated")
    p.add_argument("--lmlab-model-args", default="", metavar="K=V,...",
                   help="more --model_args for lmlab's suite rows, e.g. state_memory_gib=18 (launch_hf.py takes none)")
    p.add_argument("--profile", action="store_true",
                   help="lmlab's commands under the torch profiler: tables appended to <--out>.profile.txt")
    p.add_argument("--compare", type=int, metavar="N",
                   help="lmlab's rows on the first N docs per task too (and the stock rows at N): outputs compared, "
                        "no full-size timing")
    p.add_argument("--parallel", action="store_true",
                   help="FDA also with -p (one job per visible GPU): its wall time, and the same generations")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "eval_results.json")
    p.add_argument("--keep", action="store_true",
                   help="keep the work folder (model, data, every run's outputs) instead of removing it at the end")
    args = p.parse_args(argv)
    if args.compare is not None:
        if args.compare < 1:
            p.error("--compare takes a number of documents >= 1")
        args.stock_limit = args.compare

    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    try:
        return run(args, work)
    finally:  # a 1.3B model is 2.6 GB: runs of several configs would fill a disk
        if args.keep:
            print(f"eval_bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    """Every run `args` asks for, in the folder `work`."""
    write_data(work / "data")
    model = write_model(args.config, work / "model")
    real = {t: n for t, (_, n, _) in SIZES.items()}
    limited = {t: min(n, args.stock_limit) for t, n in real.items()}
    suite_docs = [sum(n for t, n in docs.items() if t in args.tasks.split(",")) for docs in (real, limited)]
    suite_scale = suite_docs[0] / max(1, suite_docs[1])
    fda_scale = real["fda"] / max(1, limited["fda"])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"device": device, "config": str(args.config), "dtype": args.dtype, "stock_limit": args.stock_limit,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": []}
    rows = result["rows"]
    data = ["--data_dir", str(work / "data")]
    suite_name = "9-task suite" if args.tasks == SUITE else f"suite: {args.tasks}"
    profile = args.out.with_suffix(".profile.txt")

    def lmlab_timed(fn, argv: list[str], title: str) -> float:
        """timed(), under the profiler with --profile."""
        if not args.profile:
            return timed(fn, argv)
        with profile_to(profile, f"{args.config.stem} {title}", torch.device(args.device)):
            return timed(fn, argv)

    def report(row: dict) -> None:
        """Print and save each row as it comes: a run cut by a time limit keeps the rows it finished."""
        rows.append(row)
        print(f"eval_bench: {row['path']} batch {row['batch']}: {row['run']} {row['seconds']:.0f} s", flush=True)
        args.out.write_text(json.dumps(result, indent=1))

    def suite_argv(lm: str, batch: int, out: Path, limit: list[str]) -> list[str]:
        extra = f",{args.lmlab_model_args}" if lm == "hf" and args.lmlab_model_args else ""
        argv = shlex.split(HARNESS.format(lm=lm, model=model, dtype=args.dtype, extra=extra, tasks=args.tasks,
                                          batch=batch, device=args.device))
        return argv + data + ["--output_path", str(out), "--log_samples"] + limit

    def fda_argv(batch: int, out: Path, limit: int) -> list[str]:
        return fda_command(model, out, batch, limit, args.device, args.dtype) + data

    lmlab_limit = [] if args.compare is None else ["--limit", str(args.compare)]
    full_size = args.compare is None
    for run, batch in enumerate(args.batch_sizes):
        if not args.fda_only:
            out = work / f"suite_{run}"
            argv = suite_argv("hf", batch, out, lmlab_limit)
            seconds = lmlab_timed(harness.main, argv, f"{suite_name}, batch {batch}")
            report({"path": "lmlab", "run": suite_name, "batch": batch, "seconds": seconds, "full_size": full_size,
                    "profiled": args.profile, "seconds_per_task": lmlab_seconds(out)})
        for parallel in (False, True) if args.parallel else (False,):
            out = work / f"fda_{run}{'_p' if parallel else ''}"
            argv = fda_argv(batch, out, args.compare or -1)
            seconds = timed(fda.main, argv + ["-p"]) if parallel else lmlab_timed(fda.main, argv, f"FDA, batch {batch}")
            row = {"path": "lmlab", "run": "FDA (launch_hf.py" + (" -p)" if parallel else ")"), "batch": batch,
                   "seconds": seconds, "full_size": full_size, "profiled": args.profile and not parallel,
                   "seconds_per_task": lmlab_seconds(out)}
            if parallel:
                single, split = (fda_generations(work / f"fda_{run}{s}") for s in ("", "_p"))
                row["same_generations_as_single"] = single == split
            report(row)
    if args.stock_limit > 0:
        limit = ["--limit", str(args.stock_limit)]
        dtype = getattr(torch, args.dtype)
        divergence = Divergence(model, args.device, args.dtype) if args.compare is not None else None
        if not args.fda_only:
            seconds = timed(harness.main, suite_argv("hf-stock", 1, work / "stock_suite", limit))
            report({"path": "stock", "run": suite_name, "batch": 1, "seconds": seconds, "full_size": False,
                    "full_estimate_s": seconds * suite_scale,
                    "lmlab_vs_stock": differences(work / "stock_suite", work / "suite_0", dtype, divergence)})
        # launch_hf.py's lm-eval arguments, on the stock model
        hargs = fda.harness_args(fda.parse_args(fda_argv(1, work / "stock_fda", args.stock_limit)), str(model))
        hargs[hargs.index("hf")] = "hf-stock"
        seconds = timed(harness.main, hargs)
        report({"path": "stock", "run": "FDA (launch_hf.py)", "batch": 1, "seconds": seconds, "full_size": False,
                "full_estimate_s": seconds * fda_scale,
                "lmlab_vs_stock": differences(work / "stock_fda", work / "fda_0", dtype, divergence)})

    if args.profile:
        print(f"eval_bench: profiles in {profile}")
    print(f"\n{args.config.name} ({args.dtype}, random weights, synthetic data of the real sizes) on {device}")
    print("| path | run | batch | seconds | full size (s) |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        same = r.get("same_generations_as_single")
        notes = {True: " (same generations)", False: " (generations DIFFER)"}.get(same, "")
        notes += " (profiled)" if r.get("profiled") else ""
        full = (f"{r['seconds']:.0f}" if r["full_size"] else "-" if "full_estimate_s" not in r
                else f"≈ {r['full_estimate_s']:.0f} (from --stock-limit {args.stock_limit})")
        print(f"| {r['path']} | {r['run']}{notes} | {r['batch']} | {r['seconds']:.1f} | {full} |")
    for r in rows:
        if "lmlab_vs_stock" in r:
            print(f"{r['run']}, lmlab against stock on the stock run's documents: {r['lmlab_vs_stock']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
