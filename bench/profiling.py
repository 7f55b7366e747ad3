"""Where a benchmark's time goes: a block run under the torch profiler, its most expensive kernels (on a GPU)
and host ops appended as tables to a text file. Shared by train_bench.py (one step) and eval_bench.py (one
whole evaluation command). Profile first, change second (bench/NOTES.md)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def profile_to(path: Path, title: str, device: torch.device) -> Iterator[None]:
    """Profile the block; append its tables to `path` under `== title`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=20)]
    if device.type == "cuda":  # as slow as the busier of the two: kernels first, then host time
        tables.insert(0, averages.table(sort_by="self_device_time_total", row_limit=30))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"== {title}\n" + "\n".join(tables) + "\n\n")
