"""Optimizer and learning-rate schedule, with flame's semantics.

- Adam / AdamW from torch.optim. Weight decay applies to every parameter (norm weights and embeddings
  included), exactly as flame does, so runs are comparable with the paper's.
- The LR schedule is a multiplier of `optimizer.lr`: linear warmup `(s + 1) / warmup_steps`, then an
  optional stable phase (WSD, `decay_ratio`), then decay to `lr_min` (a ratio of lr) with the shape
  `decay_type`: linear `1 - p`, sqrt `1 - sqrt(p)`, cosine `(1 + cos(pi p)) / 2`, p the decay progress.
  The scheduler advances once per optimizer step, skipped (non-finite) steps included, as in flame.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from lmlab.config import JobConfig, LRScheduler, Optimizer, show

# The options that shape the LR schedule: a resume takes them from the command, not the checkpoint.
SCHEDULE_OPTIONS = ("optimizer.lr", "lr_scheduler.warmup_steps", "lr_scheduler.decay_type", "lr_scheduler.lr_min",
                    "lr_scheduler.decay_ratio", "training.steps")


def build_optimizer(model: torch.nn.Module, cfg: Optimizer) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = any(p.is_cuda for p in params)
    kwargs = dict(
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        # The fused kernels exist for CUDA tensors only; on CPU "fused" means foreach.
        fused=cfg.implementation == "fused" and on_cuda,
        foreach=cfg.implementation == "foreach" or (cfg.implementation == "fused" and not on_cuda),
    )
    optimizer_cls = torch.optim.AdamW if cfg.name == "AdamW" else torch.optim.Adam
    return optimizer_cls(params, **kwargs)


def pending_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Device bytes Adam's two moments will take at the first step, while not yet allocated (a fresh run;
    0 once they exist). Under FSDP2 each rank holds the moments of its shards."""
    if optimizer.state:
        return 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return sum(2 * (p.to_local() if hasattr(p, "to_local") else p).nbytes for p in params)


def lr_multiplier(step: int, cfg: LRScheduler, total_steps: int) -> float:
    """The LR multiplier at 0-based optimizer step `step` of `total_steps`."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = total_steps - warmup if cfg.decay_ratio is None else round(total_steps * cfg.decay_ratio)
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps <= 0:
        return 1.0
    progress = min((step - decay_start) / decay_steps, 1.0)
    if cfg.decay_type == "linear":
        shape = 1.0 - progress
    elif cfg.decay_type == "sqrt":
        shape = 1.0 - math.sqrt(progress)
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr_min + (1.0 - cfg.lr_min) * shape


def schedule_change(previous: dict[str, dict[str, Any]], cfg: JobConfig, step: int) -> str | None:
    """One line for a resume at `step` whose flags reshape the LR schedule of the run recorded in `previous`
    (its job_config.toml, parsed): the changed flags and the LR of the next step under both; None if none."""
    def value(source: dict | JobConfig, name: str) -> Any:
        section, key = name.split(".")
        return source.get(section, {}).get(key) if isinstance(source, dict) else getattr(getattr(source, section), key)

    changed = [name for name in SCHEDULE_OPTIONS if value(previous, name) != value(cfg, name)]
    if not changed:
        return None
    old = {name: value(previous, name) for name in SCHEDULE_OPTIONS}
    old_schedule = dataclasses.replace(cfg.lr_scheduler, **{name.split(".")[1]: v for name, v in old.items()
                                                             if name.startswith("lr_scheduler.")})
    before = old["optimizer.lr"] * lr_multiplier(step, old_schedule, old["training.steps"])
    after = cfg.optimizer.lr * lr_multiplier(step, cfg.lr_scheduler, cfg.training.steps)
    flags = ", ".join(f"--{name} {show(value(cfg, name))} (was {show(old[name])})" for name in changed)
    return (f"lmlab: resuming at step {step} with {flags}: the LR schedule is recomputed from the new values "
            f"(the LR of step {step + 1}: {before:.3g} -> {after:.3g})")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRScheduler, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, total_steps))
