import math

import pytest
import torch

from lmlab.config import JobConfig, LRScheduler, Optimizer
from lmlab.optim import build_lr_scheduler, build_optimizer, lr_multiplier, schedule_change

STEPS, WARMUP, LR_MIN = 1000, 100, 0.1


def cfg(decay_type="cosine", decay_ratio=None):
    return LRScheduler(warmup_steps=WARMUP, decay_ratio=decay_ratio, decay_type=decay_type, lr_min=LR_MIN)


@pytest.mark.parametrize("decay_type", ["linear", "sqrt", "cosine"])
def test_warmup_is_linear_and_reaches_one(decay_type):
    c = cfg(decay_type)
    assert lr_multiplier(0, c, STEPS) == pytest.approx(1 / WARMUP)
    assert lr_multiplier(49, c, STEPS) == pytest.approx(0.5)
    assert lr_multiplier(WARMUP - 1, c, STEPS) == pytest.approx(1.0)
    assert lr_multiplier(WARMUP, c, STEPS) == pytest.approx(1.0)  # decay progress 0


@pytest.mark.parametrize(
    "decay_type, middle",
    [
        ("linear", LR_MIN + (1 - LR_MIN) * 0.5),
        ("sqrt", LR_MIN + (1 - LR_MIN) * (1 - math.sqrt(0.5))),
        ("cosine", LR_MIN + (1 - LR_MIN) * 0.5),
    ],
)
def test_decay_middle_and_end(decay_type, middle):
    c = cfg(decay_type)
    mid_step = WARMUP + (STEPS - WARMUP) // 2
    assert lr_multiplier(mid_step, c, STEPS) == pytest.approx(middle)
    assert lr_multiplier(STEPS, c, STEPS) == pytest.approx(LR_MIN)  # the floor is lr * lr_min
    quarter = WARMUP + (STEPS - WARMUP) // 4
    expected_quarter = {"linear": 0.75, "sqrt": 0.5, "cosine": 0.5 * (1 + math.cos(math.pi / 4))}[decay_type]
    assert lr_multiplier(quarter, c, STEPS) == pytest.approx(LR_MIN + (1 - LR_MIN) * expected_quarter)


def test_wsd_stays_flat_then_decays_over_last_fraction():
    c = cfg("linear", decay_ratio=0.2)
    assert lr_multiplier(WARMUP, c, STEPS) == 1.0
    assert lr_multiplier(799, c, STEPS) == 1.0
    assert lr_multiplier(800, c, STEPS) == pytest.approx(1.0)  # decay starts at 1000 - 200
    assert lr_multiplier(900, c, STEPS) == pytest.approx(LR_MIN + (1 - LR_MIN) * 0.5)
    assert lr_multiplier(1000, c, STEPS) == pytest.approx(LR_MIN)


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, Optimizer(lr=1e-3, eps=1e-15, implementation="for-loop"))
    sched = build_lr_scheduler(opt, cfg(), STEPS)
    seen = []
    for _ in range(WARMUP):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-3 / WARMUP)
    assert seen[-1] == pytest.approx(1e-3)


def test_optimizer_settings_and_weight_decay_on_every_parameter():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, Optimizer(name="AdamW", lr=2e-3, eps=1e-15, beta1=0.8, beta2=0.9, weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-15 and group["weight_decay"] == 0.1
    assert len(group["params"]) == 3  # embedding, norm weight, norm bias: all decayed, as in flame
    assert isinstance(build_optimizer(model, Optimizer(name="Adam")), torch.optim.Adam)


def test_a_resume_that_reshapes_the_schedule_says_how_in_one_line():
    saved = JobConfig()
    saved.training.steps, saved.lr_scheduler.warmup_steps = 100, 10
    record = saved.to_dict()
    assert schedule_change(record, saved, 50) is None  # the same flags: an exact resume
    longer = JobConfig()
    longer.training.steps, longer.lr_scheduler.warmup_steps = 200, 10
    before = saved.optimizer.lr * lr_multiplier(50, saved.lr_scheduler, 100)
    after = longer.optimizer.lr * lr_multiplier(50, longer.lr_scheduler, 200)
    assert schedule_change(record, longer, 50) == (
        "lmlab: resuming at step 50 with --training.steps 200 (was 100): the LR schedule is recomputed from the "
        f"new values (the LR of step 51: {before:.3g} -> {after:.3g})")
