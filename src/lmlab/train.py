"""The training loop. Launched by `train.sh` through torchrun (`python -m lmlab.train <flags>`).

Reads top to bottom: config -> distributed setup -> tokenizer, model, optimizer, data -> resume ->
the loop (gradient accumulation, clipping, non-finite skipping, logging, checkpoints) -> HF export.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import shlex
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import lmlab  # noqa: F401  (registers lmlab's model families with transformers' Auto classes)
from lmlab import dumplock
from lmlab.checkpoint import Checkpointer, export_hf
from lmlab.config import RECORD_NAME, JobConfig, parse_args
from lmlab.data import build_dataloader, data_epoch, load_sources
from lmlab.distributed import DTYPES, Dist, init_distributed, parallelize
from lmlab.dump import (
    check_dump_contents, check_dump_folder, check_free_space, clear_previous_run, dump_write_failed,
    prepare_dump_folder,
)
from lmlab.flops import flops_per_token, peak_flops
from lmlab.kernels import dispatch
from lmlab.metrics import MetricLogger, start_wandb
from lmlab.errors import UserError, run_command
from lmlab.modeling import build_model, import_custom_models, kernel_backend, load_tokenizer
from lmlab.models.blocks import LmlabForCausalLM
from lmlab.optim import build_lr_scheduler, build_optimizer, pending_state_bytes, schedule_change


@dataclasses.dataclass
class TrainState:
    """Counters that must survive a restart; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    elapsed_seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, type(getattr(self, key))(value))


class StopRequested:
    """While active, SIGTERM/SIGINT set a flag checked between steps, so the run can save and exit cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "StopRequested":
        self.signal_name: str | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def scheduled_gc() -> Iterator[None]:
    """Disable automatic garbage collection; the loop collects every `gc_freq` steps on every rank at once."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def seed_everything(seed: int | None, rank: int, deterministic: bool) -> None:
    if seed is None:
        return
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # same on every rank: identical initial weights
    if deterministic:
        torch.use_deterministic_algorithms(True)


def check_inputs(cfg: JobConfig) -> None:
    """The checks that need no process group or device, in the order train() meets them: the kernel backend,
    custom models, the tokenizer against the model config, the model (built on the meta device: no memory),
    the data sources and what the dump folder holds (`check_dump_contents`, which only reads). train.sh runs
    them before torchrun, so that a bad input is one line and creates nothing; UserError."""
    dispatch.require(cfg.model.backend)
    import_custom_models(cfg.experimental.custom_model_path)
    tokenizer = load_tokenizer(cfg.model)
    build_model(cfg.model, vocab_size=len(tokenizer), device=torch.device("meta"))
    load_sources(cfg.training)
    check_dump_contents(cfg)


