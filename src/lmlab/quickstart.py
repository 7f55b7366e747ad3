"""The embedded quickstart (`make quickstart`): a tiny Gated DeltaNet trained on CPU, evaluated and sampled.

No network: the corpus is English text that ships with every Python installation — the reference
manual's topics (`pydoc_data.topics`) and the docstrings of the standard library's modules, classes and
functions — so the run is the same on any machine. A 4096-token BPE tokenizer is trained on it with the
`tokenizers` library (as many tokens as the model config's vocab_size), then the model is trained through the
same `bash train.sh` command as the paper's runs, and evaluated on held-out documents. The defaults (a 2-layer
model, 2048 tokens, 250 steps of 16 x 128 tokens) are sized to finish in a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import ast
import json
import math
import os
import random
import subprocess
import sys
import sysconfig
import time
from argparse import ArgumentDefaultsHelpFormatter
from pathlib import Path

from lmlab.errors import ArgumentParser, command

REPO = Path(__file__).resolve().parents[2]


def python_corpus(min_chars: int = 300) -> list[str]:
    """English documents from the Python installation itself: manual topics and stdlib docstrings."""
    from pydoc_data.topics import topics

    docs = [text for text in topics.values() if len(text) >= min_chars]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def write_corpus(out: Path, valid_fraction: float = 0.05, seed: int = 0) -> tuple[Path, list[str]]:
    """Shuffle, split, and write train.jsonl; return its path and the held-out documents."""
    docs = python_corpus()
    random.Random(seed).shuffle(docs)
    n_valid = max(1, int(len(docs) * valid_fraction))
    valid, train = docs[:n_valid], docs[n_valid:]
    out.mkdir(parents=True, exist_ok=True)
    train_path = out / "train.jsonl"
    with open(train_path, "w") as f:
        for doc in train:
            f.write(json.dumps({"text": doc}) + "\n")
    with open(out / "valid.jsonl", "w") as f:
        for doc in valid:
            f.write(json.dumps({"text": doc}) + "\n")
    return train_path, valid


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 4096) -> None:
    """A byte-level BPE tokenizer with <s> (BOS), </s> (EOS) and <pad> (batched evaluation pads with it),
    saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],  # ids 0, 1, 2 as in fla-hub's Llama tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=True
    )
    wrapped.save_pretrained(out)


def heldout_perplexity(model, tokenizer, docs: list[str], seq_len: int, batch_size: int = 16) -> float:
    """Token-level perplexity on held-out documents, each scored on its first `seq_len` tokens. Batched and
    right-padded (labels -100 there): a causal model's outputs before the padding do not depend on it."""
    import torch

    rows = [ids[:seq_len] for ids in tokenizer(docs).input_ids if len(ids) >= 2]
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in batch])
            labels = torch.tensor([row + [-100] * (width - len(row)) for row in batch])
            tokens = sum(len(row) - 1 for row in batch)
            total_loss += float(model(input_ids=ids, labels=labels).loss) * tokens  # the mean over `tokens`
            total_tokens += tokens
    return math.exp(total_loss / total_tokens)


@command("python -m lmlab.quickstart")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m lmlab.quickstart", description=__doc__.splitlines()[0],
                            formatter_class=ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="exp/quickstart",
                        help="where everything is written (data, tokenizer, the run in OUT/run); rerunning starts over")
    parser.add_argument("--config", default="configs/quickstart_gated_deltanet.json",
                        help="the model config (its vocab_size is the tokenizer's size)")
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step")
    args = parser.parse_args(argv)

    from lmlab.modeling import load_model_config

    vocab_size = load_model_config(str(REPO / args.config)).vocab_size  # a bad config: one line, before any work
    out = Path(args.out)
    started = time.time()
    print(f"[1/4] corpus: manual topics and standard-library docstrings of this Python, into {out}/data")
    train_path, valid_docs = write_corpus(out / "data")
    print(f"[2/4] tokenizer: byte-level BPE, {vocab_size} tokens")
    texts = [json.loads(line)["text"] for line in train_path.read_text().splitlines()]
    train_tokenizer(texts, out / "tokenizer", vocab_size)

    dump = out / "run"
    print(f"[3/4] training {args.config} for {args.steps} steps through train.sh (its log lines and, in a "
          "terminal, its progress bar show the ETA)")
    command = [
        "bash", str(REPO / "train.sh"),
        "--job.config_file", str(REPO / "flame/models/fla.toml"), "--job.dump_folder", str(dump),
        "--job.overwrite", "--job.print_args", "false",
        "--model.config", str(REPO / args.config), "--model.tokenizer_path", str(out / "tokenizer"),
        "--optimizer.name", "AdamW", "--optimizer.eps", "1e-15", "--optimizer.lr", "3e-3",
        "--lr_scheduler.warmup_steps", str(max(args.steps // 10, 1)), "--lr_scheduler.lr_min", "0.1",
        "--lr_scheduler.decay_type", "cosine",
        "--training.batch_size", str(args.batch_size), "--training.seq_len", str(args.seq_len),
        "--training.context_len", str(args.seq_len), "--training.gradient_accumulation_steps", "1",
        "--training.steps", str(args.steps), "--training.max_norm", "1.0", "--training.skip_nan_inf",
        "--training.dataset", str(train_path), "--training.num_workers", "1", "--training.seed", "42",
        "--checkpoint.interval", str(max(args.steps // 2, 1)), "--checkpoint.load_step", "-1",
        "--checkpoint.keep_latest_k", "2", "--metrics.log_freq", str(max(args.steps // 20, 1)),
    ]
    # One thread: a model this small gains little from a second one, and on a busy 2-core machine every
    # multi-threaded op waits for a preempted thread (4x slower steps at load 4, measured).
    env = {**os.environ, "NGPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        print(f"error: the quickstart's training run failed (exit code {result.returncode}); its output is above",
              file=sys.stderr)
        return result.returncode

    print("[4/4] evaluation on held-out documents")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lmlab  # noqa: F401
    from lmlab.metrics import read_metrics
    from lmlab.plot import plot_runs
    from lmlab.train import continue_command

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(dump).eval()
    tokenizer = AutoTokenizer.from_pretrained(dump)
    perplexity = heldout_perplexity(model, tokenizer, valid_docs, args.seq_len)
    prompt = "The for statement is used to"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    # greedy decoding of a model this small loops on one phrase; a repetition penalty keeps it reading on
    sample = model.generate(ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.3)
    text = tokenizer.decode(sample[0], skip_special_tokens=True)
    records = read_metrics(dump)
    plot_path = plot_runs([dump], dump / "loss.png")

    print("\n=== quickstart summary ===")
    print(f"loss: first logged {records[0]['loss']:.3f} (step {records[0]['step']}) -> "
          f"final {records[-1]['loss']:.3f} (step {records[-1]['step']})")
    print(f"held-out perplexity: {perplexity:.1f} on {len(valid_docs)} documents (vocabulary {vocab_size})")
    print(f"greedy sample (repetition penalty 1.3): {text!r}")
    print(f"outputs: checkpoints {dump / 'checkpoint'}, HF model {dump} (config.json, model.safetensors, tokenizer),")
    print(f"         metrics {dump / 'metrics.jsonl'} and {dump / 'tb'}, plot {plot_path}")
    print(f"train it longer (continues from step {args.steps}; rerunning the quickstart starts over): "
          f"NGPU=1 {continue_command(dump / 'job_config.toml')} --training.steps {2 * args.steps}")
    print(f"wall time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
