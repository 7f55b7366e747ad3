"""DeltaNet (fla's `delta_net`): linear attention with the delta-rule state update
S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t (Yang et al., arXiv 2406.06484)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from lmlab.kernels.delta_rule import delta_rule
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


class DeltaNetConfig(HybridConfigMixin, PretrainedConfig):
    """fla 0.6.0's DeltaNetConfig: same keys and defaults, plus lmlab's `backend`
    (lmlab.kernels.dispatch's request, applied process-wide when a model is built; "auto" leaves it alone).

    Accepted and ignored: attn_mode (lmlab's dispatcher picks kernels), use_output_norm (fla ignores it
    too), fuse_norm, fuse_swiglu, fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp,
    max_position_embeddings.
    """

    model_type = "delta_net"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        attn_mode: str = "chunk",
        hidden_size: int = 2048,
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
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        num_hidden_layers: int = 24,
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
        backend: str = "auto",
        **kwargs,
    ):
        check_backend(backend)
        check_unsupported(attnres_block_size)
        if qk_norm not in ("l2", "sum"):
            raise ValueError(f"qk_norm must be 'l2' or 'sum'; got {qk_norm!r}")
        if qk_activation not in ("silu", "relu", "elu", "identity"):
            raise ValueError(f"qk_activation must be silu, relu, elu or identity; got {qk_activation!r}")
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_beta = use_beta
        self.use_output_norm = use_output_norm
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.qk_activation = qk_activation
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


class DeltaNet(nn.Module):
    """fla's DeltaNet layer (same parameter names and shapes)."""

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
                                        output_final_state=cache is not None, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.update(self.layer_idx, recurrent_state=recurrent_state, conv_state=conv_state)
        if self.use_gate:
            o = self.o_norm(o, self.g_proj(x).view(B, T, -1, self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, -1))


class DeltaNetPreTrainedModel(LmlabPreTrainedModel):
    config_class = DeltaNetConfig
    mixer_factory = DeltaNet


class DeltaNetModel(DeltaNetPreTrainedModel, LmlabModel):
    pass


class DeltaNetForCausalLM(DeltaNetPreTrainedModel, LmlabForCausalLM):
    model_class = DeltaNetModel