def train(cfg: JobConfig, stop: StopRequested) -> int:
    dist = init_distributed(cfg)
    # TF32 for the float32 matmuls inside the PyTorch chunk kernels (bf16 work is unaffected; fla's Triton
    # kernels use TF32 dots too): full-fp32 matmuls run at a fraction of the tensor cores' rate.
    torch.set_float32_matmul_precision("high")
    seed_everything(cfg.training.seed, dist.rank, cfg.training.deterministic)
    dispatch.require(cfg.model.backend)
    if cfg.job.print_args and dist.is_main:
        print(cfg.to_toml(), flush=True)

    # --- model, tokenizer, optimizer, data ---------------------------------------------------------
    import_custom_models(cfg.experimental.custom_model_path)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, vocab_size=len(tokenizer), device=dist.device)
    n_params = sum(p.numel() for p in model.parameters())
    model_flops_per_token = flops_per_token(model.config, cfg.training.seq_len)
    model = parallelize(model, cfg, dist)
    optimizer = build_optimizer(model, cfg.optimizer)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.training.steps)
    dataloader = build_dataloader(cfg.training, tokenizer, rank=dist.rank, world_size=dist.world_size)
    train_state = TrainState()
    # Only now, with every input checked, touch the dump folder: a bad flag must not overwrite anything.
    needs = "a checkpoint and the HF export" if cfg.checkpoint.enable_checkpoint else "the HF export"
    check_free_space(Path(cfg.job.dump_folder), n_params * bytes_per_parameter(cfg), needs)
    dump = prepare_dump_folder(cfg, dist)

    # --- resume ------------------------------------------------------------------------------------
    checkpointer = Checkpointer(dump, cfg.checkpoint, dist)
    states = {
        "model": model,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "dataloader": dataloader,
        "train_state": train_state,
    }
    # --job.overwrite: the old run's checkpoints are not loaded, and its outputs go only now that this run
    # has loaded what it starts from (a bad --checkpoint.initial_load_path must not cost the old run).
    train_state.step = checkpointer.load(states, fresh=cfg.job.overwrite)
    if cfg.job.overwrite:
        clear_previous_run(cfg, dist)
    record = dump / RECORD_NAME
    if dist.is_main:
        if checkpointer.loaded_from is None:
            where = "starting from scratch"
        elif train_state.step:
            where = f"resumed from step {train_state.step} ({checkpointer.loaded_from})"
            change = schedule_change(tomllib.loads(record.read_text()), cfg, train_state.step) \
                if record.is_file() and not cfg.job.overwrite else None
            if change:
                print(change, flush=True)
        else:
            where = f"warm start: model weights from {checkpointer.loaded_from}"
        try:
            record.write_text(cfg.record_toml())  # the run has started: its checkpoints' config
        except OSError as exc:
            raise dump_write_failed(dump, exc) from None
        print(
            f"lmlab: {model.config.model_type} with {n_params / 1e6:.2f}M parameters on {dist.world_size} x "
            f"{dist.device.type}, {where}; kernels: {dispatch.describe(kernel_backend(cfg.model, model.config))}",
            flush=True,
        )

    # --- the loop ----------------------------------------------------------------------------------
    t = cfg.training
    use_bf16 = dist.device.type == "cuda" and t.mixed_precision_param == "bfloat16" and dist.world_size == 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)
    wandb_run = None
    if cfg.metrics.enable_wandb and dist.is_main:
        wandb_run = start_wandb(dump, cfg.to_dict(), f"{model.config.model_type}-{dump.resolve().name}",
                                fresh=not train_state.step)
    logger = MetricLogger(dump, cfg.metrics, t.steps, enabled=dist.is_main, first_step=train_state.step,
                          wandb_run=wandb_run)
    data_iter = iter(dataloader)
    peak = peak_flops(dist.device)
    window = _Window()
    consecutive_skips = 0
    profiler = start_profiler(cfg, dump, dist)
    model.train()
    micro_rows = t.micro_batch_size
    measure_micro_rows = micro_rows == 0 and dist.device.type == "cuda"  # 0 on a GPU: the most rows that fit
    while train_state.step < t.steps:
        step = train_state.step + 1
        if profiler is not None:
            profiler.step()
        if step % t.gc_freq == 0:
            gc.collect()
        loaded = [next(data_iter) for _ in range(t.gradient_accumulation_steps)]
        if measure_micro_rows:
            micro_rows = fit_micro_batch(model, loaded[0], optimizer, dist, autocast)
            measure_micro_rows = False
        micro_batches = [piece for batch in loaded for piece in split_rows(batch, micro_rows)]
        # FSDP averages gradients over ranks, so each rank divides its token sum by global_tokens / world.
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        global_tokens = int(dist.all_reduce(torch.tensor(float(local_tokens), device=dist.device), "sum"))
        denominator = global_tokens / dist.world_size
        try:
            loss_sum = forward_backward(model, micro_batches, dist.device, denominator, autocast)
        except torch.OutOfMemoryError:
            raise UserError(out_of_memory_advice(step, micro_batches[0]["input_ids"].shape, dist.device)) from None
        grad_norm = clip_grad_norm(model, t.max_norm)
        loss_value = float(dist.all_reduce(loss_sum, "sum")) / global_tokens
        rank_loss_max = float(dist.all_reduce(loss_sum / max(local_tokens, 1), "max"))
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            consecutive_skips = 0
        elif t.skip_nan_inf:
            train_state.skipped_steps += 1
            consecutive_skips += 1
            if dist.is_main:
                print(f"lmlab: step {step}: non-finite loss {loss_value} or grad norm {grad_norm}; skipped", flush=True)
            if consecutive_skips >= t.max_consecutive_skips:
                raise UserError(
                    f"step {step}: {consecutive_skips} consecutive non-finite steps (--training.max_consecutive_skips); "
                    f"stopping without saving; resume from the last checkpoint with a lower lr or other data"
                )
        else:
            raise UserError(
                f"step {step}: non-finite loss {loss_value} / grad norm {grad_norm}; stopping without saving "
                "(pass --training.skip_nan_inf to skip such steps)"
            )
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        train_state.step = step
        train_state.tokens_seen += global_tokens
        window.add(global_tokens)
        logger.step_done(step)

        if step % cfg.metrics.log_freq == 0 or step == t.steps or step == 1:
            seconds, tokens = window.take()
            train_state.elapsed_seconds += seconds
            tokens_per_second = tokens / max(seconds, 1e-9) / dist.world_size
            values: dict[str, Any] = {
                "loss": loss_value,
                "loss_max_rank": rank_loss_max,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_second_per_device": tokens_per_second,
                "tokens_seen": train_state.tokens_seen,
                "skipped_steps": train_state.skipped_steps,
                "elapsed_seconds": train_state.elapsed_seconds,
                "tflops_per_device": tokens_per_second * model_flops_per_token / 1e12,
            }
            if peak:
                values["mfu"] = values["tflops_per_device"] * 1e12 / peak
            if dist.device.type == "cuda":
                values["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            values["epoch"] = data_epoch(dataloader)
            logger.log(step, values)

        if step == 1:
            dist.use_train_timeout()  # the first step may compile; later ones must be quick
        if checkpointer.should_save(step, t.steps):
            checkpointer.save(step, states, final=step == t.steps)
        if dist.all_reduce(torch.tensor(float(stop.signal_name is not None), device=dist.device), "max"):
            checkpointer.save(step, states)  # a no-op when this step was just saved
            checkpointer.close()
            saved = f"saved step {step}. Continue it" if checkpointer.enabled else \
                "checkpointing is off, nothing saved. Start it again"
            message = (f"lmlab: {stop.signal_name or 'stop signal'} received; {saved} with: "
                       f"{continue_command(record)} (add --training.steps N to train longer; same NGPU)")
            if not report_exit(message, 0) and dist.is_main:  # train.sh's launcher prints it, last
                print(message, flush=True)
            logger.close()
            if profiler is not None:
                profiler.stop()
            dist.close()
            return 0

    logger.close()
    if profiler is not None:
        profiler.stop()
    checkpointer.close()
    export_hf(model, tokenizer, dump, cfg.checkpoint.export_dtype, dist, step=train_state.step)
    if dist.is_main:
        print(f"lmlab: done; {train_state.tokens_seen:,} tokens in {train_state.step} steps; HF model in {dump}", flush=True)
    dist.close()
    return 0


def bytes_per_parameter(cfg: JobConfig) -> int:
    """Disk bytes per parameter a run needs at least: the HF export, and one checkpoint (float32 weights and
    AdamW's two moments) when checkpointing is on."""
    return (12 if cfg.checkpoint.enable_checkpoint else 0) + DTYPES[cfg.checkpoint.export_dtype].itemsize


def start_profiler(cfg: JobConfig, dump: Path, dist: Dist) -> torch.profiler.profile | None:
    """With --profiling.enable_profiling: a torch profiler trace of one step every `profile_freq` steps,
    written per rank under <dump>/<save_traces_folder> (open it in tensorboard or perfetto)."""
    p = cfg.profiling
    if not p.enable_profiling:
        return None
    folder = dump / p.save_traces_folder
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU]
        + ([torch.profiler.ProfilerActivity.CUDA] if dist.device.type == "cuda" else []),
        schedule=torch.profiler.schedule(wait=max(p.profile_freq - 2, 0), warmup=1, active=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(folder), worker_name=f"rank{dist.rank}"),
    )
    profiler.start()
    return profiler


