"""HQLT's local attention on FlexAttention at sync_hqlt_ch64_…_340M's layer size (16 x 2048 tokens in packed
documents, 8 heads of 128, window 64, bf16, compiled as in training's blocks): forward + backward time for
each block-mask tile (lmlab's `_FLEX_TILE`) and FlexAttention kernel block sizes, each checked against the
shipped setting. With 128-token tiles a query tile visits two key tiles (256 keys) for a window of 64, and the
positions test runs on every element of both; 64-token tiles halve that work (issue 20's MFU margin: the
forward kernel took 4.8% of the 340M step, 0.47 ms a layer, on an H100).
    python bench/experiments/flex_local_tiles.py            (a GPU)
    python bench/experiments/flex_local_tiles.py --smoke    (CPU: tiny sizes, two settings, forward only)"""
import argparse
import functools

import torch
from torch.nn.attention.flex_attention import flex_attention

from lmlab.kernels import local_attention as la

parser = argparse.ArgumentParser()
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
device = "cpu" if args.smoke else "cuda"
B, T, H, D, W = (2, 256, 2, 16, 16) if args.smoke else (16, 2048, 8, 128, 64)
dtype = torch.float32 if args.smoke else torch.bfloat16
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, T, H, D, generator=g).to(device, dtype).requires_grad_(not args.smoke) for _ in range(3))
dout = torch.randn(B, T, H, D, generator=g).to(device, dtype)
# packed documents: positions restart at random boundaries, as in training
starts = torch.zeros(B, T, dtype=torch.bool)
starts[:, 0] = True
starts[torch.rand(B, T, generator=g) < 4 / T] = True
index = torch.arange(T).expand(B, T)
positions = (index - torch.cummax(torch.where(starts, index, 0), dim=1).values).to(device)
shipped_tile = la._FLEX_TILE
settings = [(shipped_tile, None), (64, {"BLOCK_M": 64, "BLOCK_N": 64})]
if not args.smoke:
    settings += [(128, {"BLOCK_M": 128, "BLOCK_N": 64}), (128, {"BLOCK_M": 64, "BLOCK_N": 64}),
                 (64, {"BLOCK_M": 64, "BLOCK_N": 32}), (64, {"BLOCK_M": 32, "BLOCK_N": 32})]


def step(attend_fn):
    for t in (q, k, v):
        t.grad = None
    o = attend_fn(q, k, v, positions, positions)
    if args.smoke:  # FlexAttention has no backward on CPU
        return [o.detach().float()]
    o.backward(dout)
    return [o.detach().float(), *(t.grad.float() for t in (q, k, v))]


def timed(attend_fn, repeats=20):
    if args.smoke:
        return float("nan"), float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fwd = []
    for _ in range(repeats):
        start.record()
        o = attend_fn(q, k, v, positions, positions)
        end.record()
        torch.cuda.synchronize()
        fwd.append(start.elapsed_time(end))
        o.backward(dout)
    start.record()
    for _ in range(repeats):
        attend_fn(q, k, v, positions, positions).backward(dout)
    end.record()
    torch.cuda.synchronize()
    return sorted(fwd)[repeats // 2], start.elapsed_time(end) / repeats


reference = None
for tile, options in settings:
    torch._dynamo.reset()
    la._FLEX_TILE = tile
    attend = functools.partial(flex_attention, kernel_options=options) if options else flex_attention
    compiled = functools.partial(la.local_attention_flex, window=W, attend=attend)
    if not args.smoke:  # Inductor lowers FlexAttention on GPUs; the smoke run checks this script eagerly
        compiled = torch.compile(compiled)
    try:
        results = step(compiled)
        step(compiled)  # warm-up
        forward_ms, total_ms = timed(compiled)
    except Exception as exc:  # a setting FlexAttention refuses: say so, try the next
        print(f"tile {tile} {options}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
        continue
    reference = reference or results
    error = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(results, reference))
    print(f"tile {tile} {options}: forward {forward_ms:.3f} ms, forward + backward {total_ms:.3f} ms, "
          f"largest error against tile {shipped_tile} (relative to its max) {error:.2e}", flush=True)
