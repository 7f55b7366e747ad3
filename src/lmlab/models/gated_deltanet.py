"""Gated DeltaNet (fla's `gated_deltanet`): the delta rule with a per-head, data-dependent decay,
S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T with log a_t = -exp(A_log) softplus(a_proj x + dt_bias)
(Yang et al., arXiv 2412.06464)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from lmlab.kernels.gated_delta_rule import gated_delta_rule
from lmlab.models.blocks import (
    GatedRMSNorm,
    HybridConfigMixin,
    LmlabForCausalLM,
    LmlabModel,
    LmlabPreTrainedModel,
    RMSNorm,
    ShortConvolution,
    check_backend,
    check_unsupported,
    l2_norm,
    padding_mask,
    run_short_convs,
    zero_padding,
)
from lmlab.models.cache import Cache


class GatedDeltaNetConfig(HybridConfigMixin, PretrainedConfig):
    """fla 0.6.0's GatedDeltaNetConfig: same keys and defaults, plus lmlab's `backend`
    (lmlab.kernels.dispatch's request, applied process-wide when a model is built; "auto" leaves it alone).

    Accepted and ignored: attn_mode (lmlab's dispatcher picks kernels), fuse_norm, fuse_swiglu,
    fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp, max_position_embeddings.
    """

    model_type = "gated_deltanet"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        attn_mode: str = "chunk",
        hidden_size: int = 2048,
        expand_v: float = 2.0,
        use_gate: bool = True,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        head_dim: int = 256,
        num_heads: int = 6,
        num_v_heads: int | None = None,
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        num_hidden_layers: int = 21,
        norm_eps: float = 1e-6,
        attn: dict | list[dict] | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        vocab_size: int = 32000,
        attnres_block_size: int | None = None,
        output_gate_activation: str = "swish",
        backend: str = "auto",
        **kwargs,
    ):
        check_backend(backend)
        check_unsupported(attnres_block_size)
        if output_gate_activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"output_gate_activation must be swish, silu or sigmoid; got {output_gate_activation!r}")
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.output_gate_activation = output_gate_activation
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.allow_neg_eigval = allow_neg_eigval
        self.attnres_block_size = attnres_block_size
        self.backend = backend
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


class GatedDeltaNet(nn.Module):
    """fla's GatedDeltaNet layer (same parameter names and shapes). With num_v_heads > num_heads (grouped
    value heads), each q/k head serves num_v_heads // num_heads consecutive value heads."""

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
        if not getattr(self.dt_bias, "_is_hf_initialized", False):
            log_dt = torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
            dt = log_dt.exp().clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, *, positions: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        mask = padding_mask(attention_mask, T)
        (x,) = zero_padding(mask, x)  # padding must not enter the short-conv states
        state = cache[self.layer_idx] if cache is not None else {}
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = None
        if self.use_short_conv:
            (q, k, v), conv_state = run_short_convs([self.q_conv1d, self.k_conv1d, self.v_conv1d], [q, k, v],
                                                    state.get("conv_state"), cache is not None, cu_seqlens)
        else:
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
                                              output_final_state=cache is not None, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.update(self.layer_idx, recurrent_state=recurrent_state, conv_state=conv_state)
        if self.use_gate:
            o = self.o_norm(o, self.g_proj(x).view(B, T, -1, self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, -1))


class GatedDeltaNetPreTrainedModel(LmlabPreTrainedModel):
    config_class = GatedDeltaNetConfig
    mixer_factory = GatedDeltaNet


class GatedDeltaNetModel(GatedDeltaNetPreTrainedModel, LmlabModel):
    pass


class GatedDeltaNetForCausalLM(GatedDeltaNetPreTrainedModel, LmlabForCausalLM):
    model_class = GatedDeltaNetModel
