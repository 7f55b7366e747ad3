"""Gated DeltaNet (fla's `gated_deltanet`): the delta rule with a per-head, data-dependent decay,
S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T with log a_t = -exp(A_log) softplus(a_proj x + dt_bias)
(Yang et al., arXiv 2412.06464)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.kernels.gated_delta_rule import gated_delta_rule
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
    init_dt_bias,
    l2_norm,
    padding_mask,
    project_qkv,
    zero_padding,
)
from lmlab.models.cache import Cache


class GatedDeltaNetConfig(HybridConfig):
    """fla 0.6.0's GatedDeltaNetConfig: same keys and defaults (the shared ones in LmlabConfig; 21 layers
    by default here).

    Also accepted and ignored: attn_mode (lmlab's dispatcher picks kernels).
    """

    model_type = "gated_deltanet"

    def __init__(
        self,
        attn_mode: str = "chunk",
        expand_v: float = 2.0,
        use_gate: bool = True,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        head_dim: int = 256,
        num_heads: int = 6,
        num_v_heads: int | None = None,
        num_hidden_layers: int = 21,
        output_gate_activation: str = "swish",
        **kwargs,
    ):
        if output_gate_activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"output_gate_activation must be swish, silu or sigmoid; got {output_gate_activation!r}")
        self.attn_mode = attn_mode
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.output_gate_activation = output_gate_activation
        self.use_short_conv = use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.conv_size = conv_size
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        super().__init__(num_hidden_layers=num_hidden_layers, **kwargs)


class GatedDeltaNet(nn.Module, UsesKernels):
    """fla's GatedDeltaNet layer (same parameter names and shapes). With num_v_heads > num_heads (grouped
    value heads), each q/k head serves num_v_heads // num_heads consecutive value heads."""

    static_decoding = True  # a decoding step reads its fixed-size states and the new token only

    def __init__(self, config: GatedDeltaNetConfig, layer_idx: int):
        super().__init__()
        hidden, H, K = config.hidden_size, config.num_heads, config.head_dim
        HV = config.num_v_heads or H
        self.head_v_dim = int(K * config.expand_v)
        if not math.isclose(K * config.expand_v, self.head_v_dim):
            raise ValueError(f"head_dim * expand_v must be an integer; got {K} * {config.expand_v}")
        if HV % H:
            raise ValueError(f"num_v_heads ({HV}) must be a multiple of num_heads ({H})")
        self.head_k_dim, self.num_heads, self.num_v_heads = K, H, HV
        self.key_dim, self.value_dim = H * K, HV * self.head_v_dim
        self.layer_idx = layer_idx
        self.use_gate, self.use_short_conv = config.use_gate, config.use_short_conv
        self.allow_neg_eigval = config.allow_neg_eigval

        self.q_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden, HV, bias=False)
        self.b_proj = nn.Linear(hidden, HV, bias=False)
        self.A_log = nn.Parameter(torch.empty(HV))
        self.dt_bias = nn.Parameter(torch.empty(HV))
        self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True
        self.reset_special_parameters()
        if self.use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, config.conv_size)
            self.k_conv1d = ShortConvolution(self.key_dim, config.conv_size)
            self.v_conv1d = ShortConvolution(self.value_dim, config.conv_size)
        if self.use_gate:
            self.g_proj = nn.Linear(hidden, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, config.norm_eps, activation=config.output_gate_activation)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden, bias=False)

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        """Mamba2's init, as fla: A ~ U(0, 16); dt ~ logU(1e-3, 0.1) (>= 1e-4), dt_bias = softplus^-1(dt).
        Parameters loaded from a checkpoint (flagged by transformers) are left alone."""
        if not getattr(self.A_log, "_is_hf_initialized", False):
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).log())
        init_dt_bias(self.dt_bias)

    def forward(self, x: torch.Tensor, *, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        mask = padding_mask(attention_mask, T)
        (x,) = zero_padding(mask, x)  # padding must not enter the short-conv states
        state = cache[self.layer_idx] if cache is not None else {}
        q, k, v, conv_state = project_qkv(self, x, state.get("conv_state"), cache is not None, cu_seqlens)
        if not self.use_short_conv:  # the activation the convs would have applied
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = l2_norm(q.view(B, T, -1, self.head_k_dim))
        k = l2_norm(k.view(B, T, -1, self.head_k_dim))
        v = v.view(B, T, -1, self.head_v_dim)
        if self.num_v_heads > self.num_heads:
            groups = self.num_v_heads // self.num_heads
            q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
        beta = self.b_proj(x).float().sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        k, v, beta, g = zero_padding(mask, k, v, beta.to(q.dtype), g)
        o, recurrent_state = gated_delta_rule(q, k, v, g, beta, initial_state=state.get("recurrent_state"),
                                              output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                              backend=self.backend)
        return delta_mixer_output(self, o, x, cache, recurrent_state, conv_state)


class GatedDeltaNetPreTrainedModel(LmlabPreTrainedModel):
    config_class = GatedDeltaNetConfig
    mixer_factory = GatedDeltaNet


class GatedDeltaNetModel(GatedDeltaNetPreTrainedModel, LmlabModel):
    pass


class GatedDeltaNetForCausalLM(GatedDeltaNetPreTrainedModel, LmlabForCausalLM):
    model_class = GatedDeltaNetModel
