"""Mamba (fla's `mamba`; Gu & Dao, arXiv 2312.00752): blocks of RMSNorm and a selective state-space mixer,
no MLP:  h = h + mixer(norm(h)). The mixer:
    u, z = in_proj(x);  u = silu(causal depthwise conv(u))
    Δ_low, B, C = x_proj(u);  Δ = softplus(dt_proj(Δ_low))
    y = selective_scan(u, Δ, A = −exp(A_log), B, C) + D ⊙ u       (lmlab.kernels.selective_scan)
    out_proj(y ⊙ silu(z))
fla's names throughout: the decoder is `backbone`, its blocks `norm` and `mixer`, its final norm `norm_f`
(transformers' Mamba has the same state-dict keys). Samba (`lmlab.models.samba`) reuses the mixer.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from lmlab.kernels.selective_scan import selective_scan
from lmlab.models.blocks import (
    BackboneForCausalLM,
    BackboneLayout,
    LmlabConfig,
    LmlabModel,
    LmlabPreTrainedModel,
    RMSNorm,
    Rotary,
    ShortConvolution,
    UsesKernels,
    init_dt_bias,
    padding_mask,
    zero_padding,
)
from lmlab.models.cache import Cache

DT_INIT_SCHEMES = ("random", "constant")
MIXER_ACTIVATIONS = ("silu", "swish")
# the HQLT fork's (and transformers') names for fla 0.6.0's keys: the seed's mamba configs use them
SEED_KEY_NAMES = {"time_step_rank": "dt_rank", "time_step_scale": "dt_scale", "time_step_min": "dt_min",
                  "time_step_max": "dt_max", "time_step_init_scheme": "dt_init_scheme",
                  "time_step_floor": "dt_init_floor", "layer_norm_epsilon": "norm_eps"}


class MambaConfig(LmlabConfig):
    """fla 0.6.0's MambaConfig: same keys and defaults (the shared ones in LmlabConfig).

    The HQLT fork's (and transformers') names are read too: `time_step_rank`, `time_step_scale`,
    `time_step_min`, `time_step_max`, `time_step_init_scheme`, `time_step_floor` and `layer_norm_epsilon`
    for fla 0.6.0's `dt_rank`, `dt_scale`, `dt_min`, `dt_max`, `dt_init_scheme`, `dt_init_floor` and
    `norm_eps` (a saved config holds fla 0.6.0's). fla 0.6.0 ignores them: the seed's mamba_340M.json
    (`time_step_rank: 128`) builds a dt rank of 64 there and of 128, as the seed trained it, in lmlab.
    `intermediate_size` is expand · hidden_size (given, it must agree; fla uses it silently).
    `rescale_prenorm_residual` is the initialisation's key (the fork's and fla 0.6.0's: out_proj as
    kaiming-uniform / √num_hidden_layers); lmlab's `prenorm_residual_strategy` follows it.
    Accepted and ignored: `residual_in_fp32` (fla rounds each block's output back to the weights' dtype),
    transformers' `use_mambapy` and `use_associative_scan` (its choices of PyTorch path).
    """

    model_type = "mamba"
    extra_keys = (*SEED_KEY_NAMES, "use_mambapy", "use_associative_scan")

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        state_size: int = 16,
        num_hidden_layers: int = 48,
        norm_eps: float = 1e-5,
        pad_token_id: int | None = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        expand: int = 2,
        conv_kernel: int = 4,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        residual_in_fp32: bool = False,
        dt_rank: int | str = "auto",
        dt_scale: float = 1.0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_scheme: str = "random",
        dt_init_floor: float = 1e-4,
        rescale_prenorm_residual: bool = False,
        intermediate_size: int | None = None,
        **kwargs,
    ):
        keys = read_seed_names(dict(dt_rank=dt_rank, dt_scale=dt_scale, dt_min=dt_min, dt_max=dt_max,
                                    dt_init_scheme=dt_init_scheme, dt_init_floor=dt_init_floor, norm_eps=norm_eps),
                               kwargs)
        norm_eps = keys.pop("norm_eps")
        check_mamba_keys(hidden_act, state_size, conv_kernel, keys["dt_init_scheme"], keys["dt_min"], keys["dt_max"])
        self.state_size = state_size
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.residual_in_fp32 = residual_in_fp32
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.dt_rank = resolve_dt_rank(keys.pop("dt_rank"), hidden_size)
        for name, value in keys.items():
            setattr(self, name, value)
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         norm_eps=norm_eps, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, hidden_act=hidden_act, initializer_range=initializer_range,
                         prenorm_residual_strategy=residual_strategy(rescale_prenorm_residual, kwargs), **kwargs)
        self.intermediate_size = inner_size(hidden_size, expand, intermediate_size)


def read_seed_names(keys: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """fla 0.6.0's `keys` with the values given under the fork's names (popped from `kwargs`) in their
    place; a key given under both names with different values is refused."""
    defaults = {"dt_rank": "auto", "dt_scale": 1.0, "dt_min": 0.001, "dt_max": 0.1, "dt_init_scheme": "random",
                "dt_init_floor": 1e-4, "norm_eps": 1e-5}
    for seed_name, name in SEED_KEY_NAMES.items():
        if seed_name in kwargs:
            value = kwargs.pop(seed_name)
            if keys[name] not in (defaults[name], value):
                raise ValueError(f"{seed_name} ({value!r}) and {name} ({keys[name]!r}) name the same setting "
                                 "with different values; keep one")
            keys[name] = value
    return keys


def check_mamba_keys(hidden_act: str, state_size: Any, conv_kernel: Any, dt_init_scheme: str, dt_min: Any,
                     dt_max: Any) -> None:
    """The mixer keys that fla's Mamba layer would fail on (or silently misread)."""
    if hidden_act not in MIXER_ACTIVATIONS:
        raise ValueError(f"the Mamba mixer's hidden_act must be silu (or swish, the same); got {hidden_act!r}")
    for name, value in (("state_size", state_size), ("conv_kernel", conv_kernel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if dt_init_scheme not in DT_INIT_SCHEMES:
        raise ValueError(f"the dt init scheme must be random or constant; got {dt_init_scheme!r}")
    if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and 0 < dt_min <= dt_max):
        raise ValueError(f"the dt init range needs 0 < dt_min <= dt_max; got {dt_min!r}, {dt_max!r}")


def resolve_dt_rank(dt_rank: int | str, hidden_size: int) -> int:
    """fla's rule: "auto" is ceil(hidden_size / 16)."""
    if dt_rank == "auto":
        return math.ceil(hidden_size / 16)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"the dt rank must be a positive integer or 'auto'; got {dt_rank!r}")
    return dt_rank


