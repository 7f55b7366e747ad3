"""Step 9 experiment: lmlab's own host time per train step around an opaque chunk op, CPU, tiny sizes.

The GLA op is replaced by a stand-in with negligible host work of its own (o = q * k * v summed over K,
broadcast to V), reached three ways:
  break  - a torch.compiler.disable'd function, as lmlab calls fla's chunk ops today (a graph break per layer)
  opaque - a torch.library custom op with its own backward op (no graph break; inductor sees one opaque node)
  inline - plain PyTorch, traced into the compiled block (the floor: no host cost for the op at all)
  PYTHONPATH=src python bench/experiments/host_overhead.py break|opaque|inline
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import train_bench as bench  # noqa: E402
from lmlab.kernels import gla as gla_mod  # noqa: E402


def stand_in(q, k, v, gk):
    return (q * k * gk.exp()).sum(-1, keepdim=True) * v


@torch.library.custom_op("lmlab_experiment::chunk_fwd", mutates_args=())
def chunk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
    return stand_in(q, k, v, gk)


@chunk_fwd.register_fake
def _(q, k, v, gk):
    return torch.empty_like(v)


@torch.library.custom_op("lmlab_experiment::chunk_bwd", mutates_args=())
def chunk_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, do: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    e = gk.exp()
    s = (q * k * e).sum(-1, keepdim=True)
    ds = (do * v).sum(-1, keepdim=True)
    return ds * k * e, ds * q * e, s * do, ds * q * k * e


@chunk_bwd.register_fake
def _(q, k, v, gk, do):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(gk)


def setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def backward(ctx, do):
    return chunk_bwd(*ctx.saved_tensors, do)


chunk_fwd.register_autograd(backward, setup_context=setup)


def make_kernel(mode):
    def kernel(q, k, v, gk, *, scale, initial_state, output_final_state, cu_seqlens):
        if mode == "opaque":
            return chunk_fwd(q, k, v, gk), None
        return stand_in(q, k, v, gk), None
    return torch.compiler.disable(kernel) if mode == "break" else kernel


mode = sys.argv[1]
gla_mod.gla_chunk_torch = make_kernel(mode)
cfg = json.loads((REPO / "configs" / "gla_340M.json").read_text())
cfg.update(hidden_size=64, num_heads=2, vocab_size=256)
path = Path(tempfile.mkdtemp()) / "gla_tiny.json"
path.write_text(json.dumps(cfg))
args = bench.parse_args(["--configs", str(path), "--device", "cpu", "--seq-len", "16", "--seqs-per-step", "4"])
step, _ = bench.lmlab_builder(path, args, "auto")(1)
import gc
import statistics
torch.set_num_threads(1)
gc.disable()
for _ in range(3):
    step()
times = []
for _ in range(30):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
best = statistics.median(times)
calls = cfg["num_hidden_layers"] * 4
print(f"{mode}: {best * 1e3:.1f} ms per step ({calls} layer calls) = {best * 1e3 / calls:.2f} ms per layer call")
