"""Run by tests/test_kernels_chunk_read.py in a subprocess with TRITON_INTERPRET=1 (set before triton and fla
are imported): lmlab's fla backend of the chunk-read delta rule (fla's delta-rule kernels with a zero
intra-chunk term, `fla_chunk.chunk_delta_rule_chunk_read`) on CPU against the PyTorch chunk kernel, outputs
and gradients. Prints one JSON line: case -> max relative error per tensor (o, dq, dk, dv, dbeta)."""
import gc
import json

import torch
import torch.nn.functional as F
import triton.language as tl
from fla.ops.common import chunk_delta_h
from triton.runtime.autotuner import Autotuner

from lmlab.kernels.delta_rule_chunk_read import delta_rule_chunk_read
from lmlab.kernels.fla_chunk import chunk_delta_rule_chunk_read

for tuner in (obj for obj in gc.get_objects() if isinstance(obj, Autotuner)):
    tuner.configs = tuner.configs[:1]  # the interpreter cannot time configs: keep the first of each


def _interpreted_range(*bounds):
    """`range` for fla's state kernels, whose loop counter is used as a Triton value (`i_t.to(...)`): compiled,
    Triton gives one; interpreted, Python's range gives ints. Yields the counter as an interpreter scalar."""
    for i in range(*(b.handle.data.item() if hasattr(b, "handle") else b for b in bounds)):
        yield tl.full([], i, tl.int32)


chunk_delta_h.range = _interpreted_range  # shadows the builtin in that module only


def case(B, T, H, K, V, cu_seqlens=None):
    q, k = (F.normalize(torch.randn(B, T, H, K), dim=-1) for _ in range(2))
    v, do = torch.randn(B, T, H, V), torch.randn(B, T, H, V)
    beta = torch.rand(B, T, H) * 2  # allow_neg_eigval's range
    fla = lambda *x: chunk_delta_rule_chunk_read(*x, cu_seqlens=cu_seqlens)[0]  # noqa: E731
    torch_chunk = lambda *x: delta_rule_chunk_read(  # noqa: E731
        *x, None, chunk_size=64, cu_seqlens=cu_seqlens, backend="torch")[0]
    results = []
    for kernel in (fla, torch_chunk):
        inputs = [x.clone().requires_grad_() for x in (q, k, v, beta)]
        o = kernel(*inputs)
        o.backward(do)
        results.append([o.detach()] + [x.grad for x in inputs])
    got, ref = results
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)]


torch.manual_seed(0)
print(json.dumps({
    "dense, two rows, partial last chunk": case(2, 150, 2, 32, 16),
    "packed documents across chunk boundaries": case(1, 320, 2, 32, 32,
                                                     cu_seqlens=torch.tensor([0, 37, 64, 160, 200, 320])),
}))
