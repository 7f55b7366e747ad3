"""Choose the implementation of each kernel: the pure-PyTorch reference or an accelerated backend.

Every op in `lmlab.kernels` has a PyTorch implementation that runs anywhere (the specification) and may
have an accelerated one (fla's Triton kernels, flash-attn, ...). `choose(op, tensor)` returns the name of
the backend to use, after health checks (device, library presence, known-bad version combinations). The
user override comes from `set_backend` (the model config's `backend` key or `--model.backend`):
  auto  - the accelerated backend when it is healthy, else torch (one warning saying why)
  torch - always the PyTorch implementation
  fla   - fla's kernel; an error if it cannot run here
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "fla")
_requested = "auto"
# op name -> health check returning None when the accelerated backend can run, else the reason it cannot.
_health_checks: dict[str, Callable[[torch.Tensor], str | None]] = {}
_warned: set[tuple[str, str]] = set()


def set_backend(name: str) -> None:
    """Set the process-wide backend request (auto | torch | fla)."""
    global _requested
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _requested = name


def get_backend() -> str:
    return _requested


def register_health_check(op: str, check: Callable[[torch.Tensor], str | None]) -> None:
    """Register the check deciding whether `op`'s accelerated backend can run on a given input."""
    _health_checks[op] = check


@functools.lru_cache(maxsize=None)
def fla_unavailable_reason() -> str | None:
    """None when fla's Triton kernels can be imported and launched (CUDA present), else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("fla") is None:
        return "fla is not installed"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def choose(op: str, x: torch.Tensor, requested: str | None = None) -> str:
    """Return "torch" or the accelerated backend's name ("fla") for running `op` on input `x`."""
    requested = requested or _requested
    if requested == "torch":
        return "torch"
    check = _health_checks.get(op)
    reason = "no accelerated backend for this op" if check is None else check(x)
    if reason is None:
        return "fla"
    if requested == "fla":
        raise RuntimeError(f"backend 'fla' requested for {op} but it cannot run here: {reason}")
    if x.is_cuda and (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"lmlab: {op} falls back to the PyTorch kernel: {reason}", stacklevel=2)
    return "torch"
