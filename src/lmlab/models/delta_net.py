"""DeltaNet (fla's `delta_net`): linear attention with the delta-rule state update
S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t (Yang et al., arXiv 2406.06484)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.kernels.delta_rule import delta_rule
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
    delta_mixer_output,
    l2_norm,
    padding_mask,
    project_qkv,
    zero_padding,
)
from lmlab.models.cache import Cache


class DeltaNetConfig(HybridConfig):
    """fla 0.6.0's DeltaNetConfig: same keys and defaults (the shared ones in LmlabConfig).

    Also accepted and ignored: attn_mode (lmlab's dispatcher picks kernels), use_output_norm (fla ignores
    it too), norm_first (not an fla 0.6.0 DeltaNetConfig key: stored as an extra attribute, in fla too).
    """

    model_type = "delta_net"
    extra_keys = ("norm_first",)

    def __init__(
        self,
        attn_mode: str = "chunk",
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_gate: bool = False,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        use_beta: bool = True,
        use_output_norm: bool = True,
        num_heads: int = 16,
        qk_norm: str = "l2",
        qk_activation: str = "silu",
        **kwargs,
    ):
        if qk_norm not in ("l2", "sum"):
            raise ValueError(f"qk_norm must be 'l2' or 'sum'; got {qk_norm!r}")
        if qk_activation not in ("silu", "relu", "elu", "identity"):
            raise ValueError(f"qk_activation must be silu, relu, elu or identity; got {qk_activation!r}")
        self.attn_mode = attn_mode
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.conv_size = conv_size
        self.use_beta = use_beta
        self.use_output_norm = use_output_norm
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.qk_activation = qk_activation
        super().__init__(**kwargs)


class DeltaNet(nn.Module, UsesKernels):
    """fla's DeltaNet layer (same parameter names and shapes)."""

    static_decoding = True  # a decoding step reads its fixed-size states and the new token only

    def __init__(self, config: DeltaNetConfig, layer_idx: int):
        super().__init__()
        hidden, H = config.hidden_size, config.num_heads
        self.key_dim, self.value_dim = round(hidden * config.expand_k), round(hidden * config.expand_v)
        if self.key_dim % H or self.value_dim % H:
            raise ValueError(f"hidden_size * expand_k ({self.key_dim}) and * expand_v ({self.value_dim}) must be "
                             f"multiples of num_heads ({H})")
        self.head_k_dim, self.head_v_dim = self.key_dim // H, self.value_dim // H
        self.layer_idx = layer_idx
        self.qk_activation, self.qk_norm = config.qk_activation, config.qk_norm
        self.use_beta, self.use_gate, self.use_short_conv = config.use_beta, config.use_gate, config.use_short_conv
        self.allow_neg_eigval = config.allow_neg_eigval

        self.q_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.value_dim, bias=False)
        if self.use_beta:
            self.b_proj = nn.Linear(hidden, H, bias=False)
        if self.use_short_conv:
            qk_act = "silu" if self.qk_activation == "silu" else None
            self.q_conv1d = ShortConvolution(self.key_dim, config.conv_size, activation=qk_act)
            self.k_conv1d = ShortConvolution(self.key_dim, config.conv_size, activation=qk_act)
            self.v_conv1d = ShortConvolution(self.value_dim, config.conv_size)
        if self.use_gate:
            self.g_proj = nn.Linear(hidden, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, config.norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, *, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        mask = padding_mask(attention_mask, T)
        (x,) = zero_padding(mask, x)  # padding must not enter the short-conv states
        state = cache[self.layer_idx] if cache is not None else {}
        q, k, v, conv_state = project_qkv(self, x, state.get("conv_state"), cache is not None, cu_seqlens)
        if not self.use_short_conv:  # the activations the convs would have applied
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        q, k = q.view(B, T, -1, self.head_k_dim), k.view(B, T, -1, self.head_k_dim)
        v = v.view(B, T, -1, self.head_v_dim)
        if self.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif self.qk_activation == "elu":
            q, k = F.elu(q) + 1, F.elu(k) + 1
        if self.qk_norm == "l2":
            q, k = l2_norm(q), l2_norm(k)
        else:  # "sum": fla's L1 normalisation
            q, k = F.normalize(q, p=1, dim=-1, eps=1e-6), F.normalize(k, p=1, dim=-1, eps=1e-6)
        beta = self.b_proj(x).sigmoid() if self.use_beta else q.new_ones(B, T, q.shape[2])
        if self.allow_neg_eigval:
            beta = beta * 2
        k, v, beta = zero_padding(mask, k, v, beta)
        o, recurrent_state = delta_rule(q, k, v, beta, initial_state=state.get("recurrent_state"),
                                        output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                        backend=self.backend)
        return delta_mixer_output(self, o, x, cache, recurrent_state, conv_state)


class DeltaNetPreTrainedModel(LmlabPreTrainedModel):
    config_class = DeltaNetConfig
    mixer_factory = DeltaNet


class DeltaNetModel(DeltaNetPreTrainedModel, LmlabModel):
    pass


class DeltaNetForCausalLM(DeltaNetPreTrainedModel, LmlabForCausalLM):
    model_class = DeltaNetModel
