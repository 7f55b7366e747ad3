"""Step 8 experiment (bench/NOTES.md): variants of the PyTorch short conv, A/B in one GPU call.

Not part of lmlab (kept until step 8 is decided): run it on the device, then land the winner in
src/lmlab/kernels/conv.py, or nothing, and delete this file.
  PYTHONPATH=src:/tmp/site python bench/experiments/conv_variants.py             # GPU: checks, then timings
  PYTHONPATH=src python bench/experiments/conv_variants.py --device cpu --small  # CPU smoke run

Variants of `conv._conv_packed` (training path: no initial state, no final state):
  current   - as landed (step 7): sum of W masked shifted copies, under checkpoint (recompute in backward)
  int32     - the same with int32 token positions (cheaper index arithmetic in the fused kernels)
  explicit  - an autograd.Function keeping only x: backward recomputes the pre-activation, then
              dx = W shifted sums of the gradient, dw / db = two-stage sums over token blocks (so that
              inductor does not fuse a reduction over all tokens into a row-wise pass)
  triton    - lmlab's Triton kernel (kernels/conv_triton.py; "auto" on CUDA since it landed, so the other
              variants switch it off)
Timings: the train step of a 4-layer cut of delta_net_340M / gated_deltanet_340M at 16 x 4 x 2048 tokens
(bench/train_bench.py's step), variants interleaved as current, triton, current, triton.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import train_bench as bench  # noqa: E402

from lmlab.kernels import conv, dispatch  # noqa: E402
from lmlab.kernels.documents import document_positions  # noqa: E402

ORIGINAL = conv._conv_packed
ORIGINAL_RECOMPUTE = conv.recompute_in_backward
BLOCK = 256  # tokens per partial sum of the two-stage reductions


def positions(T, row_length, cu_seqlens, device, dtype):
    pos = torch.arange(T, device=device, dtype=dtype)
    if cu_seqlens is None:
        return pos % row_length
    return document_positions(cu_seqlens, pos)[1]


def conv_int32(x, weight, bias, initial_state, output_final_state, cu_seqlens, row_length, activation):
    if initial_state is not None or output_final_state:
        return ORIGINAL(x, weight, bias, initial_state, output_final_state, cu_seqlens, row_length, activation)
    y = pre_activation(x, weight, bias, positions(x.shape[0], row_length, cu_seqlens, x.device, torch.int32))
    return (y if activation is None else F.silu(y)).to(x.dtype), None


def pre_activation(x, weight, bias, offset):
    T, D = x.shape
    W = weight.shape[-1]
    y = x.new_zeros(T, D, dtype=torch.float32) if bias is None else bias.float().expand(T, D)
    for lag in range(W):
        shifted = F.pad(x, (0, 0, lag, 0))[:T]
        y = y + torch.where((offset >= lag)[:, None], shifted, 0).float() * weight[:, 0, W - 1 - lag].float()
    return y


def two_stage_sum(p):
    T, D = p.shape
    pad = -T % BLOCK
    return F.pad(p, (0, 0, 0, pad)).view(-1, BLOCK, D).sum(1).sum(0)


class ConvExplicitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, offset, silu):
        ctx.save_for_backward(x, weight, bias, offset)
        ctx.silu = silu
        y = pre_activation(x, weight, bias, offset)
        return (F.silu(y) if silu else y).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, offset = ctx.saved_tensors
        T, D = x.shape
        W = weight.shape[-1]
        g = dy.float()
        if ctx.silu:
            y = pre_activation(x, weight, bias, offset)
            s = torch.sigmoid(y)
            g = g * s * (1 + y * (1 - s))
        dx = torch.zeros(T, D, dtype=torch.float32, device=x.device)
        dw = [None] * W
        for lag in range(W):
            gm = torch.where((offset >= lag)[:, None], g, 0)  # gradient of the tap reading x[t - lag]
            dx = dx + F.pad(gm, (0, 0, 0, lag))[lag:] * weight[:, 0, W - 1 - lag].float()
            dw[W - 1 - lag] = two_stage_sum(gm * F.pad(x, (0, 0, lag, 0))[:T].float())
        db = None if bias is None else two_stage_sum(g).to(bias.dtype)
        return dx.to(x.dtype), torch.stack(dw, -1)[:, None].to(weight.dtype), db, None, None


def conv_explicit(x, weight, bias, initial_state, output_final_state, cu_seqlens, row_length, activation):
    if initial_state is not None or output_final_state or not torch.is_grad_enabled():
        return ORIGINAL(x, weight, bias, initial_state, output_final_state, cu_seqlens, row_length, activation)
    offset = positions(x.shape[0], row_length, cu_seqlens, x.device, torch.int64)
    return ConvExplicitBackward.apply(x, weight, bias, offset, activation is not None), None


VARIANTS = {"current": (ORIGINAL, ORIGINAL_RECOMPUTE), "int32": (conv_int32, ORIGINAL_RECOMPUTE),
            "explicit": (conv_explicit, lambda fn, *args: fn(*args)), "triton": (ORIGINAL, ORIGINAL_RECOMPUTE)}
TRITON_CHECK = dispatch._health_checks["short_conv"]["triton"]


def use(variant: str) -> None:
    conv._conv_packed, conv.recompute_in_backward = VARIANTS[variant]
    dispatch._health_checks["short_conv"]["triton"] = (
        TRITON_CHECK if variant == "triton" else lambda x: "switched off for this variant")


def backend_of(variant: str) -> str:
    return "triton" if variant == "triton" else "torch"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def check(device: torch.device) -> dict:
    """Each variant (eager and compiled) against the current one, eager, float32: y, dx, dw, db."""
    torch.manual_seed(0)
    B, T, D, W = 2, 300, 64, 4
    x = torch.randn(B, T, D, device=device)
    weight, bias, dy = torch.randn(D, 1, W, device=device), torch.randn(D, device=device), torch.randn(B, T, D, device=device)
    cu = torch.tensor([0, 7, 7, 250, 410, 600], device=device, dtype=torch.int32)
    out = {}
    for packed in (False, True):
        def run(fn, x=x, backend="torch"):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            y, _ = fn(leaves[0], leaves[1], leaves[2], cu_seqlens=cu if packed else None, backend=backend)
            y.backward(dy)
            return [y.detach()] + [t.grad for t in leaves]

        use("current")
        ref = run(conv.short_conv)
        for variant in VARIANTS:
            if variant == "triton" and device.type != "cuda":
                continue
            for compiled in (False, True):
                use(variant)
                torch._dynamo.reset()
                fn = torch.compile(conv.short_conv) if compiled else conv.short_conv
                got = run(fn, backend=backend_of(variant))
                err = max(rel(a, b) for a, b in zip(got, ref))
                out[f"{variant} {'compiled' if compiled else 'eager'} {'packed' if packed else 'dense'}"] = err
    use("current")
    return out


def timings(device: torch.device, small: bool) -> list[dict]:
    rows = []
    seq, seqs = (64, 4) if small else (2048, 64)
    micro = 2 if small else 16
    for name in ("gated_deltanet_340M", "delta_net_340M"):
        cfg = json.loads((REPO / "configs" / f"{name}.json").read_text())
        cfg["num_hidden_layers"] = 4
        if small:
            cfg.update(hidden_size=64, num_heads=2, head_dim=32, vocab_size=512)
        path = Path(tempfile.mkdtemp()) / f"{name}_4layers.json"
        path.write_text(json.dumps(cfg))
        args = bench.parse_args(["--configs", str(path), "--device", str(device), "--seq-len", str(seq),
                                 "--seqs-per-step", str(seqs), "--steps", "2" if small else "5", "--warmup", "2"])
        for variant in ("current", "triton", "current", "triton"):
            use(variant)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step, _ = bench.lmlab_builder(path, args, "auto")(micro)
            for _ in range(args.warmup):
                step()
            seconds = bench.timed_seconds(step, args.steps, device)
            row = {"config": path.stem, "variant": variant, "tokens_per_second": args.steps * seqs * seq / seconds,
                   "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
            print("conv_variants:", row, flush=True)
            rows.append(row)
            del step
            bench.free_memory(device)
    use("current")
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", type=Path, default=Path("conv_variants.json"))
    p.add_argument("--skip-timings", action="store_true")
    a = p.parse_args()
    device = torch.device(a.device)
    result = {"checks": check(device)}
    print("conv_variants: checks (max relative error vs current, float32):", result["checks"], flush=True)
    a.out.write_text(json.dumps(result, indent=1))
    if not a.skip_timings:
        result["timings"] = timings(device, a.small)
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
