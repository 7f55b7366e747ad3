"""The paper's training command, verbatim but for the model, the data (a local corpus) and the step count, on
one GPU whose memory is capped to a smaller card's (default 79 GiB, what an 80 GB H100 reports), so that an
H200 tells whether the command fits an H100. With --training.micro_batch_size left at 0 the trainer measures
how many of the 16 rows fit (lmlab.train.fit_micro_batch) and says so; the log's memory must stay under the cap.
    python bench/experiments/paper_command.py configs/sync_hqlt_ch64_dynamic-vector-mixing_noconv_1B.json
The trainer runs in this process (one GPU needs no torchrun), after the cap is set."""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from lmlab import train
from lmlab.quickstart import python_corpus, train_tokenizer, write_corpus

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("--seq-len", type=int, default=2240)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--memory-cap-gib", type=float, default=79.0)
args = parser.parse_args()

total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), 0)
print(f"paper_command: {torch.cuda.get_device_name(0)}, memory capped at {args.memory_cap_gib} GiB "
      f"of {total / 2**30:.0f}", flush=True)
work = Path(tempfile.mkdtemp())
write_corpus(work)
train_tokenizer(python_corpus(), work / "tokenizer")
dump = work / "exp"
code = train.main(
    f"--job.config_file flame/models/fla.toml --job.dump_folder {dump} --model.config {args.config} "
    f"--model.tokenizer_path {work / 'tokenizer'} --optimizer.name AdamW --optimizer.eps 1e-15 --optimizer.lr 1e-3 "
    "--lr_scheduler.warmup_steps 1024 --lr_scheduler.lr_min 0.1 --lr_scheduler.decay_type cosine "
    f"--training.batch_size 16 --training.seq_len {args.seq_len} --training.gradient_accumulation_steps 4 "
    f"--training.steps {args.steps} --training.max_norm 1.0 --training.skip_nan_inf "
    f"--training.dataset {work / 'train.jsonl'} --training.dataset_split train --training.num_workers 12 "
    "--training.prefetch_factor 2 --training.seed 42 --training.compile --checkpoint.interval 2048 "
    "--checkpoint.load_step -1 --checkpoint.keep_latest_k 2 --metrics.log_freq 1 "
    "--checkpoint.enable_checkpoint false".split())
for line in (dump / "metrics.jsonl").read_text().splitlines() if (dump / "metrics.jsonl").is_file() else []:
    record = json.loads(line)
    print("paper_command: step", record["step"], {k: round(record[k], 3) for k in
          ("loss", "tokens_per_second_per_device", "mfu", "memory_gib") if k in record}, flush=True)
sys.exit(code)
