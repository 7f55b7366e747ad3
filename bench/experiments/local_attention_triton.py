"""lmlab's Triton local attention at one HQLT 340M layer (16 x 2048 tokens, 8 heads of 128, W = 64, bf16):
each kernel's GPU time over its launch settings (blocks per program, pipelining stages, warps), then forward
and forward + backward of the op, compiled, with the shipped settings and the fastest found, against
FlexAttention.

    EXPERIMENT=local_attention_triton.py bash bench/gpu_session.sh experiment      # on the device
"""
import itertools

import torch
import triton
from triton.testing import do_bench

import lmlab.kernels.local_attention_triton as kernel
from lmlab.kernels.local_attention import local_attention

B, T, H, D, W = 16, 2048, 8, 128, 64
g = torch.Generator().manual_seed(0)
q, k, v, do = (torch.randn(B, T, H, D, generator=g).cuda().bfloat16() for _ in range(4))
leaves = [t.clone().requires_grad_() for t in (q, k, v)]
pos = torch.arange(T, device="cuda", dtype=torch.int32)[None].expand(B, T)
scale = D ** -0.5


def attend(backend, chunked=False):
    return lambda *a: local_attention(*a, window=W, chunked=chunked, backend=backend)


want = local_attention(*leaves, pos, pos, window=W, backend="torch")
want_grads = torch.autograd.grad(want, leaves, do)


def errors(backend):
    torch._dynamo.reset()
    out = torch.compile(attend(backend))(*leaves, pos, pos)
    grads = torch.autograd.grad(out, leaves, do)
    return " ".join(f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}"
                    for a, b in zip((out, *grads), (want, *want_grads)))


# each kernel alone, launched directly, over its settings
o, lse = kernel._attention_fwd(q, k, v, pos, pos, W, False, scale)
delta = torch.empty_like(lse)
dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
sizes = kernel._launch_sizes(q, W, False, scale)
strides = (pos.stride(0), pos.stride(0))
args = {"fwd": (kernel._fwd_kernel, (q, k, v, pos, pos, o, lse, T, *strides)),
        "dq": (kernel._bwd_dq_kernel, (q, k, v, o, do, lse, pos, pos, dq, delta, T, *strides)),
        "dkv": (kernel._bwd_dkv_kernel, (q, k, v, do, lse, delta, pos, pos, dk, dv, T, *strides))}
best = {}
for name, (fn, a) in args.items():
    for blocks, stages, warps in itertools.product((1, 2, 4, 8), (1, 2, 3), (4, 8)):
        grid = (triton.cdiv(T, kernel.BLOCK * blocks), B * H)
        try:
            ms = do_bench(lambda: fn[grid](*a, **sizes, BLOCKS=blocks, num_warps=warps, num_stages=stages),
                          warmup=25, rep=100)
        except Exception as e:  # e.g. out of shared memory
            print(f"{name:4s} blocks {blocks} stages {stages} warps {warps}: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:120]}", flush=True)
            continue
        print(f"{name:4s} blocks {blocks} stages {stages} warps {warps}: {ms:.4f} ms", flush=True)
        if ms < best.get(name, (None, float("inf")))[1]:
            best[name] = ((blocks, stages, warps), ms)
print("fastest:", {n: f"{s} {ms:.4f} ms" for n, (s, ms) in best.items()}, flush=True)


def timed(fn, label):
    def forward():
        with torch.no_grad():
            fn(q, k, v, pos, pos)

    def forward_backward():
        out = fn(*leaves, pos, pos)
        torch.autograd.grad(out, leaves, do)

    fwd, both = do_bench(forward, warmup=50, rep=300), do_bench(forward_backward, warmup=50, rep=300)
    print(f"{label:50s} forward {fwd:.3f} ms  forward+backward {both:.3f} ms  (backward ≈ {both - fwd:.3f})",
          flush=True)


shipped = dict(kernel.LAUNCH)
print(f"shipped {shipped}: relative error vs sdpa (out, dq, dk, dv) {errors('triton')}", flush=True)
timed(torch.compile(attend("triton")), f"triton compiled, shipped {shipped}")
kernel.LAUNCH = {n: settings for n, (settings, _) in best.items()}
print(f"fastest {kernel.LAUNCH}: relative error vs sdpa {errors('triton')}", flush=True)
torch._dynamo.reset()
timed(torch.compile(attend("triton")), f"triton compiled, fastest {kernel.LAUNCH}")
torch._dynamo.reset()
timed(torch.compile(attend("triton", chunked=True)), "triton compiled, chunked, fastest")
kernel.LAUNCH = shipped
torch._dynamo.reset()
print(f"flex: relative error vs sdpa {errors('flex')}", flush=True)
timed(torch.compile(attend("flex")), "flex compiled")
