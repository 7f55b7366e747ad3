"""fla's rms_norm over rows of 128 channels (HQLT's and DeltaNet's per-head output norm) at eight row counts,
as evaluation's packed forwards meet them: the time of each first call (compilation and autotuning), of a warm
call, and of lmlab's PyTorch version. Run twice in fresh processes: with an empty Triton cache, and with only
the autotune results kept (what bench/gpu_call.sh carries between machines).
    python bench/experiments/norm_row_counts.py      (a GPU)"""
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = [n * 2048 - 5 for n in (1, 3, 7, 20, 47, 90, 170, 256)]
D = 128


def seconds(fn, x, repeats=1):
    import torch
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure() -> None:
    import torch
    from fla.modules.layernorm import rms_norm as fla_rms_norm

    from lmlab.kernels.norm import rms_norm
    w = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    fla = lambda x: fla_rms_norm(x, w, None, eps=1e-6)  # noqa: E731
    lmlab_torch = lambda x: rms_norm(x, w, 1e-6, backend="torch")  # noqa: E731
    lmlab_torch(torch.randn(8, D, device="cuda", dtype=torch.bfloat16))  # CUDA's lazy start-up, not a norm's
    rows = []
    with torch.no_grad():
        for T in ROWS:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            first = seconds(fla, x)
            rows.append(dict(rows=T, fla_first=first, fla_warm=seconds(fla, x, 5),
                             torch_warm=seconds(lmlab_torch, x, 5)))
    print(json.dumps(rows))


def run(cache: str) -> list[dict]:
    done = subprocess.run([sys.executable, __file__, "--child"], env={**os.environ, "TRITON_CACHE_DIR": cache},
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    cache = tempfile.mkdtemp()
    results = {"empty cache": run(cache)}
    for path in pathlib.Path(cache).rglob("*"):
        if path.is_file() and not path.name.endswith(".autotune.json"):
            path.unlink()
    results["autotune results kept"] = run(cache)
    for name, rows in results.items():
        print(f"\n{name}: rows, fla first call (s), fla warm (ms), PyTorch version warm (ms)")
        for r in rows:
            print(f"{r['rows']:>8} {r['fla_first']:8.3f} {r['fla_warm'] * 1e3:8.3f} {r['torch_warm'] * 1e3:8.3f}")
        print(f"total first calls {sum(r['fla_first'] for r in rows):.1f} s; PyTorch version, all eight "
              f"{sum(r['torch_warm'] for r in rows) * 1e3:.1f} ms")


if __name__ == "__main__":
    measure() if "--child" in sys.argv else main()