def forward_backward(
    model: torch.nn.Module, micro_batches: list[dict], device: torch.device, denominator: float, autocast
) -> torch.Tensor:
    """Accumulate the gradients of one step; return the summed token loss of these micro-batches.

    Each micro-batch's loss is its token sum divided by `denominator` (the step's token count per rank),
    so the accumulated gradient is the mean over all tokens of the step whatever the accumulation split.
    """
    loss_sum = torch.zeros((), device=device)
    # lmlab's models skip the logits (never materialised in fp32); other causal LMs don't take the argument.
    loss_only = {"loss_only": True} if isinstance(model, LmlabForCausalLM) else {}
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # cu_seqlens (varlen) only when the batch has it: other causal LMs don't take the argument.
        varlen = {"cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else {}
        with autocast:
            out = model(
                input_ids=batch["input_ids"],
                labels=batch["labels"],
                num_items_in_batch=denominator,
                use_cache=False,  # no KV cache while training (HF models build one by default)
                **loss_only,
                **varlen,
            )
        out.loss.backward()
        loss_sum += out.loss.detach() * denominator
    return loss_sum


# The share of the card's memory the measured estimate may fill: the caching allocator's fragmentation and
# the compiled step's workspaces live in the rest.
MEMORY_HEADROOM = 0.9


def fit_micro_batch(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, dist: Dist,
                    autocast) -> int:
    """For --training.micro_batch_size 0 on CUDA: the most rows of `batch` (a divisor of its rows; 0 when all
    fit) whose forward and backward fit the card, so that the paper's 16-row batches of a 1.3B model run
    where 16 rows at once would not.

    Peak memory is linear in the rows: two eager passes of 1 and 2 rows give its slope and intercept (eager
    keeps at least the activations the compiled blocks keep, so the estimate errs towards fewer rows), plus
    the optimizer state a fresh run has yet to allocate. The passes' gradients are dropped and no data is
    consumed; every rank measures and all take the smallest choice. Where two eager rows do not fit, one row
    runs (and the step says what to do if that does not fit either)."""
    rows, seq_len = batch["input_ids"].shape
    if rows == 1:
        return 0
    try:
        with torch.compiler.set_stance("force_eager"):
            one, two = [peak_memory(model, split_rows(batch, n)[0], dist.device, autocast) for n in (1, 2)]
    except torch.OutOfMemoryError:
        one = two = None
    release_memory(model, dist.device)  # the step starts as if unmeasured
    free, total = torch.cuda.mem_get_info(dist.device)
    usable = min(free + torch.cuda.memory_reserved(dist.device),  # what other processes leave, and a set cap
                 torch.cuda.get_per_process_memory_fraction(dist.device) * total)
    budget = MEMORY_HEADROOM * usable
    if one is None:
        fitting, need = 1, f"2 x {seq_len} tokens ran out of memory when measured eagerly"
    else:
        per_row = max(two - one, 0)
        fixed = one - per_row + pending_state_bytes(optimizer)
        fitting = rows_that_fit(rows, fixed, per_row, budget)
        need = (f"{rows} x {seq_len} tokens at once would need about {(fixed + rows * per_row) / 2**30:.0f} GiB "
                f"({per_row / 2**30:.2f} GiB a row, measured)")
    chosen = int(dist.all_reduce(torch.tensor(float(fitting), device=dist.device), "min"))
    if chosen < rows and dist.is_main:
        print(f"lmlab: micro-batches of {chosen} rows (--training.micro_batch_size 0 on a GPU: the most that fit): "
              f"{need} of {budget / 2**30:.0f} GiB; the step is the same", flush=True)
    return 0 if chosen == rows else chosen


def peak_memory(model: torch.nn.Module, batch: dict, device: torch.device, autocast) -> int:
    """Peak device bytes of one forward and backward of `batch` (gradients dropped first)."""
    release_memory(model, device)
    forward_backward(model, [batch], device, batch["input_ids"].numel(), autocast)
    return torch.cuda.max_memory_allocated(device)


def release_memory(model: torch.nn.Module, device: torch.device) -> None:
    """Drop the gradients, return cached blocks to the card and restart the peak-memory count."""
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def rows_that_fit(rows: int, fixed: float, per_row: float, budget: float) -> int:
    """The largest divisor d of `rows` with fixed + d * per_row <= budget (1 when none: the step then says
    what to do if it runs out of memory)."""
    fitting = [d for d in range(rows, 0, -1) if rows % d == 0 and fixed + d * per_row <= budget]
    return fitting[0] if fitting else 1


def out_of_memory_advice(step: int, micro_batch: torch.Size, device: torch.device) -> str:
    """One line for a step that ran out of device memory: what was tried and the flags that need less."""
    rows, seq_len = micro_batch
    peak = f" (peak {torch.cuda.max_memory_allocated(device) / 2**30:.0f} GiB)" if device.type == "cuda" else ""
    smaller = (f"pass --training.micro_batch_size {rows // 2} (gradient accumulation keeps the batch), or "
               if rows > 1 else "")
    return (f"step {step}: out of memory on {device}{peak} with micro-batches of {rows} x {seq_len} tokens; "
            f"{smaller}--activation_checkpoint.mode full")


def split_rows(batch: dict[str, torch.Tensor], rows: int) -> list[dict[str, torch.Tensor]]:
    """`batch` cut into pieces of `rows` rows (0: whole), for --training.micro_batch_size: the same data
    and the same step loss, in less activation memory. Packed-document boundaries (`cu_seqlens` over the
    flattened batch, every row start among them) are cut to each piece."""
    n, seq_len = batch["input_ids"].shape
    if rows == 0 or rows >= n:
        return [batch]
    pieces = []
    for first in range(0, n, rows):
        piece = {k: v[first : first + rows] for k, v in batch.items() if k != "cu_seqlens"}
        if "cu_seqlens" in batch:
            cu, lo, hi = batch["cu_seqlens"], first * seq_len, (first + rows) * seq_len
            piece["cu_seqlens"] = cu[(cu >= lo) & (cu <= hi)] - lo
        pieces.append(piece)
    return pieces


class _Window:
    """Tokens and wall time since the last log line (throughput of the recent steps, not of the run)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self) -> tuple[float, int]:
        now = time.perf_counter()
        seconds, tokens = now - self.start, self.tokens
        self.start, self.tokens = now, 0
        return seconds, tokens


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip gradients to `max_norm` (0 = only measure) and return the total norm as a float."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dumplock.trainer_dies_with_torchrun()  # Linux: SIGTERM (save and stop) when torchrun ends
    return run_command("train.sh", lambda: run(argv), report=report_exit)


def run(argv: list[str]) -> int:
    cfg = parse_args(argv)
    check_dump_folder(Path(cfg.job.dump_folder))
    # one run per dump folder: this trainer holds the lock (with the launcher and torchrun) until train() ends
    with dumplock.for_trainer(Path(cfg.job.dump_folder)), StopRequested() as stop, scheduled_gc():
        return train(cfg, stop)


def continue_command(record: Path) -> str:
    """The command that continues a run from its newest checkpoint: its recorded config `record` (which never
    holds --job.overwrite), not "the same command", which may start over."""
    return f"bash train.sh --job.config_file {shlex.quote(str(record))}"


def report_exit(message: str, exit_code: int) -> bool:
    """Tell train.sh's launcher why this process ends, so that it can say so last, after torchrun's output;
    False when there is no launcher to tell."""
    exit_file = os.environ.get("LMLAB_EXIT_FILE")
    if exit_file:
        Path(exit_file).write_text(json.dumps({"message": message, "exit_code": exit_code}))
    return bool(exit_file)


if __name__ == "__main__":
    sys.exit(main())
