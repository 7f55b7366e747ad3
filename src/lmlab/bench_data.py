"""Loader benchmark: tokens/s of lmlab's training data pipeline, per worker and in total.

    lmlab bench-data [--workers 0,1,2] [--seconds 10]

Built locally, no network:
- corpus: English prose found on any machine with Python: the language-reference topics of `pydoc_data`
  (the text of `help("FOR")` etc.) and, for every standard-library module, its docstrings joined as one
  document and its comments as another (sources parsed with `ast`/regex, nothing imported); documents of
  at least 200 characters. About 3.3 MB on CPython 3.11 (enough for 32k BPE merges); repeated in shuffled
  order up to --corpus-mb and written as one jsonl file.
- tokenizer: byte-level BPE with a 32k vocabulary trained on that corpus with `tokenizers` (Llama-sized
  vocabulary; BOS/EOS added).
The pipeline runs exactly as in training (`lmlab.data.build_dataloader`: jsonl -> shuffled reads ->
batched tokenization -> packing into batch_size x seq_len rows). "Per worker" is the total divided by the
number of worker processes (0 workers: everything in the main process, counted as one). Tokenization runs
on one thread per process here (TOKENIZERS_PARALLELISM=false unless set), so "per worker" means per core.
"Tokens per CPU-s" divides by the CPU time of all processes (main + workers): the per-core figure that holds
on a machine shared with other jobs, where wall-clock rates fall with the load.
"""
from __future__ import annotations

import ast
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from lmlab.errors import ArgumentParser, command


def corpus_documents() -> list[str]:
    """pydoc's language-reference topics, and per standard-library module its docstrings (one document)
    and its comments (another); nothing is imported, the sources are parsed."""
    from pydoc_data.topics import topics

    docs = [text.strip() for text in topics.values()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if {"site-packages", "test", "tests", "idle_test"} & set(path.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs.append("\n\n".join(filter(None, (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)))))
        docs.append("\n".join(m.group(1) for m in re.finditer(r"^\s*#+ ?(.*\w.*)$", source, re.M)))
    return [d for d in docs if len(d) >= 200]


def write_corpus(docs: list[str], path: Path, megabytes: float, seed: int = 0) -> int:
    """Shuffled repetitions of `docs` as jsonl, about `megabytes` of text; returns the document count."""
    rng = random.Random(seed)
    target, size, count = megabytes * 1e6, 0, 0
    with open(path, "w") as f:
        while size < target:
            for doc in rng.sample(docs, len(docs)):
                f.write(json.dumps({"text": doc}) + "\n")
                size += len(doc)
                count += 1
    return count


def train_tokenizer(docs: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.save_pretrained(out)
    return wrapped


def _cpu_seconds() -> float:
    """CPU time of this process and its children (the loader workers) so far."""
    import psutil

    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    return sum(t.user + t.system for t in (p.cpu_times() for p in procs))


def measure(training, tokenizer, seconds: float) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of all processes) after a warm-up (worker start-up
    is not counted). The CPU figure is what one core does, whatever else runs on the machine."""
    from lmlab.data import build_dataloader

    loader = build_dataloader(training, tokenizer, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(max(1, training.num_workers) * training.prefetch_factor):
        next(it)
    tokens, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - start < seconds:
        tokens += next(it)["input_ids"].numel()
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    del it
    return tokens / wall, tokens / cpu


@command("lmlab bench-data")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="lmlab bench-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="0,1,2", help="comma list of num_workers values to measure")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--corpus-mb", type=float, default=40.0, help="size of the generated corpus")
    parser.add_argument("--varlen", action="store_true", help="also build cu_seqlens")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write the corpus and tokenizer (default: a temp dir)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker (see the docstring)

    from lmlab.config import Training

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        docs = corpus_documents()
        chars = sum(map(len, docs))
        print(f"corpus: {len(docs)} documents, {chars / 1e6:.2f} MB (stdlib docstrings and comments + pydoc topics)")
        tokenizer = train_tokenizer(docs, args.vocab_size, root / "tokenizer")
        per_char = sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]) / chars
        print(f"tokenizer: byte-level BPE, vocab {len(tokenizer)}, {1 / per_char:.2f} characters per token "
              f"({time.perf_counter() - t0:.0f} s to build)")
        count = write_corpus(docs, root / "corpus.jsonl", args.corpus_mb)
        print(f"data: {root / 'corpus.jsonl'} ({count} documents, ~{args.corpus_mb:g} MB)")
        print(f"batches: {args.batch_size} x {args.seq_len} tokens, varlen={args.varlen}")
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{'workers':>7}  {'tokens/s total':>14}  {'tokens/s per worker':>19}  {'tokens per CPU-s':>16}")
        for workers in [int(w) for w in args.workers.split(",")]:
            training = Training(dataset=str(root / "corpus.jsonl"), batch_size=args.batch_size,
                                seq_len=args.seq_len, context_len=args.seq_len, varlen=args.varlen,
                                num_workers=workers, prefetch_factor=2)
            rate, per_cpu = measure(training, tokenizer, args.seconds)
            print(f"{workers:>7}  {rate:>14,.0f}  {rate / max(1, workers):>19,.0f}  {per_cpu:>16,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
