"""The paper's three commands, verbatim, as argument lists for the tests (sizes shrunk where they run)."""
import shlex

TRAIN = shlex.split(
    """--job.config_file flame/models/fla.toml --job.dump_folder exp/mymodel \
  --model.config configs/<model>.json --model.tokenizer_path fla-hub/transformer-1.3B-100B \
  --optimizer.name AdamW --optimizer.eps 1e-15 --optimizer.lr 1e-3 \
  --lr_scheduler.warmup_steps 1024 --lr_scheduler.lr_min 0.1 --lr_scheduler.decay_type cosine \
  --training.batch_size 16 --training.seq_len 2048 --training.gradient_accumulation_steps 4 \
  --training.steps 28672 --training.max_norm 1.0 --training.skip_nan_inf \
  --training.dataset HuggingFaceFW/fineweb-edu --training.dataset_name sample-100BT \
  --training.dataset_split train --training.num_workers 12 --training.prefetch_factor 2 \
  --training.seed 42 --training.compile --checkpoint.interval 2048 --checkpoint.load_step -1 \
  --checkpoint.keep_latest_k 2 --metrics.log_freq 1"""
)


def train_args(**overrides: str) -> list[str]:
    """The paper's training flags with some values replaced: train_args(**{"training.steps": "20"})."""
    args = list(TRAIN)
    for key, value in overrides.items():
        flag = f"--{key}"
        if flag in args:
            i = args.index(flag)
            if value is None:  # drop the flag (and its value, if it has one)
                has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
                del args[i : i + (2 if has_value else 1)]
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                args[i + 1] = value
            else:
                args.insert(i + 1, value)
        elif value is not None:
            args += [flag, value]
    return args