def inner_size(hidden_size: int, expand: Any, intermediate_size: int | None) -> int:
    """The mixer's channels: int(expand · hidden_size), as fla; a given intermediate_size must agree."""
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or expand <= 0:
        raise ValueError(f"expand must be a positive number; got {expand!r}")
    size = int(expand * hidden_size)
    if intermediate_size is not None and intermediate_size != size:
        raise ValueError(f"intermediate_size ({intermediate_size}) disagrees with expand * hidden_size ({size}); "
                         "set intermediate_size to null")
    return size


def residual_strategy(rescale_prenorm_residual: Any, kwargs: dict[str, Any]) -> str | None:
    """lmlab's prenorm_residual_strategy from fla's `rescale_prenorm_residual` (a saved config holds both,
    popped from `kwargs`; they must agree)."""
    if not isinstance(rescale_prenorm_residual, bool):
        raise ValueError(f"rescale_prenorm_residual must be true or false; got {rescale_prenorm_residual!r}")
    strategy = "rescale" if rescale_prenorm_residual else None
    given = kwargs.pop("prenorm_residual_strategy", strategy)
    if given != strategy:
        raise ValueError(f"prenorm_residual_strategy ({given!r}) disagrees with rescale_prenorm_residual "
                         f"({rescale_prenorm_residual}), fla's key for this family's initialisation; set that one")
    return strategy


