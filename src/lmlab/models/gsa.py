"""Gated Slot Attention (fla's `gsa`; Zhang et al., arXiv 2409.07146): per head, a bounded memory of M
slots written with a data-dependent forget gate, read twice (keys, then values) with a softmax over the
slots in between (`lmlab.kernels.gsa`). Slot gate g = logsigmoid(f_proj x) / gate_logit_normalizer,
slot writes s = 1 − exp(g), q and k through the feature map, v through silu; the output is
o_proj(g_norm(silu(o))) with the norm over all heads, as in fla.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.kernels.gsa import gsa
from lmlab.models.blocks import (
    HybridConfig,
    LmlabForCausalLM,
    LmlabModel,
    LmlabPreTrainedModel,
    RMSNorm,
    RMS_NORM_LINEAR_EPS,
    Rotary,
    ShortConvolution,
    UsesKernels,
    padding_mask,
    project_qkv,
    zero_padding,
)
from lmlab.models.cache import Cache


FEATURE_MAPS = {"swish": nn.SiLU, "relu": nn.ReLU}  # fla's parameter-free ones


class GSAConfig(HybridConfig):
    """fla 0.6.0's GSAConfig: same keys and defaults (the shared ones in LmlabConfig), its misspelt
    `exapnd_k` / `exapnd_v` included (stored as expand_k / expand_v, which a saved config then holds and
    which take precedence, as in fla).

    Accepted and ignored, as fla 0.6.0's GSA model ignores them (so fla checkpoints compute the same):
    `use_output_gate` (no output gate is built), `use_norm` (the output is always normalised),
    `clamp_min`, `clamp_max`; and `share_conv_kernel`, `use_rope` (older fla keys the seed's gsa_340M.json
    carries, stored unused as in fla 0.6.0). fla's `t2r` feature map (a learned map) is not implemented:
    refused.
    """

    model_type = "gsa"
    extra_keys = ("share_conv_kernel", "use_rope")

    def __init__(
        self,
        gate_logit_normalizer: float | None = 8,
        clamp_min: float | None = None,
        clamp_max: float | None = None,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        num_slots: int | None = 64,
        use_short_conv: bool = False,
        conv_size: int = 4,
        exapnd_k: float = 1,
        exapnd_v: float = 1,
        feature_map: str = "swish",
        use_output_gate: bool = False,
        use_norm: bool = True,
        elementwise_affine: bool | None = True,
        expand_k: float | None = None,
        expand_v: float | None = None,
        **kwargs,
    ):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)} (lmlab does not implement fla's "
                             f"t2r); got {feature_map!r}")
        if isinstance(gate_logit_normalizer, bool) or not isinstance(gate_logit_normalizer, (int, float)) \
                or not 0 < gate_logit_normalizer < math.inf:
            raise ValueError(f"gate_logit_normalizer must be a positive number; got {gate_logit_normalizer!r}")
        if num_slots is not None and (isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1):
            raise ValueError(f"num_slots must be a positive integer or null (the key dim per head); got {num_slots!r}")
        self.gate_logit_normalizer = gate_logit_normalizer
        self.clamp_min = clamp_min
        self.clamp_max = clamp_max
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_slots = num_slots
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.expand_k = exapnd_k if expand_k is None else expand_k
        self.expand_v = exapnd_v if expand_v is None else expand_v
        self.feature_map = feature_map
        self.use_output_gate = use_output_gate
        self.use_norm = use_norm
        self.elementwise_affine = elementwise_affine
        super().__init__(**kwargs)


def _whole(hidden: int, expand: float, name: str) -> int:
    """hidden_size * expand, which must be an integer (fla asserts it)."""
    dim = round(hidden * expand)
    if not math.isclose(hidden * expand, dim):
        raise ValueError(f"hidden_size * {name} must be an integer; got {hidden} * {expand}")
    return dim


class GatedSlotAttention(nn.Module, UsesKernels):
    """fla's GatedSlotAttention layer (same parameter names and shapes). With num_kv_heads < num_heads,
    k, v and the slot gates are shared by groups of consecutive query heads."""

    static_decoding = True  # a decoding step reads its fixed-size states and the new token only

    def __init__(self, config: GSAConfig, layer_idx: int):
        super().__init__()
        hidden, H = config.hidden_size, config.num_heads
        Hkv = config.num_kv_heads or H
        if H % Hkv:
            raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({Hkv})")
        self.groups = H // Hkv
        key_dim, value_dim = _whole(hidden, config.expand_k, "expand_k"), _whole(hidden, config.expand_v, "expand_v")
        if key_dim % H or value_dim % H:
            raise ValueError(f"hidden_size * expand_k ({key_dim}) and * expand_v ({value_dim}) must be "
                             f"multiples of num_heads ({H})")
        if config.elementwise_affine and value_dim != hidden:
            raise ValueError(f"the output norm's weight has hidden_size ({hidden}) entries, as in fla: with "
                             f"elementwise_affine, expand_v must be 1 (value dim {value_dim})")
        self.head_k_dim, self.head_v_dim = key_dim // H, value_dim // H
        self.num_slots = config.num_slots or self.head_k_dim
        self.gate_logit_normalizer = config.gate_logit_normalizer
        self.layer_idx = layer_idx
        self.use_short_conv = config.use_short_conv
        self.feature_map = FEATURE_MAPS[config.feature_map]()

        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim // self.groups, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim // self.groups, bias=False)
        self.f_proj = nn.Linear(hidden, Hkv * self.num_slots, bias=False)
        if self.use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, config.conv_size)
            self.k_conv1d = ShortConvolution(key_dim // self.groups, config.conv_size)
            self.v_conv1d = ShortConvolution(value_dim // self.groups, config.conv_size)
        self.g_norm = RMSNorm(hidden, RMS_NORM_LINEAR_EPS, config.elementwise_affine)
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, *, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        mask = padding_mask(attention_mask, T)
        (x,) = zero_padding(mask, x)  # padding must not enter the short-conv states
        state = cache[self.layer_idx] if cache is not None else {}
        q, k, v, conv_state = project_qkv(self, x, state.get("conv_state"), cache is not None, cu_seqlens)
        q = self.feature_map(q.view(B, T, -1, self.head_k_dim))
        k = self.feature_map(k.view(B, T, -1, self.head_k_dim))
        v = F.silu(v.view(B, T, -1, self.head_v_dim))
        g = F.logsigmoid(self.f_proj(x).view(B, T, -1, self.num_slots).float()) / self.gate_logit_normalizer
        s = (1 - g.exp()).to(k.dtype)
        k, v, s, g = (y.repeat_interleave(self.groups, dim=2) for y in (k, v, s, g))
        k, v, s, g = zero_padding(mask, k, v, s, g)
        o, recurrent_state = gsa(q, k, v, s, g, scale=1.0, initial_state=state.get("recurrent_state"),
                                 output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                 backend=self.backend)
        if cache is not None:
            cache.update(self.layer_idx, recurrent_state=recurrent_state, conv_state=conv_state)
        return self.o_proj(self.g_norm(F.silu(o).reshape(B, T, -1)))


class GSAPreTrainedModel(LmlabPreTrainedModel):
    config_class = GSAConfig
    mixer_factory = GatedSlotAttention


class GSAModel(GSAPreTrainedModel, LmlabModel):
    pass


class GSAForCausalLM(GSAPreTrainedModel, LmlabForCausalLM):
    model_class = GSAModel
