"""Run by tests/test_kernels_selective_scan.py in a subprocess with TRITON_INTERPRET=1 (set before triton is
imported, which the interpreter needs): lmlab's Triton selective scan on CPU against the step-by-step
PyTorch one, through `selective_scan` (the CUDA-only health check is lifted), with 8-token chunks, 4-channel
blocks and 2 backward lanes, so that tiny inputs cross chunk and channel-block boundaries and a backward
program runs several documents. Prints one JSON line: case -> the relative errors of y, the final states and
the gradients of u, Δ, A, B, C (and the initial states), float32."""
import json

import torch
from test_kernels_recurrent import rel_err
from test_kernels_selective_scan import make_inputs, run_with_grads

from lmlab.kernels import dispatch, selective_scan_triton
from lmlab.kernels.selective_scan import OP, selective_scan, selective_scan_recurrent_torch

dispatch._health_checks[OP]["triton"] = lambda x: None
selective_scan_triton.CHUNK_SIZE, selective_scan_triton.BLOCK_D, selective_scan_triton.LANES = 8, 4, 2


def triton_scan(*args, **kwargs):
    return selective_scan(*args, backend="triton", **kwargs)


def errors(got, ref) -> list[float]:
    (y, state, grads), (y_ref, state_ref, grads_ref) = got, ref
    return [rel_err(y, y_ref), rel_err(state, state_ref),
            *(rel_err(grads[name], grads_ref[name]) for name in grads_ref)]


def case(rows, T, D, *, lengths=None, with_h0=True, N=4, strong_decay=False):
    x = make_inputs(rows, T, D, N, seed=T + D)
    if strong_decay:
        x["delta"] = x["delta"] + 6.0
    cu_seqlens = None if lengths is None else torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    sequences = rows if lengths is None else len(lengths)
    h0 = torch.randn(sequences, D, N, generator=torch.Generator().manual_seed(2)) if with_h0 else None
    ref = run_with_grads(selective_scan_recurrent_torch,
                         x if lengths is None else {k: v if k == "A" else v.flatten(0, 1)[None] for k, v in x.items()},
                         h0, cu_seqlens=cu_seqlens)
    got = run_with_grads(triton_scan, x, h0, cu_seqlens=cu_seqlens)
    if lengths is not None:  # the op returns the rows' shape, the reference the packed stream's
        got = (got[0].reshape(ref[0].shape), *got[1:])
        got[2].update({k: v.reshape(ref[2][k].shape) for k, v in got[2].items()})
    return errors(got, ref)


print(json.dumps({
    "two rows, initial state, T not a multiple of the chunk": case(2, 21, 8),
    "one row without initial state, D not a multiple of the block, N = 3": case(1, 17, 6, with_h0=False, N=3),
    "packed documents over two rows (one empty, ends mid-chunk), initial states": case(
        2, 20, 8, lengths=(3, 13, 0, 1, 19, 4)),
    "packed documents without initial states": case(2, 20, 8, lengths=(9, 8, 23), with_h0=False),
    "strong decays (Δ + 6)": case(1, 24, 4, strong_decay=True),
}))
