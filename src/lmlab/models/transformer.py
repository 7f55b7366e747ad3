"""Transformer++ (fla's `transformer`): rotary softmax attention + SwiGLU MLP, pre-norm RMSNorm."""
from __future__ import annotations

from transformers import PretrainedConfig

from lmlab.models.blocks import (
    Attention,
    LmlabForCausalLM,
    LmlabModel,
    LmlabPreTrainedModel,
    check_backend,
    check_unsupported,
)


class TransformerConfig(PretrainedConfig):
    """fla 0.6.0's TransformerConfig: same keys and defaults, plus lmlab's `backend`
    (lmlab.kernels.dispatch's request, applied process-wide when a model is built; "auto" leaves it alone).

    Accepted and ignored (lmlab always uses its own kernels and chunked cross-entropy): fuse_norm,
    fuse_swiglu, fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp, elementwise_affine (fla's
    transformer ignores it too), max_position_embeddings (rotary has no length limit).
    """

    model_type = "transformer"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        window_size: int | None = None,
        rope_theta: float | None = 10000.0,
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        initializer_range: float = 0.02,
        elementwise_affine: bool | None = True,
        norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
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
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.window_size = window_size
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.elementwise_affine = elementwise_affine
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.attnres_block_size = attnres_block_size
        self.backend = backend
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


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
