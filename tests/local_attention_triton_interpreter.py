"""Run by tests/test_kernels_local_attention.py in a subprocess with TRITON_INTERPRET=1 (set before triton is
imported, which the interpreter needs): lmlab's Triton local attention on CPU against the float32 reference,
through `local_attention` (the CUDA-only health check is lifted). Prints one JSON line: case -> max relative
error of the output, dq, dk and dv, in float32."""
import json

import torch

from lmlab.kernels import dispatch
from lmlab.kernels.local_attention import local_attention, local_attention_reference

dispatch._health_checks["local_attention"]["triton"] = lambda x: None


def case(positions, window, *, chunked=False, H=2, D=32, batch_positions=False):
    positions = torch.stack(positions) if batch_positions else positions[0][None]
    B, T = (2 if batch_positions else 1), positions.shape[1]
    g = torch.Generator().manual_seed(T * 31 + window)
    q, k, v, do = (torch.randn(B, T, H, D, generator=g) for _ in range(4))
    results = []
    for fn, kw in ((local_attention, dict(backend="triton")), (local_attention_reference, {})):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, positions, positions, window=window, chunked=chunked, **kw)
        results.append([out, *torch.autograd.grad((out * do).sum(), leaves)])
    # relative to the largest entry, at least 1 (W = 1: dq and dk are exactly 0 in the reference)
    return [((a - b).abs().max() / b.abs().max().clamp_min(1)).item() for a, b in zip(*results)]


def docs(*lengths):
    return torch.cat([torch.arange(n) for n in lengths])


print(json.dumps({
    "one document, W=64, three blocks and a part": case([torch.arange(200)], 64),
    "W=1 (each token itself)": case([torch.arange(70)], 1),
    "W=7, packed documents across block borders": case([docs(5, 60, 1, 70, 44)], 7),
    "W=64, packed documents, two rows": case([docs(100, 28, 52), docs(63, 65, 52)], 64, batch_positions=True),
    "W=64 chunked (Delayed-Chunk), packed": case([docs(150, 40)], 64, chunked=True),
    "W=20 chunked, left padding (a run of 0s)": case([torch.cat([torch.zeros(30, dtype=torch.long),
                                                                 torch.arange(90)])], 20, chunked=True),
    "fewer tokens than a block, D=16, 3 heads": case([torch.arange(37)], 64, H=3, D=16),
}))
