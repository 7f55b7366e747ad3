"""Run by tests/test_kernels_basic.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported,
which the interpreter needs): lmlab's Triton short convolution on CPU against the PyTorch version, through
`short_conv` (the CUDA-only health check is lifted). Prints one JSON line: case -> max relative error of
y, the final state (if any), dx, dweight and dbias (if any), in float32."""
import json

import torch

from lmlab.kernels import dispatch
from lmlab.kernels.conv import short_conv

dispatch._health_checks["short_conv"]["triton"] = lambda x: None


def case(B, T, D, W, *, lengths=None, bias=True, activation="silu", strided=False, final_state=False):
    g = torch.Generator().manual_seed(T * D + W)
    x = torch.randn(B, T, 2 * D if strided else D, generator=g)[..., :D]  # strided: a projection's slice
    weight, b = torch.randn(D, 1, W, generator=g), torch.randn(D, generator=g) if bias else None
    cu_seqlens = None if lengths is None else torch.tensor([0, *lengths]).cumsum(0)
    dy = torch.randn(B, T, D, generator=g)
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, b) if t is not None]
        y, state = short_conv(leaves[0], leaves[1], leaves[2] if bias else None, activation=activation,
                              output_final_state=final_state, cu_seqlens=cu_seqlens, backend=backend)
        grads = torch.autograd.grad((y * dy).sum(), leaves)
        results.append([y] + ([state] if final_state else []) + list(grads))
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results)]


print(json.dumps({
    "dense rows, silu, bias, final state": case(2, 100, 96, 4, final_state=True),
    "one row, no activation, no bias": case(1, 130, 64, 4, bias=False, activation=None),
    "packed documents over two rows, final state": case(2, 150, 80, 4, lengths=(3, 37, 1, 109, 150),
                                                        final_state=True),
    "strided input, W=3, no bias": case(1, 70, 40, 3, bias=False, strided=True),
    "channels over two blocks of every kernel": case(1, 90, 200, 4),
}))