class MambaMixer(nn.Module, UsesKernels):
    """fla's Mamba layer (same parameter names and shapes; the module docstring's computation)."""

    static_decoding = True  # a decoding step reads its fixed-size states and the new token only

    def __init__(self, hidden_size: int, state_size: int, conv_kernel: int, intermediate_size: int, dt_rank: int,
                 *, dt_min: float, dt_max: float, dt_init_scheme: str, dt_scale: float, dt_init_floor: float,
                 use_bias: bool, use_conv_bias: bool, layer_idx: int):
        super().__init__()
        self.state_size, self.dt_rank, self.layer_idx = state_size, dt_rank, layer_idx
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_init_scheme, self.dt_scale = dt_init_scheme, dt_scale
        self.in_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=use_bias)
        self.conv1d = ShortConvolution(intermediate_size, conv_kernel, bias=use_conv_bias)
        self.x_proj = nn.Linear(intermediate_size, dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(dt_rank, intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(intermediate_size, state_size))
        self.D = nn.Parameter(torch.empty(intermediate_size))
        self.out_proj = nn.Linear(intermediate_size, hidden_size, bias=use_bias)
        self.reset_special_parameters()

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        """fla's Mamba init (run after the model's generic one): the conv as nn.Conv1d's default
        (kaiming-uniform, bias U(±1/√kernel)), dt_proj's weight U(±dt_scale/√dt_rank) (or that constant), its
        bias softplus⁻¹ of a log-uniform step in [dt_min, dt_max] (at least dt_init_floor), A_log = log(1..N)
        per channel (S4D-real), D = 1. Parameters loaded from a checkpoint (flagged by transformers) are
        left alone."""
        weight, bias = self.conv1d.weight, self.conv1d.bias
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias is not None:
            nn.init.uniform_(bias, -weight.shape[-1] ** -0.5, weight.shape[-1] ** -0.5)
        std = self.dt_rank ** -0.5 * self.dt_scale
        if self.dt_init_scheme == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        init_dt_bias(self.dt_proj.bias, self.dt_min, self.dt_max, self.dt_init_floor)
        if not getattr(self.A_log, "_is_hf_initialized", False):
            n = torch.arange(1, self.state_size + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(n.log().expand_as(self.A_log))
        nn.init.ones_(self.D)

    def forward(self, x: torch.Tensor, *, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        mask = padding_mask(attention_mask, x.shape[1])
        state = cache[self.layer_idx] if cache is not None else {}
        u, z = self.in_proj(x).chunk(2, dim=-1)
        (u,) = zero_padding(mask, u)  # padding must not enter the conv state
        u, conv_state = self.conv1d(u, state.get("conv_state"), cache is not None, cu_seqlens)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        # softplus in float32 on the biased step, as mamba-ssm's kernels (dt_proj's bias ≈ −7 at init)
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        u, delta = zero_padding(mask, u, delta)  # padded tokens: nothing decays, nothing enters the state
        y, recurrent_state = selective_scan(u, delta, -self.A_log.float().exp(), B, C,
                                            initial_state=state.get("recurrent_state"),
                                            output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                            backend=self.backend)
        if cache is not None:
            cache.update(self.layer_idx, recurrent_state=recurrent_state, conv_state=conv_state)
        return self.out_proj((y + u * self.D) * F.silu(z))


class MambaBlock(GradientCheckpointingLayer):
    """fla's MambaBlock (its Mamba2Block is the same): h + mixer(norm(h)), one residual branch."""

    def __init__(self, config: PretrainedConfig, mixer: nn.Module):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = mixer
        self.mixer.out_proj.is_residual_output = True  # rescaled by rescale_prenorm_residual

    def forward(self, hidden_states: torch.Tensor, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        return hidden_states + self.mixer(self.norm(hidden_states), rotary=rotary, attention_mask=attention_mask,
                                          cu_seqlens=cu_seqlens, cache=cache)


def _mixer(config: MambaConfig, layer_idx: int) -> MambaMixer:
    return MambaMixer(config.hidden_size, config.state_size, config.conv_kernel, config.intermediate_size,
                      config.dt_rank, dt_min=config.dt_min, dt_max=config.dt_max, dt_init_scheme=config.dt_init_scheme,
                      dt_scale=config.dt_scale, dt_init_floor=config.dt_init_floor, use_bias=config.use_bias,
                      use_conv_bias=config.use_conv_bias, layer_idx=layer_idx)


class MambaPreTrainedModel(BackboneLayout, LmlabPreTrainedModel):
    config_class = MambaConfig
    mixer_factory = staticmethod(_mixer)
    _no_split_modules = ["MambaBlock"]


class MambaModel(MambaPreTrainedModel, LmlabModel):
    def make_block(self, config: MambaConfig, layer_idx: int) -> MambaBlock:
        return MambaBlock(config, self.make_mixer(config, layer_idx))


class MambaForCausalLM(MambaPreTrainedModel, BackboneForCausalLM):
    model_class = MambaModel
