"""Run by tests/test_kernels_gsa.py in a subprocess with TRITON_INTERPRET=1 (set before triton and fla are
imported, which the interpreter needs): fla's Triton GSA kernels through lmlab's custom ops
(`fla_chunk.chunk_gsa`) on CPU against lmlab's torch chunk kernel `gsa_chunk_torch` and against fla's own
`chunk_gsa` (the same kernels in the same steps: equal); compiled with fullgraph=True (one graph, forward and
backward through the fake implementations) against eager; and torch.library.opcheck on both ops (their fake results
against the real ones, and the autograd registration). Prints one JSON line: case -> relative error per tensor
(o, Hk, Hv, dq, dk, dv, ds, dg, dhk0, dhv0)."""
import builtins
import gc
import json

import torch
import torch.nn.functional as F
import triton.language as tl
from fla.ops.common import chunk_h
from fla.ops.gsa import chunk_gsa as fla_chunk_gsa
from triton.runtime.autotuner import Autotuner

from lmlab.kernels.fla_chunk import chunk_gsa
from lmlab.kernels.gsa import gsa_chunk_torch

for tuner in (obj for obj in gc.get_objects() if isinstance(obj, Autotuner)):
    tuner.configs = tuner.configs[:1]  # the interpreter cannot time configs: keep the first of each


def tensor_range(*bounds):
    """`range` for the state kernels' loops: the interpreter runs them as Python loops, whose index has no `.to()`."""
    for i in builtins.range(*(int(b) for b in bounds)):
        yield tl.full((), i, tl.int32)


chunk_h.range = tensor_range  # shadows the builtin in that module only


def run(fn, x, h0, **kwargs):
    leaves = {name: t.detach().clone().requires_grad_() for name, t in {**x, "hk0": h0[0], "hv0": h0[1]}.items()}
    o, (hk, hv) = fn(leaves["q"], leaves["k"], leaves["v"], leaves["s"], leaves["g"], scale=0.3,
                     initial_state=(leaves["hk0"], leaves["hv0"]), output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in (o, hk, hv))
    loss.backward()
    return [o, hk, hv, *(leaves[name].grad for name in ("q", "k", "v", "s", "g", "hk0", "hv0"))]


def inputs(B, T, H, K, V, M, N):
    """As GSA's layer makes them: g = logsigmoid(·) / 4, s = 1 − exp(g)."""
    gen = torch.Generator().manual_seed(0)
    x = {name: torch.randn(B, T, H, D, generator=gen) for name, D in (("q", K), ("k", K), ("v", V))}
    x["g"] = F.logsigmoid(torch.randn(B, T, H, M, generator=gen)) / 4
    x["s"] = 1 - x["g"].exp()
    return x, (torch.randn(N, H, K, M, generator=gen), torch.randn(N, H, M, V, generator=gen))


def case(B, T, H, K, V, M, cu_seqlens=None, kernel=chunk_gsa, references=(gsa_chunk_torch,)):
    """`kernel`'s relative errors against each of `references` (one run of the kernel: the interpreter is slow)."""
    x, h0 = inputs(B, T, H, K, V, M, B if cu_seqlens is None else len(cu_seqlens) - 1)
    kwargs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    got = run(kernel, x, h0, **kwargs)
    return [[((a - b).norm() / b.norm()).item() for a, b in zip(got, run(reference, x, h0, **kwargs))]
            for reference in references]


def opcheck(cu_seqlens=None):
    """torch.library.opcheck on both ops: packed documents with initial and final states (and their gradients),
    dense rows with neither (the empty stand-ins)."""
    N = 1 if cu_seqlens is None else len(cu_seqlens) - 1
    x, (hk0, hv0) = inputs(1, 70, 1, 16, 16, 8, N)
    hk0, hv0 = (hk0, hv0) if cu_seqlens is not None else (None, None)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    forward = [x["q"].requires_grad_(), x["k"], x["v"], x["s"], x["g"], 0.3, hk0, hv0, cu_seqlens is not None,
               cu_seqlens]
    torch.library.opcheck(torch.ops.lmlab.fla_gsa_forward, forward, test_utils=tests)
    _, _, _, ok, p, Av = torch.ops.lmlab.fla_gsa_forward(*forward)
    dh = (None, None) if cu_seqlens is None else (torch.randn_like(hk0), torch.randn_like(hv0))
    backward = [*(t.detach() for t in forward[:5]), ok, p, Av, 0.3, hk0, hv0, torch.randn_like(x["v"]), *dh, cu_seqlens]
    torch.library.opcheck(torch.ops.lmlab.fla_gsa_backward, backward, test_utils=("test_schema", "test_faketensor"))


errors = {}
errors["dense, a partial last chunk"], = case(2, 80, 2, 16, 32, 8)
errors["packed documents"], errors["packed documents, against fla's chunk_gsa"] = case(
    1, 110, 2, 16, 32, 8, cu_seqlens=torch.tensor([0, 20, 95, 110], dtype=torch.int32),  # one of two chunks
    references=(gsa_chunk_torch, fla_chunk_gsa))
two_documents = torch.tensor([0, 30, 70], dtype=torch.int32)
errors["compiled, packed documents"], = case(1, 70, 1, 16, 16, 8, cu_seqlens=two_documents,
                                             kernel=torch.compile(chunk_gsa, fullgraph=True, backend="aot_eager"),
                                             references=(chunk_gsa,))
opcheck()
opcheck(two_documents)
print(json.dumps(errors))
