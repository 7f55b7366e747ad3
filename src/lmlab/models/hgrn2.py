"""HGRN2 (fla's `hgrn2`; Qin et al., arXiv 2404.07904): a gated linear RNN with state expansion, which is
GLA with the input gate tied to the forget gate. Per head, with f_t = sigmoid(f_proj x) (bounded below by
the layer's lower bound β: f_t = β + (1 − β) f_t) and g_t = log f_t:
    S_t = diag(f_t) S_{t-1} + (1 − f_t) i_tᵀ,   o_t = S_tᵀ (silu(q_t) / √d)
so the recurrence is lmlab's GLA kernel with k = 1 − exp(g), gk = g, v = i (fla's layer calls fla's GLA
kernel the same way). The lower bounds are a model parameter `lower_bounds` [layers, hidden]: β of
layer l is Σ_{l' <= l} softmax(lower_bounds)_{l'} − softmax(lower_bounds)_0, 0 for the first layer and
growing with depth.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.kernels.gla import gla
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

ATTN_MODES = ("chunk", "fused_recurrent", "fused_chunk")  # fla's; all compute the same


class HGRN2Config(HybridConfig):
    """fla 0.6.0's HGRN2Config: same keys and defaults (the shared ones in LmlabConfig).

    `num_heads` and `expand_ratio` (the key dim per head) determine each other through hidden_size, as in
    fla: give one (the other null) or two that agree; fla's layer silently uses expand_ratio when they
    disagree, lmlab refuses such a config. `attn_mode` is accepted and ignored (lmlab's dispatcher picks
    kernels).
    """

    model_type = "hgrn2"

    def __init__(
        self,
        attn_mode: str = "chunk",
        num_heads: int | None = None,
        expand_ratio: int | None = 128,
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_lower_bound: bool = True,
        elementwise_affine: bool | None = True,
        **kwargs,
    ):
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {', '.join(ATTN_MODES)}; got {attn_mode!r}")
        self.attn_mode = attn_mode
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_lower_bound = use_lower_bound
        self.elementwise_affine = elementwise_affine
        super().__init__(**kwargs)
        self.num_heads, self.expand_ratio = self._heads(self.hidden_size, num_heads, expand_ratio)

    @staticmethod
    def _heads(hidden: int, num_heads: int | None, expand_ratio: int | None) -> tuple[int, int]:
        """(num_heads, expand_ratio) by fla's rule, checked to give whole heads."""
        if num_heads is None and expand_ratio is None:
            raise ValueError("hgrn2 needs num_heads or expand_ratio (the key dim per head)")
        if expand_ratio is None:
            expand_ratio = hidden // num_heads
        heads = hidden // expand_ratio
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"num_heads ({num_heads}) disagrees with expand_ratio ({expand_ratio}): hidden_size "
                             f"{hidden} // expand_ratio is {heads} heads; set one of them to null")
        if heads < 1 or hidden % heads:
            raise ValueError(f"hidden_size ({hidden}) must split into hidden_size // expand_ratio ({heads}) "
                             f"heads evenly (expand_ratio={expand_ratio})")
        return heads, expand_ratio


class HGRN2Attention(nn.Module, UsesKernels):
    """fla's HGRN2Attention layer (same parameter names and shapes). The output norm `g_norm` spans all
    heads (hidden_size), as in fla."""

    static_decoding = True  # a decoding step reads its fixed-size states and the new token only

    def __init__(self, config: HGRN2Config, layer_idx: int):
        super().__init__()
        hidden, H = config.hidden_size, config.num_heads
        self.head_f_dim, self.head_i_dim = config.expand_ratio, hidden // H
        forget_dim = H * self.head_f_dim
        self.layer_idx = layer_idx
        self.use_short_conv = config.use_short_conv
        self.q_proj = nn.Linear(hidden, forget_dim, bias=False)
        self.f_proj = nn.Linear(hidden, forget_dim, bias=False)
        self.i_proj = nn.Linear(hidden, hidden, bias=False)
        if self.use_short_conv:  # without an activation, as in fla
            self.q_conv1d = ShortConvolution(forget_dim, config.conv_size, activation=None)
            self.f_conv1d = ShortConvolution(forget_dim, config.conv_size, activation=None)
            self.i_conv1d = ShortConvolution(hidden, config.conv_size, activation=None)
        self.g_norm = RMSNorm(hidden, RMS_NORM_LINEAR_EPS, config.elementwise_affine)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, *, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None,
                lower_bound: torch.Tensor | None = None) -> torch.Tensor:
        """`lower_bound` [hidden]: the forget gates' lower bound (HGRN2Model.mixer_inputs); None: no bound."""
        B, T, _ = x.shape
        mask = padding_mask(attention_mask, T)
        (x,) = zero_padding(mask, x)  # padding must not enter the short-conv states
        state = cache[self.layer_idx] if cache is not None else {}
        q, f, i, conv_state = project_qkv(self, x, state.get("conv_state"), cache is not None, cu_seqlens,
                                          names=("q", "f", "i"))
        g = F.logsigmoid(f.float())
        if lower_bound is not None:  # log(β + (1 − β) sigmoid(f))
            g = torch.logaddexp(lower_bound.log(), torch.log1p(-lower_bound) + g)
        k = (1 - g.exp()).to(i.dtype)
        q, k, g = (y.view(B, T, -1, self.head_f_dim) for y in (F.silu(q), k, g))
        i = i.view(B, T, -1, self.head_i_dim)
        k, i, g = zero_padding(mask, k, i, g)
        o, recurrent_state = gla(q, k, i, g, initial_state=state.get("recurrent_state"),
                                 output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                 backend=self.backend)
        if cache is not None:
            cache.update(self.layer_idx, recurrent_state=recurrent_state, conv_state=conv_state)
        return self.o_proj(self.g_norm(o.reshape(B, T, -1)))


class HGRN2PreTrainedModel(LmlabPreTrainedModel):
    config_class = HGRN2Config
    mixer_factory = HGRN2Attention


class HGRN2Model(HGRN2PreTrainedModel, LmlabModel):
    """The decoder, with fla's `lower_bounds` [num_hidden_layers, hidden_size] when `use_lower_bound`."""

    def __init__(self, config: HGRN2Config):
        super().__init__(config)
        if config.use_lower_bound:  # zeros, as fla initialises them
            self.lower_bounds = nn.Parameter(torch.zeros(config.num_hidden_layers, config.hidden_size))

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        """fla's initial lower bounds: zeros (left alone when loaded from a checkpoint)."""
        bounds = getattr(self, "lower_bounds", None)
        if bounds is not None and not getattr(bounds, "_is_hf_initialized", False):
            bounds.zero_()

    def mixer_inputs(self, positions: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Each HGRN2 layer's lower bound; none for the first layer (its bound is 0, and log 0 would give its
        gradient a 0 · ∞) and for hybrid attention layers."""
        if not self.config.use_lower_bound:
            return super().mixer_inputs(positions)
        weights = self.lower_bounds.softmax(0, dtype=torch.float32)
        bounds = weights.cumsum(0) - weights[0]
        return [{"lower_bound": bounds[i]} if i > 0 and isinstance(layer.attn, HGRN2Attention) else {}
                for i, layer in enumerate(self.layers)]


class HGRN2ForCausalLM(HGRN2PreTrainedModel, LmlabForCausalLM):
    model_class = HGRN2Model
