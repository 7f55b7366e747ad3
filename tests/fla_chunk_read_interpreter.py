"""Run by tests/test_kernels_chunk_read.py in a subprocess with TRITON_INTERPRET=1 (set before triton and fla
are imported): lmlab's fla backend of the chunk-read delta rule (fla's delta-rule kernels with a zero
intra-chunk term, `fla_chunk.chunk_delta_rule_chunk_read`) on CPU against the PyTorch chunk kernel, outputs
and gradients; and its evaluation path (`delta_rule_chunk_read_fla_grid`: positions and states, no autograd)
against the PyTorch chunk kernel, outputs and final states. Prints one JSON line: case -> max relative error
per tensor (o, dq, dk, dv, dbeta; o, S, R)."""
import gc
import json

import torch
import torch.nn.functional as F
import triton.language as tl
from fla.ops.common import chunk_delta_h
from triton.runtime.autotuner import Autotuner

from lmlab.kernels.delta_rule_chunk_read import delta_rule_chunk_read, delta_rule_chunk_read_fla_grid
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


def states_case(lengths, starts, states):
    """Rows of `lengths` real tokens, left-padded to the longest (rows from position 0 only, as positions
    count real tokens), whose first token is at position `starts[r]` (a call continuing an earlier one, with
    `states`), zero inputs at padding as the models give them: outputs and final states (S, R) of the fla
    grid against the PyTorch chunk kernel."""
    B, T, H, K, V = len(lengths), max(lengths), 2, 32, 16
    q, k = (F.normalize(torch.randn(B, T, H, K), dim=-1) for _ in range(2))
    v, beta = torch.randn(B, T, H, V), torch.rand(B, T, H) * 2
    real = torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]
    q, k, v, beta = (x * real.view(B, T, *[1] * (x.dim() - 2)) for x in (q, k, v, beta))
    positions = ((real.cumsum(1) - 1).clamp(min=0) + torch.tensor(starts)[:, None])
    h0, r0 = (torch.randn(B, H, K, V) for _ in range(2)) if states else (None, None)
    kwargs = dict(initial_state=h0, initial_read_state=r0, output_final_state=True)
    got = delta_rule_chunk_read_fla_grid(q, k, v, beta, positions, **kwargs)
    ref = delta_rule_chunk_read(q, k, v, beta, positions, chunk_size=64, backend="torch", **kwargs)
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)]


torch.manual_seed(0)
print(json.dumps({
    "grid: left-padded contexts from position 0": states_case([150, 3, 64, 100], [0] * 4, states=False),
    "grid: continuations inside, at and across chunks": states_case([130] * 4, [70, 128, 5, 63], states=True),
    "grid: short continuations": states_case([20] * 3, [60, 64, 5], states=True),
    "dense, two rows, partial last chunk": case(2, 150, 2, 32, 16),
    "packed documents across chunk boundaries": case(1, 320, 2, 32, 32,
                                                     cu_seqlens=torch.tensor([0, 37, 64, 160, 200, 320])),
}))
