"""RMS normalisation, plain and gated (fla's RMSNorm / FusedRMSNormGated with swish / Mamba2's RMSNormGated).

The statistics and the whole expression are computed in float32 and cast back once, as fla's Triton
kernels do, so both backends round the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.kernels import dispatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             backend: str | None = None) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension; returns x's dtype."""
    if dispatch.choose("rms_norm", x, backend, unfit=_fla_rms_norm_unfit(x)) == "fla":
        from fla.modules.layernorm import rms_norm as fla_rms_norm
        return fla_rms_norm(x, weight, None, eps=eps)
    return _normalize(x, eps).mul(weight.float()).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                   backend: str | None = None) -> torch.Tensor:
    """rms_norm(x) * weight * silu(gate); returns x's dtype."""
    if dispatch.choose("gated_rms_norm", x, backend) == "fla":
        from fla.modules.fused_norm_gate import rms_norm_gated
        return rms_norm_gated(x, gate, weight, None, activation="swish", eps=eps)
    return (_normalize(x, eps) * weight.float() * F.silu(gate.float())).to(x.dtype)


def group_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *,
                         group_size: int, norm_before_gate: bool = False, backend: str | None = None) -> torch.Tensor:
    """fla's RMSNormGated (Mamba2's output norm), statistics over groups of `group_size` channels:
    rms_norm(x · silu(gate)) * weight, or rms_norm(x) * weight * silu(gate) with `norm_before_gate`;
    returns x's dtype."""
    if dispatch.choose("group_gated_rms_norm", x, backend) == "fla":
        from fla.modules.norm.layernorm_gated import rmsnorm_fn
        return rmsnorm_fn(x, weight, None, z=gate, eps=eps, group_size=group_size,
                          norm_before_gate=norm_before_gate)
    gate = F.silu(gate.float())
    y = x.float() if norm_before_gate else x.float() * gate
    y = _normalize(y.unflatten(-1, (-1, group_size)), eps).flatten(-2) * weight.float()
    return (y * gate if norm_before_gate else y).to(x.dtype)


def _fla_rms_norm_unfit(x: torch.Tensor) -> dict[str, str]:
    # fla's kernel for rows of at most 512 channels (the per-head output norms) takes cdiv(rows, 2048) as a
    # compile-time constant and autotune key: each new multiple of 2048 rows compiles (and, on a fresh cache,
    # tunes) it again. A training step's fixed shape pays that once; evaluation's packed forwards and
    # prompts, a new row count at nearly every call, paid it hundreds of times. Without gradients, the
    # PyTorch version (a few element-wise kernels, no compilation).
    if x.shape[-1] <= 512 and not x.requires_grad:
        return {"fla": "compiled anew for every 2048 rows; inference uses the PyTorch version"}
    return {}


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _fla_norm_unavailable(x: torch.Tensor) -> str | None:
    if not x.is_cuda:
        return "input is not on a CUDA device"
    return dispatch.fla_unavailable_reason()


dispatch.register_health_check("rms_norm", _fla_norm_unavailable, eager_only=True)
dispatch.register_health_check("gated_rms_norm", _fla_norm_unavailable, eager_only=True)
dispatch.register_health_check("group_gated_rms_norm", _fla_norm_unavailable, eager_only=True)
