"""Gated Linear Attention (fla's `gla`): linear attention with a data-dependent per-key-channel decay,
S_t = diag(a_t) S_{t-1} + k_t v_t^T, log a_t = logsigmoid(gk_proj x) / 16 (Yang et al., arXiv 2312.06635)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.kernels.gla import gla
from lmlab.models.blocks import (
    GatedRMSNorm,
    HybridConfig,
    LmlabForCausalLM,
    LmlabModel,
    LmlabPreTrainedModel,
    RMSNorm,
    Rotary,
    ShortConvolution,
    UsesKernels,
    padding_mask,
    project_qkv,
    zero_padding,
)
from lmlab.models.cache import Cache

# fla's ACT2FN names, for `feature_map`
FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "silu": F.silu,
    "swish": F.silu,
    "sqrelu": lambda x: F.relu(x).square(),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
}
GATE_LOGIT_NORMALIZER = 16  # fla's default
GATE_LOW_RANK_DIM = 16  # fla's default


class GLAConfig(HybridConfig):
    """fla 0.6.0's GLAConfig: same keys and defaults (the shared ones in LmlabConfig).

    Also accepted and ignored: attn_mode (lmlab's dispatcher picks kernels), use_gk and use_gv (fla ignores
    them too). `fuse_norm` only names the output norm, as in fla: `g_norm_swish_gate` when fuse_norm and
    use_output_gate, else `g_norm` (same arithmetic).
    """

    model_type = "gla"

    def __init__(
        self,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        feature_map: str | None = None,
        attn_mode: str = "chunk",
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_output_gate: bool = True,
        clamp_min: float | None = None,
        elementwise_affine: bool | None = True,
        use_gk: bool = True,
        use_gv: bool = False,
        **kwargs,
    ):
        if feature_map is not None and feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be null or one of {', '.join(FEATURE_MAPS)}; got {feature_map!r}")
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.feature_map = feature_map
        self.attn_mode = attn_mode
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_output_gate = use_output_gate
        self.clamp_min = clamp_min
        self.elementwise_affine = elementwise_affine
        self.use_gk = use_gk
        self.use_gv = use_gv
        super().__init__(**kwargs)


class GatedLinearAttention(nn.Module, UsesKernels):
    """fla's GatedLinearAttention layer (same parameter names and shapes). With num_kv_heads < num_heads,
    k, v and the decay are shared by groups of consecutive query heads."""

    static_decoding = True  # a decoding step reads its fixed-size states and the new token only

    def __init__(self, config: GLAConfig, layer_idx: int):
        super().__init__()
        hidden, H = config.hidden_size, config.num_heads
        Hkv = config.num_kv_heads or H
        if H % Hkv:
            raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({Hkv})")
        self.groups = H // Hkv
        key_dim, value_dim = round(hidden * config.expand_k), round(hidden * config.expand_v)
        if key_dim % H or value_dim % H:
            raise ValueError(f"hidden_size * expand_k ({key_dim}) and * expand_v ({value_dim}) must be "
                             f"multiples of num_heads ({H})")
        self.head_k_dim, self.head_v_dim = key_dim // H, value_dim // H
        kv_key_dim, kv_value_dim = key_dim // self.groups, value_dim // self.groups
        self.layer_idx = layer_idx
        self.use_short_conv, self.use_output_gate = config.use_short_conv, config.use_output_gate
        self.feature_map = FEATURE_MAPS[config.feature_map] if config.feature_map else None
        self.clamp_min = config.clamp_min

        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_value_dim, bias=False)
        if self.use_output_gate:
            self.g_proj = nn.Linear(hidden, value_dim, bias=False)
        if self.use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, config.conv_size)
            self.k_conv1d = ShortConvolution(kv_key_dim, config.conv_size)
            self.v_conv1d = ShortConvolution(kv_value_dim, config.conv_size)
        self.gk_proj = nn.Sequential(nn.Linear(hidden, GATE_LOW_RANK_DIM, bias=False),
                                     nn.Linear(GATE_LOW_RANK_DIM, kv_key_dim, bias=True))
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)
        # fla's gate is hidden_act, which the MLP already requires to be swish
        self.fuse_norm_and_gate = config.fuse_norm and self.use_output_gate
        affine = config.elementwise_affine
        if self.fuse_norm_and_gate:
            self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, config.norm_eps, affine)
        else:
            self.g_norm = RMSNorm(self.head_v_dim, config.norm_eps, affine)

    def forward(self, x: torch.Tensor, *, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        mask = padding_mask(attention_mask, T)
        (x,) = zero_padding(mask, x)  # padding must not enter the short-conv states
        state = cache[self.layer_idx] if cache is not None else {}
        q, k, v, conv_state = project_qkv(self, x, state.get("conv_state"), cache is not None, cu_seqlens)
        q = q.view(B, T, -1, self.head_k_dim)
        k = k.view(B, T, -1, self.head_k_dim).repeat_interleave(self.groups, dim=2)
        v = v.view(B, T, -1, self.head_v_dim).repeat_interleave(self.groups, dim=2)
        gk = self.gk_proj(x).view(B, T, -1, self.head_k_dim).repeat_interleave(self.groups, dim=2)
        gk = F.logsigmoid(gk.float()) / GATE_LOGIT_NORMALIZER
        if self.clamp_min is not None:
            gk = gk.clamp(min=self.clamp_min)
        if self.feature_map is not None:
            q, k = self.feature_map(q), self.feature_map(k)
        k, v, gk = zero_padding(mask, k, v, gk)
        o, recurrent_state = gla(q, k, v, gk, initial_state=state.get("recurrent_state"),
                                 output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                 backend=self.backend)
        if cache is not None:
            cache.update(self.layer_idx, recurrent_state=recurrent_state, conv_state=conv_state)
        if self.fuse_norm_and_gate:
            o = self.g_norm_swish_gate(o, self.g_proj(x).view(B, T, -1, self.head_v_dim)).reshape(B, T, -1)
        else:
            o = self.g_norm(o).reshape(B, T, -1)
            if self.use_output_gate:
                o = o * F.silu(self.g_proj(x))
        return self.o_proj(o)


class GLAPreTrainedModel(LmlabPreTrainedModel):
    config_class = GLAConfig
    mixer_factory = GatedLinearAttention


class GLAModel(GLAPreTrainedModel, LmlabModel):
    pass


class GLAForCausalLM(GLAPreTrainedModel, LmlabForCausalLM):
    model_class = GLAModel
