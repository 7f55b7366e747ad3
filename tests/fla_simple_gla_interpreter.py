"""Run by tests/test_kernels_recurrent.py in a subprocess with TRITON_INTERPRET=1 (set before triton and fla
are imported, which the interpreter needs): fla's Triton simple-GLA kernels, through lmlab's custom op
(`fla_chunk.chunk_simple_gla`, Mamba2's fast path), on CPU against lmlab's torch chunk kernel, with the backward's
dqkwg step both fla's and lmlab's (which replaces fla's on Hopper with triton < 3.7.1); and fla's GLA kernels
(per-channel gates: GLA's and HGRN2's fast path) through `fla_chunk.chunk_gla`. Prints one JSON line: case ->
relative error per tensor (o, final state, dq, dk, dv, dg, dh0)."""
import builtins
import gc
import json

import torch
import torch.nn.functional as F
import triton.language as tl
from fla.ops.common import chunk_h, chunk_o
from fla.ops.gla import chunk as gla_chunk
from triton.runtime.autotuner import Autotuner

from lmlab.kernels import gated_delta_rule_fla
from lmlab.kernels.fla_chunk import chunk_gla, chunk_simple_gla
from lmlab.kernels.gla import gla_chunk_torch
from lmlab.kernels.simple_gla import simple_gla_chunk_torch

for tuner in (obj for obj in gc.get_objects() if isinstance(obj, Autotuner)):
    tuner.configs = tuner.configs[:1]  # the interpreter cannot time configs: keep the first of each


def tensor_range(*bounds):
    """`range` for the kernels' loops: the interpreter runs them as Python loops, whose index has no `.to()`."""
    for i in builtins.range(*(int(b) for b in bounds)):
        yield tl.full((), i, tl.int32)


for module in (chunk_h, chunk_o, gla_chunk):
    module.range = tensor_range


def run(fn, x, h0, **kwargs):
    leaves = {name: t.detach().clone().requires_grad_() for name, t in {**x, "h0": h0}.items()}
    o, state = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], scale=0.3, initial_state=leaves["h0"],
                  output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (state * torch.randn(state.shape, generator=gen)).sum()
    loss.backward()
    return [o, state, *(leaves[name].grad for name in ("q", "k", "v", "g", "h0"))]


def case(B, T, H, K, V, cu_seqlens=None, gate_bias=2.0, per_channel=False):
    gen = torch.Generator().manual_seed(0)
    x = {name: torch.randn(B, T, H, D, generator=gen) for name, D in (("q", K), ("k", K), ("v", V))}
    x["g"] = F.logsigmoid(torch.randn(B, T, H, *([K] if per_channel else []), generator=gen) + gate_bias)
    h0 = torch.randn(B if cu_seqlens is None else len(cu_seqlens) - 1, H, K, V, generator=gen)
    kwargs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    fla_op, torch_op = (chunk_gla, gla_chunk_torch) if per_channel else (chunk_simple_gla, simple_gla_chunk_torch)
    got, ref = run(fla_op, x, h0, **kwargs), run(torch_op, x, h0, **kwargs)
    return [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)]


packed = torch.tensor([0, 37, 64, 140, 150], dtype=torch.int32)
errors = {}
for lmlab_dqkwg in (False, True):
    gated_delta_rule_fla.TRITON_BREAKS_HOPPER_BACKWARD = lmlab_dqkwg
    which = "lmlab's dqkwg" if lmlab_dqkwg else "fla's dqkwg"
    errors[f"dense, a partial last chunk, {which}"] = case(2, 100, 2, 16, 32)
    errors[f"packed documents, {which}"] = case(1, 150, 2, 16, 32, cu_seqlens=packed)
    # decays of ≈ e^-3 a token, as Mamba2's strongest heads at init: past 2^-128 within the 37-token document
    errors[f"packed documents, strong decays, {which}"] = case(1, 150, 2, 16, 32, cu_seqlens=packed, gate_bias=-3)
errors["GLA, dense, a partial last chunk"] = case(2, 100, 2, 16, 32, per_channel=True)
errors["GLA, packed documents"] = case(1, 150, 2, 16, 32, cu_seqlens=packed, per_channel=True)
print(json.dumps(errors))
