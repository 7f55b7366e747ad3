"""lmlab's Triton local attention against FlexAttention at one HQLT 340M layer (16 x 2048 tokens, 8 heads of
128, W = 64, bf16): forward and forward + backward times, eager and compiled, and the warps per program.

    EXPERIMENT=local_attention_triton.py bash bench/gpu_session.sh experiment      # on the device
"""
import torch
from triton.testing import do_bench

import lmlab.kernels.local_attention_triton as kernel
from lmlab.kernels.local_attention import local_attention

B, T, H, D, W = 16, 2048, 8, 128, 64
g = torch.Generator().manual_seed(0)
q, k, v, do = (torch.randn(B, T, H, D, generator=g).cuda().bfloat16() for _ in range(4))
leaves = [t.clone().requires_grad_() for t in (q, k, v)]
pos = torch.arange(T, device="cuda")[None]


def timed(fn, label):
    def forward():
        with torch.no_grad():
            fn(q, k, v, pos, pos)

    def forward_backward():
        out = fn(*leaves, pos, pos)
        torch.autograd.grad(out, leaves, do)

    fwd, both = do_bench(forward, warmup=50, rep=300), do_bench(forward_backward, warmup=50, rep=300)
    print(f"{label:40s} forward {fwd:.3f} ms  forward+backward {both:.3f} ms  (backward ≈ {both - fwd:.3f})",
          flush=True)
    return fn


def attend(backend, chunked=False):
    return lambda *a: local_attention(*a, window=W, chunked=chunked, backend=backend)


want = local_attention(*leaves, pos, pos, window=W, backend="torch")
want_grads = torch.autograd.grad(want, leaves, do)
for backend in ("triton", "flex"):
    out = torch.compile(attend(backend))(*leaves, pos, pos)
    grads = torch.autograd.grad(out, leaves, do)
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item()
            for a, b in zip((out, *grads), (want, *want_grads))]
    print(f"{backend}: relative error vs sdpa (out, dq, dk, dv) " + " ".join(f"{e:.1e}" for e in errs))

timed(attend("triton"), "triton eager")
timed(torch.compile(attend("triton")), "triton compiled")
timed(torch.compile(attend("triton", chunked=True)), "triton compiled, chunked")
timed(torch.compile(attend("flex")), "flex compiled")
for warps in (2, 8):
    kernel.NUM_WARPS = warps
    timed(attend("triton"), f"triton eager, {warps} warps")
