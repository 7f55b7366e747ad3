"""Mamba's Triton selective scan at mamba_340M's layer size (8 x 2048 tokens, 2048 channels, state 16, bf16):
forward and backward times for each block of channels (BLOCK_D), warps per program (NUM_WARPS) and number of
persistent backward programs (BWD_PROGRAMS), each checked against the shipped setting's outputs and gradients.
The backward's programs are bound by registers (8 one-warp programs an SM at BLOCK_D 32): smaller blocks hold
fewer registers, so more programs share an SM to hide the loads' latency.
    python bench/experiments/scan_block_sizes.py            (a GPU)
    TRITON_INTERPRET=1 python bench/experiments/scan_block_sizes.py --smoke   (CPU: tiny sizes, a few settings)"""
import argparse
import itertools

import torch

from lmlab.kernels import selective_scan_triton as kernel

parser = argparse.ArgumentParser()
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
device = "cpu" if args.smoke else "cuda"
S, T, D, N = (1, 70, 32, 4) if args.smoke else (8, 2048, 2048, 16)
dtype = torch.float32 if args.smoke else torch.bfloat16
g = torch.Generator().manual_seed(0)
inputs = dict(u=torch.randn(S, T, D, generator=g), delta=torch.rand(S, T, D, generator=g) * 0.1 + 1e-3,
              A=-torch.arange(1, N + 1).float().repeat(D, 1), B=torch.randn(S, T, N, generator=g),
              C=torch.randn(S, T, N, generator=g))
inputs = {name: (t.to(dtype) if name != "A" else t).to(device).requires_grad_() for name, t in inputs.items()}
dy = torch.randn(S, T, D, generator=g).to(dtype).to(device)
shipped = (kernel.BLOCK_D, kernel.NUM_WARPS, kernel.BWD_PROGRAMS)


def run():
    for t in inputs.values():
        t.grad = None
    y, _ = kernel.selective_scan_triton(*inputs.values())
    y.backward(dy)
    return [y.detach().float(), *(t.grad.float() for t in inputs.values())]


def timed(repeats=20):
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(repeats)]
    for start, middle, end in events:
        start.record()
        y, _ = kernel.selective_scan_triton(*inputs.values())
        middle.record()
        y.backward(dy)
        end.record()
    torch.cuda.synchronize()
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return (median([s.elapsed_time(m) for s, m, _ in events]), median([m.elapsed_time(e) for _, m, e in events]))


reference = run()
settings = ([(16, 1, 1024), (32, 1, 64)] if args.smoke else
            itertools.product((16, 32, 64), (1, 2), (1024, 2048, 4096)))
for block_d, warps, programs in settings:
    kernel.BLOCK_D, kernel.NUM_WARPS, kernel.BWD_PROGRAMS = block_d, warps, programs
    got = run()
    error = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, reference))
    timing = "" if args.smoke else "forward {:.2f} ms, backward {:.2f} ms, ".format(*timed())
    print(f"BLOCK_D {block_d}, NUM_WARPS {warps}, BWD_PROGRAMS {programs}: {timing}"
          f"largest relative error against {shipped}: {error:.1e}", flush=True)
