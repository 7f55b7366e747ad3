"""Run by tests/test_kernels_selective_scan.py in a subprocess with TRITON_INTERPRET=1 (set before triton is
imported, which the interpreter needs): lmlab's Triton selective scan on CPU against the step-by-step
PyTorch one, through `selective_scan` (the CUDA-only health check is lifted), with 8-token chunks (64, the
kernel's own, in one case), 4-channel blocks and 3 backward programs (each then walks several chunks with
its scratch), so that tiny inputs cross chunk and channel-block boundaries. Prints one JSON line: case -> the
relative errors of y, the final states and the gradients of u, Δ, A, B, C (and the initial states), float32."""
import json

import torch
from test_kernels_recurrent import rel_err
from test_kernels_selective_scan import make_inputs, run_with_grads

from lmlab.kernels import dispatch, selective_scan_triton
from lmlab.kernels.selective_scan import OP, selective_scan, selective_scan_recurrent_torch

dispatch._health_checks[OP]["triton"] = lambda x: None
selective_scan_triton.CHUNK_SIZE, selective_scan_triton.BLOCK_D, selective_scan_triton.BWD_PROGRAMS = 8, 4, 3


def triton_scan(*args, **kwargs):
    return selective_scan(*args, backend="triton", **kwargs)


def errors(got, ref) -> list[float]:
    (y, state, grads), (y_ref, state_ref, grads_ref) = got, ref
    return [rel_err(y, y_ref), rel_err(state, state_ref),
            *(rel_err(grads[name], grads_ref[name]) for name in grads_ref)]


def without_final_state(fn):
    """fn with the final state left out (its gradient is then None, not zeros): a zero state in its place."""
    def run(*args, **kwargs):
        y, state = fn(*args, **{**kwargs, "output_final_state": False})
        sequences = len(kwargs["cu_seqlens"]) - 1 if kwargs.get("cu_seqlens") is not None else args[0].shape[0]
        return y, y.new_zeros(sequences, *args[2].shape, dtype=torch.float32)
    return run


def case(rows, T, D, *, lengths=None, with_h0=True, N=4, strong_decay=False, chunk=8, final_state_grad=True):
    selective_scan_triton.CHUNK_SIZE = chunk
    x = make_inputs(rows, T, D, N, seed=T + D)
    if strong_decay:
        x["delta"] = x["delta"] + 6.0
    cu_seqlens = None if lengths is None else torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    sequences = rows if lengths is None else len(lengths)
    h0 = torch.randn(sequences, D, N, generator=torch.Generator().manual_seed(2)) if with_h0 else None
    ref_fn, fn = (selective_scan_recurrent_torch, triton_scan) if final_state_grad else (
        without_final_state(selective_scan_recurrent_torch), without_final_state(triton_scan))
    ref = run_with_grads(ref_fn,
                         x if lengths is None else {k: v if k == "A" else v.flatten(0, 1)[None] for k, v in x.items()},
                         h0, cu_seqlens=cu_seqlens)
    got = run_with_grads(fn, x, h0, cu_seqlens=cu_seqlens)
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
    "rows shorter than a chunk, no final-state gradient": case(2, 5, 8, final_state_grad=False),
    "documents around the chunk size (0, 1, 7, 8, 9, 17, 3 tokens) over three rows": case(
        3, 15, 6, lengths=(0, 1, 7, 8, 9, 17, 3)),
    "documents of 0, 1, 7, 9, 3, 1 tokens, no initial states or final-state gradient": case(
        1, 21, 6, lengths=(0, 1, 7, 9, 3, 1), with_h0=False, final_state_grad=False),
    "packed documents, strong decays, initial states": case(1, 40, 4, lengths=(13, 1, 26), strong_decay=True),
    "64-token chunks: documents of 1, 63, 64, 65, 0, 2 tokens": case(
        1, 195, 4, lengths=(1, 63, 64, 65, 0, 2), chunk=64),
}))
