"""Optimizer and learning-rate schedule, with flame's semantics.

- Adam / AdamW from torch.optim. Weight decay applies to every parameter (norm weights and embeddings
  included), exactly as flame does, so runs are comparable with the paper's.
- The LR schedule is a multiplier of `optimizer.lr`: linear warmup `(s + 1) / warmup_steps`, then an
  optional stable phase (WSD, `decay_ratio`), then decay to `lr_min` (a ratio of lr) with the shape
  `decay_type`: linear `1 - p`, sqrt `1 - sqrt(p)`, cosine `(1 + cos(pi p)) / 2`, p the decay progress.
  The scheduler advances once per optimizer step, skipped (non-finite) steps included, as in flame.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from lmlab.config import LRScheduler, Optimizer


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


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRScheduler, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, total_steps))
