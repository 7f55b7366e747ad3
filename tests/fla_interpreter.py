"""Run by tests/test_kernels_recurrent.py in a subprocess with TRITON_INTERPRET=1 (set before triton and fla
are imported, which the interpreter needs): fla's Triton `chunk_bwd_dqkwg` on CPU against lmlab's PyTorch
twin `dqkwg_torch` and its Triton kernel `dqkwg_triton`, as the gated delta rule calls it (w, dv) and as simple GLA
does (neither; float32 chunk states), with mild decays and with decays past 2^-128 within a partial chunk (Mamba2's
at init: a padding token's decay relative to such a token overflows float32). Prints one JSON line: case -> max
relative error per output (dq, dk, dw, dg; dq, dk, dg without w)."""
import gc
import json

import torch
from fla.ops.common.chunk_o import chunk_bwd_dqkwg
from fla.ops.utils import chunk_local_cumsum
from fla.ops.utils.index import prepare_chunk_indices
from triton.runtime.autotuner import Autotuner

from lmlab.kernels.gated_delta_rule_fla import dqkwg_torch, dqkwg_triton

for tuner in (obj for obj in gc.get_objects() if isinstance(obj, Autotuner)):
    tuner.configs = tuner.configs[:1]  # the interpreter cannot time configs: keep the first of each


def case(B, T, H, HV, K, V, cu_seqlens=None, implementation=dqkwg_torch, with_w=True, decay=0.3):
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v, do, dv = (torch.randn(B, T, HV, V) for _ in range(3))
    w, dv = (torch.randn(B, T, HV, K), dv) if with_w else (None, None)
    chunk_indices = None if cu_seqlens is None else prepare_chunk_indices(cu_seqlens, 64)
    g = chunk_local_cumsum(-torch.rand(B, T, HV) * decay, chunk_size=64, cu_seqlens=cu_seqlens,
                           chunk_indices=chunk_indices)
    n_chunks = -(-T // 64) if cu_seqlens is None else len(chunk_indices)
    h, dh = torch.randn(B, n_chunks, HV, K, V), torch.randn(B, n_chunks, HV, K, V)
    args = dict(q=q, k=k, v=v, w=w, g=g, h=h, dv=dv, do=do, dh=dh, scale=0.3, cu_seqlens=cu_seqlens,
                chunk_indices=chunk_indices)
    ref, got = chunk_bwd_dqkwg(**args), implementation(**args)
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref) if b is not None]


torch.manual_seed(0)
print(json.dumps({
    "dense": case(2, 128, 2, 2, 32, 16),
    "partial last chunk": case(1, 200, 2, 2, 32, 32),
    "grouped value heads": case(1, 150, 2, 4, 16, 32),
    "packed documents": case(1, 300, 2, 2, 32, 32, cu_seqlens=torch.tensor([0, 37, 64, 200, 300])),
    "lmlab's Triton kernel, dense": case(2, 128, 2, 2, 32, 16, implementation=dqkwg_triton),
    "lmlab's Triton kernel, partial last chunk, two key blocks": case(1, 200, 2, 2, 96, 80,
                                                                      implementation=dqkwg_triton),
    "lmlab's Triton kernel, grouped value heads": case(1, 150, 2, 4, 16, 32, implementation=dqkwg_triton),
    "lmlab's Triton kernel, packed documents": case(1, 300, 2, 2, 32, 32, implementation=dqkwg_triton,
                                                    cu_seqlens=torch.tensor([0, 37, 64, 200, 300])),
    "simple GLA (no w), twin": case(1, 200, 2, 2, 96, 80, with_w=False),
    "simple GLA (no w), lmlab's Triton kernel, two key blocks": case(1, 200, 2, 2, 96, 80, with_w=False,
                                                                     implementation=dqkwg_triton),
    "simple GLA (no w), lmlab's Triton kernel, packed documents": case(
        1, 300, 2, 2, 32, 32, with_w=False, implementation=dqkwg_triton,
        cu_seqlens=torch.tensor([0, 37, 64, 200, 300])),
    # log2-decays of -5 a token on average: the chunk-local sum passes -128 within partial chunks of 27-37 tokens
    "strong decays, twin, packed documents": case(1, 300, 2, 2, 32, 32, cu_seqlens=torch.tensor([0, 37, 64, 200, 300]),
                                                  decay=10),
    "strong decays, lmlab's Triton kernel, packed documents": case(
        1, 300, 2, 2, 32, 32, implementation=dqkwg_triton, cu_seqlens=torch.tensor([0, 37, 64, 200, 300]), decay=10),
    "strong decays, simple GLA (no w), lmlab's Triton kernel, a partial last chunk": case(
        1, 100, 2, 2, 32, 32, with_w=False, implementation=dqkwg_triton, decay=10),
}))
