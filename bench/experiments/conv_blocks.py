"""Conv kernel block sizes: GPU time of each of `kernels/conv_triton.py`'s three kernels per (BLOCK_T, BLOCK_D,
num_warps), on the short convs of gated_deltanet_340M (D 1536 and 3072) and delta_net_340M (D 1024), one
micro-batch of 16 x 2048 packed tokens, bf16. Prints one JSON line per (kernel, D): the configs by time.
  PYTHONPATH=src python bench/experiments/conv_blocks.py
"""
import itertools
import json

import torch
import triton
from triton.testing import do_bench

from lmlab.kernels import conv_triton as ct

T, W = 16 * 2048, 4
CONFIGS = [(bt, bd, warps) for bt, bd, warps in itertools.product((32, 64, 128, 256), (32, 64, 128), (4, 8))
           if bt * bd <= 16384]


def launchers(D: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    dy, g, out = torch.randn_like(x), torch.empty_like(x), torch.empty_like(x)
    weight = torch.randn(D, W, device="cuda", dtype=torch.bfloat16, generator=gen)
    positions = (torch.arange(T, device="cuda") % 2048).to(torch.int32)

    def fwd(bt, bd, warps):
        grid = (triton.cdiv(T, bt), triton.cdiv(D, bd))
        return lambda: ct._conv_fwd_kernel[grid](x, weight, weight, positions, out, T, D, D, W=W, BT=bt, BD=bd,
                                                 HAS_BIAS=False, SILU=True, num_warps=warps)

    def gate(bt, bd, warps):
        grid = (triton.cdiv(T, bt), triton.cdiv(D, bd))
        dw_blocks = torch.empty(grid[0], D, W, device="cuda")
        return lambda: ct._conv_bwd_gate_kernel[grid](x, weight, weight, positions, dy, g, dw_blocks, dw_blocks,
                                                      T, D, D, D, W=W, BT=bt, BD=bd, HAS_BIAS=False, SILU=True,
                                                      num_warps=warps)

    def input_(bt, bd, warps):
        grid = (triton.cdiv(T, bt), triton.cdiv(D, bd))
        return lambda: ct._conv_bwd_input_kernel[grid](g, weight, positions, out, T, D, W=W, BT=bt, BD=bd,
                                                       num_warps=warps)

    return {"fwd": fwd, "bwd_gate": gate, "bwd_input": input_}


def main() -> None:
    current = (ct.BLOCK_T, ct.BLOCK_D, ct.NUM_WARPS)
    for D in (1024, 1536, 3072):
        for name, make in launchers(D).items():
            times = {cfg: do_bench(make(*cfg), warmup=10, rep=50) * 1e3 for cfg in CONFIGS}
            ranked = sorted(times.items(), key=lambda kv: kv[1])
            print(json.dumps({"kernel": name, "D": D, "current_us": round(times[current], 1),
                              "best": [[*cfg, round(us, 1)] for cfg, us in ranked[:6]]}), flush=True)


if __name__ == "__main__":
    main()
