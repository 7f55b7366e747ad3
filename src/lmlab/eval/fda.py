"""FDA by the JRT/Based protocol: `launch_hf.py -t based_fda --context_length 1000 --answer_length 50
--cutting_context --limit -1 -p` (the "Just read twice" repo's launcher, re-implemented).

Per document of hazyresearch/based-fda (validation; fields text, key, value):
1. with --cutting_context, drop the document if its value is empty or 1 character; strip the text;
   find the earliest case-insensitive mention of the key or the value; keep a window of at most
   `context_length - answer_length` tokens starting `window // 2` tokens before it (measured with the
   model's tokenizer, special tokens included, as the reference script does); when neither is found the
   anchor is the end of the text less its last character, so roughly the last `window // 2` tokens are
   kept; decode the window without special tokens;
2. prompt: remove trailing "<key>:" (case-insensitive), strip "\\n" then "." at both ends, add "." if
   missing, append " " + the key with its first letter upper-cased + ":" (e.g. "... . Applicant:");
3. lm-eval's fda request: greedy, at most 48 new tokens, cut at the first "\\n" (and at EOS); the prompt is
   encoded without BOS (`add_bos_token=False`);
4. lm-eval's `contains` (case-insensitive search of the escaped value) against the unstripped value.

`--limit N` counts documents after step 1's drop (the reference script counted before). Steps 1-2 are the
functions below; the task is `based_fda` (lmlab.eval.tasks.recall.BasedFDA), run through lm-eval by
`lmlab.eval.harness`, so the results JSON and the samples are lm-eval's own. `main` adds a compact
`records_<task>_<date>.jsonl` (prompt, generation, target, hit) beside lm-eval's samples file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval.utils import sanitize_model_name
from transformers import PreTrainedTokenizerBase

from lmlab.errors import ArgumentParser, UserError, command
from lmlab.eval import harness
from lmlab.eval.lm import tokenizer_threads


def keep_doc(doc: dict[str, Any]) -> bool:
    """The reference script drops documents whose value is empty or a single character."""
    return len(doc["value"]) > 1


def window_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], needles: list[list[str]],
                 window: int) -> list[str]:
    """For each text, at most `window` tokens of it around the earliest case-insensitive mention of any of its
    needles. Tokenised and decoded in batches, on the tokenizer's threads (one by one, FDA's ~1,100
    documents of up to thousands of tokens took seconds of every FDA command)."""
    texts = [text.strip() for text in texts]
    positions = []
    for text, mentions in zip(texts, needles):
        found = [m.start() for needle in mentions if (m := re.search(re.escape(needle), text, re.IGNORECASE))]
        positions.append(min(found) if found else -1)  # -1: text[:-1] below, the reference script's "not found"
    with tokenizer_threads():
        ids = tokenizer(texts)["input_ids"]
        anchors = [len(prefix) for prefix in tokenizer([t[:p] for t, p in zip(texts, positions)])["input_ids"]]
        starts = [max(0, anchor - window // 2) for anchor in anchors]
        return tokenizer.batch_decode([text_ids[start:start + window] for text_ids, start in zip(ids, starts)],
                                      skip_special_tokens=True)


def prompt(text: str, key: str) -> str:
    """The JRT/Based FDA prompt: the text, then " Key:"."""
    suffix = key + ":"
    while text.lower().endswith(suffix.lower()):
        text = text[: -len(suffix)]
    text = text.strip("\n").strip(".")
    if not text.endswith("."):
        text += "."
    return f"{text} {key[0].upper()}{key[1:]}:"


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = ArgumentParser(prog="launch_hf.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-m", "--model", action="append", required=True, help="model path or hub id (repeatable)")
    parser.add_argument("-t", "--task", action="append", choices=["based_fda"], default=[],
                        help="based_fda (the only task of this protocol; repeatable as in the original)")
    parser.add_argument("--batch-size", type=int, default=1, help="1 reproduces the paper")
    parser.add_argument("--limit", type=int, default=-1, help="documents per task; -1 = all")
    parser.add_argument("--context_length", type=int, default=1000, help="prompt window + answer, in tokens")
    parser.add_argument("--answer_length", type=int, default=50, help="tokens kept free for the answer")
    parser.add_argument("--cutting_context", action="store_true", help="window the text (the paper does)")
    parser.add_argument("--output_dir", default="output", help="results go to OUTPUT_DIR/<model>/")
    parser.add_argument("-p", "--parallelize", action="store_true",
                        help="data-parallel over all visible GPUs (one process each); a single job on CPU")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32", help="the model's dtype")
    parser.add_argument("--data_dir", help="local task data (default $LMLAB_EVAL_DATA); see lmlab.eval.harness")
    args = parser.parse_args(argv)
    check_arguments(args)
    return args


def text_window(context_length: object, answer_length: object,
                names: tuple[str, str] = ("--context_length", "--answer_length")) -> int:
    """The prompt's window of text in tokens, `context_length - answer_length`; UserError (naming the options
    as `names`) unless both are integers and the window is not empty. launch_hf.py's flags and based_fda's
    `--metadata` (which may hold any JSON) go through it."""
    for name, value in zip(names, (context_length, answer_length)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} {value!r}: expected an integer number of tokens")
    if answer_length < 1:
        raise UserError(f"{names[1]} {answer_length}: expected an integer >= 1")
    if context_length <= answer_length:
        raise UserError(f"{names[0]} {context_length} leaves no room for the document's text: it must be "
                        f"more than {names[1]} {answer_length} (the window is their difference)")
    return context_length - answer_length


def metadata_window(metadata: dict[str, Any]) -> int:
    """based_fda's window from lm-eval's `--metadata` (default: the paper's 1000 - 50 tokens)."""
    return text_window(metadata.get("context_length", 1000), metadata.get("answer_length", 50),
                       ("--metadata context_length", "--metadata answer_length"))


def check_arguments(args: argparse.Namespace) -> None:
    """The window must leave room for the context, the counts must be counts, the device and dtype usable, every
    model loadable and its results' folder writable (before any model loads). Paths are taken with `~` expanded."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected an integer >= 1")
    if args.limit == 0 or args.limit < -1:
        raise UserError(f"--limit {args.limit}: expected -1 (all documents) or a count >= 1")
    text_window(args.context_length, args.answer_length)
    harness.check_device(args.device)
    harness.check_dtype(args.dtype, f"--dtype {args.dtype}")
    args.output_dir = harness.expanded(args.output_dir)
    args.data_dir = harness.local_data_dir(args.data_dir)
    args.model = [harness.expanded(model) for model in args.model]
    for model in args.model:  # all of them before the first is evaluated
        harness.check_model_source(model, f"-m {model}", tokenizer=True)
        harness.check_output_path(args.output_dir, model, "--output_dir")


def harness_args(args: argparse.Namespace, model: str) -> list[str]:
    """lm-eval arguments for one model: the window options travel to the task as `--metadata`."""
    window = {"context_length": args.context_length, "answer_length": args.answer_length,
              "cutting_context": args.cutting_context}
    argv = ["--model", "hf", "--model_args", f"pretrained={model},dtype={args.dtype},add_bos_token=False",
            "--tasks", "based_fda", "--batch_size", str(args.batch_size),
            "--device", args.device, "--metadata", json.dumps(window), "--output_path", args.output_dir,
            "--log_samples"]
    if args.limit >= 0:
        argv += ["--limit", str(args.limit)]
    if args.data_dir:
        argv += ["--data_dir", args.data_dir]
    return argv


def write_records(samples_file: Path) -> Path:
    """records_<task>_<date>.jsonl: prompt, generation, target and hit of each of lm-eval's samples."""
    records = samples_file.with_name(samples_file.name.replace("samples_", "records_", 1))
    with samples_file.open() as src, records.open("w") as dst:
        for line in src:
            sample = json.loads(line)
            record = {"doc_id": sample["doc_id"], "prompt": sample["arguments"]["gen_args_0"]["arg_0"],
                      "generation": sample["filtered_resps"][0], "target": sample["target"],
                      "hit": sample["contains"]}
            dst.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records


@command("launch_hf.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    for model in args.model:
        hargs = harness_args(args, model)
        if args.parallelize and gpus > 1:
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
                       "-m", "lmlab.eval.harness", *hargs]
            code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        else:
            code = harness.evaluate(hargs)  # its errors are launch_hf.py's
        if code:
            return code
        out = Path(args.output_dir) / sanitize_model_name(model)
        samples = max(out.glob("samples_based_fda_*.jsonl"), key=lambda p: p.stat().st_mtime)
        print(f"based_fda: per-sample records in {write_records(samples)}")
    return 0
