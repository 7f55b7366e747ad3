"""HQLT's local attention at sync_hqlt_ch64_…_340M's layer size (16 x 2048 tokens in packed documents, 8 heads
of 128, window 64, bf16): lmlab's shipped FlexAttention path (compiled, as in training's blocks) against fla
0.6.0's sliding-window Triton kernel (`fla.ops.attn.parallel_attn(window_size=W, cu_seqlens=...)`, the
documents as one packed row), forward and forward + backward, and the largest difference of outputs and
gradients. Issue 20's MFU margin: FlexAttention's kernels took ≈ 16 ms of the 235 ms step on an H100, about
2.5–3× the time of the bytes they move.
    python bench/experiments/window_attention_kernels.py     (a GPU with fla)"""

import torch
from fla.ops.attn import parallel_attn

from lmlab.kernels import local_attention as la

B, T, H, D, W = 16, 2048, 8, 128, 64
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, T, H, D, generator=g).cuda().bfloat16().requires_grad_() for _ in range(3))
dout = torch.randn(B, T, H, D, generator=g).cuda().bfloat16()
# packed documents: positions restart at random boundaries, as in training
starts = torch.zeros(B, T, dtype=torch.bool)
starts[:, 0] = True
starts[torch.rand(B, T, generator=g) < 4 / T] = True
index = torch.arange(T).expand(B, T)
positions = (index - torch.cummax(torch.where(starts, index, 0), dim=1).values).cuda()
cu_seqlens = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([B * T])]).cuda()


def flex(q, k, v):
    return la.local_attention_flex(q, k, v, positions, positions, window=W, attend=la.flex_attention)


def fla_window(q, k, v):
    packed = (t.reshape(1, B * T, H, D) for t in (q, k, v))
    return parallel_attn(*packed, window_size=W, cu_seqlens=cu_seqlens).view(B, T, H, D)


def step(attend):
    for t in (q, k, v):
        t.grad = None
    o = attend(q, k, v)
    o.backward(dout)
    return [o.detach().float(), *(t.grad.float() for t in (q, k, v))]


def timed(attend, repeats=30):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    forward = []
    for _ in range(repeats):
        start.record()
        o = attend(q, k, v)
        end.record()
        torch.cuda.synchronize()
        forward.append(start.elapsed_time(end))
        o.backward(dout)
    start.record()
    for _ in range(repeats):
        attend(q, k, v).backward(dout)
    end.record()
    torch.cuda.synchronize()
    return sorted(forward)[repeats // 2], start.elapsed_time(end) / repeats


reference = None
for name, attend in (("flex (shipped)", torch.compile(flex)), ("fla parallel_attn", fla_window),
                     ("flex again", torch.compile(flex))):
    try:
        results = step(attend)
        step(attend)  # warm-up
        forward_ms, total_ms = timed(attend)
    except Exception as exc:  # report and go on to the next
        print(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
        continue
    reference = reference or results
    errors = ", ".join(f"{n} {float((a - b).abs().max()):.2e}" for n, a, b in zip("o q k v".split(), results, reference))
    print(f"{name}: forward {forward_ms:.3f} ms, forward + backward {total_ms:.3f} ms; "
          f"largest difference from flex: {errors}", flush=True)
