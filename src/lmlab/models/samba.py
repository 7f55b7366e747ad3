"""Samba (fla's `samba`; Ren et al., arXiv 2406.07522): Mamba layers interleaved with sliding-window softmax
attention, each followed by a SwiGLU MLP:
    h = h + mixer(mixer_norm(h));  h = h + mlp(mlp_norm(h))
The mixer is Mamba's (`lmlab.models.mamba.MambaMixer`), or lmlab's `Attention` with its sliding window at
the layers the `attn` key lists (lmlab.kernels.attention: packed documents, padding, a decoding cache of
the last window − 1 keys; no flash-attn needed). fla's names: decoder `backbone`, final norm `norm_f`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers.modeling_layers import GradientCheckpointingLayer

from lmlab.models.blocks import (
    MLP,
    BackboneForCausalLM,
    BackboneLayout,
    HybridConfig,
    LmlabModel,
    LmlabPreTrainedModel,
    RMSNorm,
    Rotary,
)
from lmlab.models.cache import Cache
from lmlab.models.mamba import (
    MambaMixer,
    check_mamba_keys,
    inner_size,
    residual_strategy,
    resolve_dt_rank,
)

# fla 0.6.0's default `attn` (the layers beyond num_hidden_layers dropped, as fla does)
DEFAULT_ATTN = {"layers": [1, 3, 5, 7, 9, 11, 13, 15, 17], "num_heads": 18, "num_kv_heads": 18, "qkv_bias": False,
                "window_size": 2048, "rope_theta": 10000.0}
_NOT_GIVEN: Any = object()


class SambaConfig(HybridConfig):
    """fla 0.6.0's SambaConfig: same keys and defaults (the shared ones in LmlabConfig), including its
    `time_step_*` names for the Mamba layers' step initialisation (fla's Mamba config calls them dt_*).

    `intermediate_size` is the Mamba layers' expand · hidden_size (given, it must agree); the MLPs' size
    comes from `hidden_ratio`, as in fla. `attn` left out: fla's default (18 heads, window 2048, every other
    layer from 1); null: no attention layers. `use_conv_bias` is honoured, as in the HQLT fork (fla 0.6.0
    always builds the conv bias). `rescale_prenorm_residual`: the Mamba layers' out_proj as kaiming-uniform /
    √num_hidden_layers, as for Mamba (fla's and the fork's Samba raise AttributeError there: they read a
    missing `num_layers`). Accepted and ignored: `residual_in_fp32`.
    """

    model_type = "samba"

    def __init__(
        self,
        hidden_size: int = 2304,
        state_size: int = 16,
        num_hidden_layers: int = 18,
        norm_eps: float = 1e-5,
        pad_token_id: int | None = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        expand: int = 2,
        conv_kernel: int = 4,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        hidden_act: str = "swish",
        initializer_range: float = 0.02,
        residual_in_fp32: bool = False,
        time_step_rank: int | str = "auto",
        time_step_scale: float = 1.0,
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_init_scheme: str = "random",
        time_step_floor: float = 1e-4,
        attn: dict | list[dict] | None = _NOT_GIVEN,
        rescale_prenorm_residual: bool = False,
        intermediate_size: int | None = None,
        **kwargs,
    ):
        check_mamba_keys("silu", state_size, conv_kernel, time_step_init_scheme, time_step_min, time_step_max)
        self.state_size = state_size
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.residual_in_fp32 = residual_in_fp32
        self.time_step_rank = resolve_dt_rank(time_step_rank, hidden_size)
        self.time_step_scale = time_step_scale
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_init_scheme = time_step_init_scheme
        self.time_step_floor = time_step_floor
        self.rescale_prenorm_residual = rescale_prenorm_residual
        if attn is _NOT_GIVEN:
            attn = {**DEFAULT_ATTN, "layers": [i for i in DEFAULT_ATTN["layers"] if i < num_hidden_layers]}
        super().__init__(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, norm_eps=norm_eps,
                         pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         hidden_act=hidden_act, initializer_range=initializer_range, attn=attn,
                         prenorm_residual_strategy=residual_strategy(rescale_prenorm_residual, kwargs), **kwargs)
        self.intermediate_size = inner_size(hidden_size, expand, intermediate_size)


def _mixer(config: SambaConfig, layer_idx: int) -> MambaMixer:
    return MambaMixer(config.hidden_size, config.state_size, config.conv_kernel, config.intermediate_size,
                      config.time_step_rank, dt_min=config.time_step_min, dt_max=config.time_step_max,
                      dt_init_scheme=config.time_step_init_scheme, dt_scale=config.time_step_scale,
                      dt_init_floor=config.time_step_floor, use_bias=config.use_bias,
                      use_conv_bias=config.use_conv_bias, layer_idx=layer_idx)


class SambaBlock(GradientCheckpointingLayer):
    """fla's SambaBlock: the mixer (Mamba or attention) and a SwiGLU MLP, each pre-norm and residual."""

    def __init__(self, config: SambaConfig, mixer: nn.Module):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        # fla sizes the MLP by hidden_ratio: intermediate_size is the Mamba layers'
        self.mlp = MLP(config.hidden_size, config.hidden_ratio, None, config.hidden_act)
        if isinstance(mixer, MambaMixer):  # rescaled by rescale_prenorm_residual, as in fla (Mamba layers only)
            mixer.out_proj.is_residual_output = True

    def forward(self, hidden_states: torch.Tensor, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), rotary=rotary,
                                                   attention_mask=attention_mask, cu_seqlens=cu_seqlens, cache=cache)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class SambaPreTrainedModel(BackboneLayout, LmlabPreTrainedModel):
    config_class = SambaConfig
    mixer_factory = staticmethod(_mixer)
    _no_split_modules = ["SambaBlock"]


class SambaModel(SambaPreTrainedModel, LmlabModel):
    def make_block(self, config: SambaConfig, layer_idx: int) -> SambaBlock:
        return SambaBlock(config, self.make_mixer(config, layer_idx))


class SambaForCausalLM(SambaPreTrainedModel, BackboneForCausalLM):
    model_class = SambaModel
