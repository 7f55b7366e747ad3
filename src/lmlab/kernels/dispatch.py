"""Choose the implementation of each kernel: the pure-PyTorch reference or an accelerated backend.

Every op in `lmlab.kernels` has a PyTorch implementation that runs anywhere (the specification) and may
have an accelerated one (fla's Triton kernels, flash-attn, ...). `choose(op, tensor)` returns the name of
the backend to use, after health checks (device, library presence, known-bad version combinations). The
request is the kernel call's `backend=` argument (a model passes its own: the config's `backend` key or
`--model.backend`, so two models in one process can run different backends); None means "auto":
  auto  - the first healthy accelerated backend of the op, else torch (one warning saying why)
  torch - always the PyTorch implementation
  fla   - fla's kernel; an error if it cannot run here
  flash - flash-attn (attention only); an error if it cannot run here
  triton - lmlab's own Triton kernel (the short convolution from zeros, the selective scan, local attention
           over short windows); an error if it cannot run here
  flex  - torch's FlexAttention (local attention only); an error if it cannot run here
An op may have several accelerated backends, registered in priority order. A request for a backend that
an op does not have (e.g. "fla" for attention, "triton" for the convolution from a decoding state) means
"auto" for that op: a model's request covers all its ops. A request for a backend the op has but that
cannot run on the input is an error. There is no process-wide request.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable

import torch

from lmlab.errors import UserError

BACKENDS = ("auto", "torch", "fla", "flash", "triton", "flex")
# op name -> {accelerated backend -> health check}, in priority order; a check returns None when the
# backend can run on the given input, else the reason it cannot.
_health_checks: dict[str, dict[str, Callable[[torch.Tensor], str | None]]] = {}
# (op, backend) pairs that "auto" skips inside, or outside, torch.compile'd code: see `register_health_check`.
_eager_only: set[tuple[str, str]] = set()
_compiled_only: set[tuple[str, str]] = set()
_warned: set[tuple[str, str]] = set()
# op name -> the backend its latest `choose` call returned; only read back (logs, benchmarks), never
# consulted when choosing.
_last_choice: dict[str, str] = {}


def require(name: str) -> None:
    """Fail early, with one line, when a forced backend cannot run in this process at all."""
    if name == "fla":
        reason = fla_unavailable_reason()
    elif name in ("triton", "flex"):
        reason = None if torch.cuda.is_available() else "no CUDA device"
    elif name == "flash":
        reason = None if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else (
            "flash-attn is not installed" if torch.cuda.is_available() else "no CUDA device")
    else:
        return
    if reason is not None:
        raise UserError(f"backend {name!r} cannot run here ({reason}); use --model.backend auto or torch")


def describe(backend: str) -> str:
    """One line for the training log: the model's requested backend and, on CUDA, what fla can do."""
    reason = fla_unavailable_reason()
    return f"backend={backend}" + ("" if reason is None else f" (fla kernels unavailable: {reason})")


def register_health_check(op: str, check: Callable[[torch.Tensor], str | None], backend: str = "fla", *,
                          eager_only: bool = False, compiled_only: bool = False) -> None:
    """Register the check deciding whether `op`'s accelerated `backend` can run on a given input.

    Backends registered first are preferred by "auto". `eager_only`: inside torch.compile'd code "auto"
    picks the PyTorch version instead (for element-wise and normalisation ops, which inductor fuses with
    their neighbours, while the backend's call would split the compiled graph and cost its Python
    overhead on every call); `compiled_only`: outside compiled code "auto" picks the PyTorch version (for
    backends that must be compiled for each input size). An explicit request for the backend still gets it."""
    if backend not in BACKENDS or backend in ("auto", "torch"):
        raise ValueError(f"not an accelerated backend: {backend!r}")
    _health_checks.setdefault(op, {})[backend] = check
    if eager_only:
        _eager_only.add((op, backend))
    if compiled_only:
        _compiled_only.add((op, backend))


_fla_reason: list[str | None] = []  # fla_unavailable_reason's answer, once computed


def fla_unavailable_reason() -> str | None:
    """None when fla's Triton kernels can be imported and launched (CUDA present), else why not.

    Computed once per process. Memoised in a module list, not with functools.lru_cache: the health checks
    call this inside compiled blocks, and torch.compile warns of possible silent incorrectness on every
    traced call of an lru_cache-wrapped function (the warning filled each GPU training log)."""
    if not _fla_reason:
        _fla_reason.append(_find_fla_unavailable_reason())
    return _fla_reason[0]


def _find_fla_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("fla") is None:
        return "fla is not installed"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def last_choices() -> dict[str, str]:
    """The backend each op ran on at its latest call in this process (a copy; ops not yet called are absent).

    In torch.compile'd code the record is made when the graph is traced: the choice baked into it."""
    return dict(_last_choice)


def clear_choices() -> None:
    """Forget the recorded choices (e.g. before a benchmark builds its next model)."""
    _last_choice.clear()


def choose(op: str, x: torch.Tensor, requested: str | None = None, unfit: dict[str, str] | None = None) -> str:
    """Return "torch" or the name of the accelerated backend for running `op` on input `x`.

    `unfit`: backends that do not cover this call's sizes or settings (backend -> why), e.g. a kernel for
    short windows only, or without decoding steps. For this call they are as a backend the op does not have:
    "auto" passes over them silently (the call, not the machine, rules them out) and a request for one means
    "auto", as a model's request covers all its calls."""
    name = _choose(op, x, requested, unfit or {})
    _record(op, name)
    return name


# Run for real while dynamo traces, and kept out of the graph: a store into a module dict inside compiled
# code would make dynamo guard on the dict's size and recompile the block as the record grows.
@torch.compiler.assume_constant_result
def _record(op: str, name: str) -> bool:
    _last_choice[op] = name
    return True


def _choose(op: str, x: torch.Tensor, requested: str | None, unfit: dict[str, str]) -> str:
    checks = _health_checks.get(op, {})
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch"
    if requested in unfit:
        requested = None
    if requested in checks:
        reason = checks[requested](x)
        if reason is not None:
            raise UserError(f"backend {requested!r} requested for {op} but it cannot run here: {reason}; "
                            "use --model.backend auto or torch")
        return requested
    reasons = []
    for name, check in checks.items():
        if name in unfit or (op, name) in (_eager_only if torch.compiler.is_compiling() else _compiled_only):
            continue  # a preference or the call's sizes, not a failure: no warning
        reason = check(x)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    reason = "; ".join(reasons)
    # No warning while torch.compile traces: dynamo cannot trace warnings.warn and would break the graph.
    if reasons and x.is_cuda and (op, reason) not in _warned and not torch.compiler.is_compiling():
        _warned.add((op, reason))
        warnings.warn(f"lmlab: {op} falls back to the PyTorch kernel ({reason})", stacklevel=2)
    return "torch"
