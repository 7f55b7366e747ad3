"""SwiGLU activation: silu(gate) * up.

PyTorch only: torch.compile fuses it into one elementwise kernel, which is what fla's Triton swiglu
would give, without a graph break around a foreign kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.kernels import dispatch


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, in the inputs' dtype."""
    dispatch.choose("swiglu", gate, backend)  # validates an explicit request; only "torch" exists
    return F.silu(gate) * up
