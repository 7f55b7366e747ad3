"""Transformer++ (fla's `transformer`): rotary softmax attention + SwiGLU MLP, pre-norm RMSNorm."""
from __future__ import annotations

from lmlab.models.blocks import (
    Attention,
    LmlabConfig,
    LmlabForCausalLM,
    LmlabModel,
    LmlabPreTrainedModel,
)


class TransformerConfig(LmlabConfig):
    """fla 0.6.0's TransformerConfig: same keys and defaults (the shared ones in LmlabConfig).

    Also accepted and ignored: elementwise_affine (fla's transformer ignores it too), attention_bias (not an
    fla 0.6.0 TransformerConfig key: stored as an extra attribute, in fla too; qkv_bias is fla's key).
    """

    model_type = "transformer"
    extra_keys = ("attention_bias",)

    def __init__(
        self,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        window_size: int | None = None,
        rope_theta: float | None = 10000.0,
        elementwise_affine: bool | None = True,
        **kwargs,
    ):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.window_size = window_size
        self.rope_theta = rope_theta
        self.elementwise_affine = elementwise_affine
        super().__init__(**kwargs)


def _attention(config: TransformerConfig, layer_idx: int) -> Attention:
    return Attention(config.hidden_size, config.num_heads, config.num_kv_heads, qkv_bias=config.qkv_bias,
                     qk_norm=config.qk_norm, window_size=config.window_size, rope_theta=config.rope_theta,
                     layer_idx=layer_idx)


class TransformerPreTrainedModel(LmlabPreTrainedModel):
    config_class = TransformerConfig
    mixer_factory = staticmethod(_attention)


class TransformerModel(TransformerPreTrainedModel, LmlabModel):
    pass


class TransformerForCausalLM(TransformerPreTrainedModel, LmlabForCausalLM):
    model_class = TransformerModel
