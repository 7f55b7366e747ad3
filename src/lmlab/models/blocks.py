"""Pieces shared by lmlab's model families, and the decoder / causal-LM plumbing around them.

Every family but Mamba, Mamba2 and Samba (transformer, delta_net, gated_deltanet, gla, hgrn2, gsa,
hybrid_qlt) is a stack of the same pre-norm block,
    h = h + attn(attn_norm(h));  h = h + mlp(mlp_norm(h))
whose `attn` is the family's token mixer, or softmax `Attention` at the layers a hybrid config's `attn`
key lists. Module names and parameter shapes are fla 0.6.0's, so state dicts are interchangeable. Mamba,
Mamba2 and Samba keep fla's own names for their blocks, final norm and decoder (`backbone`): they bring their
blocks (`LmlabModel.make_block`) and take fla's layout from `BackboneLayout` and `BackboneForCausalLM`.

Forward conventions (docs/CONTRACTS.md):
- `cu_seqlens` (packed documents over the B*T tokens of the [B, T] rows, one row after the other; no
  document crosses a row): rotary positions restart at every document and the kernels reset their states
  there. The rows stay rows (not one [1, B*T] row), so attention works within them.
- `attention_mask` [B, past + T] (left padding, HF's convention: it covers the cached tokens too): linear
  mixers zero their inputs, k, v, beta and log-decays at padded positions, so padding never enters a
  recurrent or short-conv state; attention masks padded keys; rotary positions count real tokens only.
- `cache` (lmlab.models.cache.Cache): per-layer decoding state, created by the forward when
  `use_cache` and none is given.
- `positions` [B or 1, T]: the new tokens' positions (real tokens counted), computed from the above when
  not given. A decoding step that passes them needs no attention_mask where every mixer is
  `static_decoding` (lmlab.eval.decoding: one step, captured once as a CUDA graph, replayed per token).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from lmlab.kernels.activations import swiglu
from lmlab.kernels.attention import attention
from lmlab.kernels import dispatch
from lmlab.kernels.conv import short_conv
from lmlab.kernels.documents import document_positions
from lmlab.kernels.loss import linear_cross_entropy
from lmlab.kernels.norm import gated_rms_norm, rms_norm
from lmlab.models.cache import Cache

IGNORE_INDEX = -100
# transformers renamed the outputs' `past_key_values` field to `cache` (5.2x); fill whichever exists.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"


# ---------------------------------------------------------------------------------------------------
# Config helpers


def check_backend(backend: str) -> None:
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(dispatch.BACKENDS)}; got {backend!r}")


def check_unsupported(attnres_block_size: int | None) -> None:
    """Reject fla options that change the architecture and that lmlab does not implement."""
    if attnres_block_size is not None:
        raise ValueError("lmlab does not implement fla's attention residuals; set attnres_block_size to null")


def parse_attn(attn: Any, num_hidden_layers: int) -> dict | list[dict] | None:
    """Validate a hybrid `attn` spec (fla's schema) and fill its defaults; keeps the dict / list form."""
    if attn is None:
        return None
    if not isinstance(attn, (dict, list)):
        raise ValueError(f"attn must be null, a dict or a list of dicts; got {attn!r}")
    specs, owner = [], {}
    for i, spec in enumerate([attn] if isinstance(attn, dict) else attn):
        where = "attn" if isinstance(attn, dict) else f"attn[{i}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be a dict; got {spec!r}")
        spec = dict(spec)
        for name in ("layers", "num_heads"):
            if name not in spec:
                raise ValueError(f"{where} needs the key {name!r}")
        if not isinstance(spec["layers"], (list, tuple)):
            raise ValueError(f"{where}['layers'] must be a list of layer indices; got {spec['layers']!r}")
        for layer in spec["layers"]:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"{where}['layers'] must hold integers; got {layer!r}")
            if not 0 <= layer < num_hidden_layers:
                raise ValueError(f"{where}['layers'] has layer {layer}, outside [0, {num_hidden_layers}) "
                                 f"(num_hidden_layers={num_hidden_layers})")
            if layer in owner:
                raise ValueError(f"{where}['layers'] repeats layer {layer} (already in "
                                 f"{'attn' if isinstance(attn, dict) else f'attn[{owner[layer]}]'})")
            owner[layer] = i
        spec["layers"] = list(spec["layers"])
        if spec.get("num_kv_heads") is None:
            spec["num_kv_heads"] = spec["num_heads"]
        for name in ("num_heads", "num_kv_heads"):
            if isinstance(spec[name], bool) or not isinstance(spec[name], int) or spec[name] <= 0:
                raise ValueError(f"{where}['{name}'] must be a positive integer; got {spec[name]!r}")
        if not isinstance(spec.setdefault("qkv_bias", False), bool):
            raise ValueError(f"{where}['qkv_bias'] must be a boolean; got {spec['qkv_bias']!r}")
        window = spec.setdefault("window_size", None)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(f"{where}['window_size'] must be a positive integer or null; got {window!r}")
        theta = spec.setdefault("rope_theta", 10000.0)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
            raise ValueError(f"{where}['rope_theta'] must be positive and finite; got {theta!r}")
        specs.append(spec)
    return specs[0] if isinstance(attn, dict) else specs


PRENORM_RESIDUAL_STRATEGIES = ("rescale", "zero", None)


class LmlabConfig(PretrainedConfig):
    """The keys every fla 0.6.0 family config has, with fla's defaults, plus lmlab's `backend`
    (the lmlab.kernels.dispatch request the model passes to its own kernel calls; no other model's)
    and `prenorm_residual_strategy`, how the residual branches' output projections (each mixer's `o_proj`,
    each MLP's `down_proj`) are initialised for training from scratch: "rescale" (GPT-2's scheme, the HQLT
    paper's fla fork: kaiming-uniform(a=√5) / √(2·num_hidden_layers); the linear families' default),
    "zero", or None (N(0, initializer_range) like every other weight: fla 0.6.0, and the transformer's).
    A family's config declares only its own keys and passes these on.

    Accepted and ignored (lmlab always uses its own kernels and chunked cross-entropy): fuse_swiglu,
    fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp, max_position_embeddings (no length limit),
    and fuse_norm except where a family says otherwise.
    """

    keys_to_ignore_at_inference = ["past_key_values"]
    # keys a family takes besides its __init__'s parameters (other spellings it reads, keys the seed's files carry
    # that it stores unused); a config JSON with any other key is refused (lmlab.modeling.family_keys)
    extra_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        norm_eps: float = 1e-6,
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
        prenorm_residual_strategy: str | None = None,
        **kwargs,
    ):
        check_backend(backend)
        check_unsupported(attnres_block_size)
        if prenorm_residual_strategy not in PRENORM_RESIDUAL_STRATEGIES:
            raise ValueError(f"prenorm_residual_strategy must be 'rescale', 'zero' or null; "
                             f"got {prenorm_residual_strategy!r}")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.attnres_block_size = attnres_block_size
        self.backend = backend
        self.prenorm_residual_strategy = prenorm_residual_strategy
        # token ids and tie_word_embeddings are PretrainedConfig's own fields: set there, not here
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


class HybridConfig(LmlabConfig):
    """A linear family's config: adds fla's `attn` key, the softmax-attention layers of a hybrid.
    `attn` is validated whenever it is set (as in fla). Residual projections are rescaled at
    initialisation by default, as in the HQLT paper's fla fork (fla 0.6.0: prenorm_residual_strategy=null)."""

    def __init__(self, attn: dict | list[dict] | None = None, prenorm_residual_strategy: str | None = "rescale",
                 **kwargs):
        super().__init__(prenorm_residual_strategy=prenorm_residual_strategy, **kwargs)
        self.attn = attn  # after num_hidden_layers, which its validation needs

    @property
    def attn(self) -> dict | list[dict] | None:
        return self.__dict__.get("attn")

    @attn.setter
    def attn(self, value: Any) -> None:
        self.__dict__["attn"] = parse_attn(value, self.num_hidden_layers)

    def attn_spec(self, layer_idx: int) -> dict | None:
        """The hybrid attention spec of layer `layer_idx`, or None when it uses the family's mixer."""
        specs = [self.attn] if isinstance(self.attn, dict) else self.attn or []
        return next((spec for spec in specs if layer_idx in spec["layers"]), None)


# ---------------------------------------------------------------------------------------------------
# Modules


class UsesKernels:
    """A module that calls lmlab.kernels: it passes `backend` to every kernel call. The model that owns it
    sets it (`LmlabPreTrainedModel.set_kernel_backend`), so models in one process keep their own backends."""

    backend: str = "auto"


# fla's HGRN2 and GSA layers apply their output norm through fla's `rms_norm_linear` without passing their
# norm_eps: this, its default, is the eps they use
RMS_NORM_LINEAR_EPS = 1e-5


class RMSNorm(nn.Module, UsesKernels):
    """fla's RMSNorm (weight only; none with elementwise_affine=False)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight is not None else x.new_ones(x.shape[-1])
        return rms_norm(x, weight, self.eps, backend=self.backend)


class GatedRMSNorm(nn.Module, UsesKernels):
    """fla's FusedRMSNormGated: rms_norm(x) * weight * act(gate), act = swish (silu) or sigmoid."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 activation: str = "swish"):
        super().__init__()
        if activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"gate activation must be swish, silu or sigmoid; got {activation!r}")
        self.eps, self.activation = eps, activation
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight is not None else x.new_ones(x.shape[-1])
        if self.activation == "sigmoid":
            return (rms_norm(x, weight, self.eps, backend=self.backend) * gate.sigmoid()).to(x.dtype)
        return gated_rms_norm(x, gate, weight, self.eps, backend=self.backend)


class MLP(nn.Module, UsesKernels):
    """fla's GatedMLP (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, hidden_ratio: float | None = 4, intermediate_size: int | None = None,
                 hidden_act: str = "swish"):
        super().__init__()
        if hidden_act != "swish":
            raise ValueError(f"lmlab's MLP supports hidden_act 'swish' only; got {hidden_act!r}")
        if intermediate_size is None:
            # fla's rule: 2/3 of hidden_ratio * hidden_size, rounded up to a multiple of 256
            intermediate_size = int(hidden_size * (hidden_ratio or 4) * 2 / 3)
            intermediate_size = 256 * math.ceil(intermediate_size / 256)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))


class ShortConvolution(nn.Module, UsesKernels):
    """fla's ShortConvolution: causal depthwise conv, weight [D, 1, W] (nn.Conv1d's layout)."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        nn.init.normal_(self.weight, std=0.02)  # the model's _init_weights redoes it with initializer_range

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, output_final_state: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return short_conv(x, self.weight, self.bias, activation=self.activation, initial_state=state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=self.backend)


Rotary = dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]]  # (head_dim, theta) -> (cos, sin)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B or 1, T, 1, head_dim / 2] (float32) of the rotary angles at `positions` [B or 1, T].

    Computed once per model forward and shared by the attention layers: inside a compiled block, inductor
    fused the angles' cos/sin into the rotation and recomputed them for every head and row (12% of a
    Transformer 340M training step on an H200; bench/NOTES.md, step 4)."""
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(0, half, device=positions.device, dtype=torch.float32) / half)
    angles = positions[..., None, None].float() * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in fla's (GPT-NeoX, non-interleaved) convention: the two halves of each head
    rotate together. x [B, T, H, D]; cos, sin from `rotary_tables`."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as fla's in-kernel qk l2norm."""
    return (x.float() * torch.rsqrt(x.float().square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """[B, length] bool, True at real tokens, for the last `length` positions; None without padding."""
    return None if attention_mask is None else attention_mask[:, -length:].bool()


def zero_padding(mask: torch.Tensor | None, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Zero [B, T, ...] tensors at padded positions (torch.where, so garbage there cannot leak as NaN)."""
    if mask is None:
        return list(tensors)
    return [torch.where(mask.view(*mask.shape, *[1] * (t.dim() - 2)), t, 0) for t in tensors]


def project_qkv(mixer: nn.Module, x: torch.Tensor, conv_state: tuple | None, use_cache: bool,
                cu_seqlens: torch.Tensor | None, names: tuple[str, str, str] = ("q", "k", "v"),
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
    """A linear mixer's three input projections (fla's `q_proj`, `k_proj`, `v_proj`; other `names` for
    other families, e.g. HGRN2's q, f, i), through its short convolutions (`q_conv1d`, ...) when it has
    them (`use_short_conv`), continuing from the cached `conv_state`. Returns the three [B, T, dim]
    tensors and the new conv state (None without convs)."""
    projected = [getattr(mixer, f"{name}_proj")(x) for name in names]
    if not mixer.use_short_conv:
        return (*projected, None)
    convs = [getattr(mixer, f"{name}_conv1d") for name in names]
    outputs, states = zip(*(conv(y, state, use_cache, cu_seqlens)
                            for conv, y, state in zip(convs, projected, conv_state or (None,) * 3)))
    return (*outputs, states)


def delta_mixer_output(mixer: nn.Module, o: torch.Tensor, x: torch.Tensor, cache: Cache | None,
                       recurrent_state: torch.Tensor | None, conv_state: tuple | None) -> torch.Tensor:
    """The end of a (gated) DeltaNet mixer: keep its states in the cache, normalise the heads' outputs
    (`o_norm`, gated by `g_proj(x)` with `use_gate`) and project them (`o_proj`)."""
    B, T = x.shape[:2]
    if cache is not None:
        cache.update(mixer.layer_idx, recurrent_state=recurrent_state, conv_state=conv_state)
    if mixer.use_gate:
        o = mixer.o_norm(o, mixer.g_proj(x).view(B, T, -1, mixer.head_v_dim))
    else:
        o = mixer.o_norm(o)
    return mixer.o_proj(o.reshape(B, T, -1))


class Attention(nn.Module, UsesKernels):
    """fla's softmax Attention (the transformer's mixer and hybrids' `attn` layers): GQA, rotary,
    optional qkv bias, per-head q/k RMSNorm and sliding window; head_dim = hidden_size // num_heads."""

    # A decoding step reads its cached keys, values and their padding mask, and the new token (real). A KV
    # cache keeps its shape once it is a buffer (`Cache.reserve`). A sliding window is not reserved: like
    # HQLT's, it keeps its shape once full (one never full, longer than prompt + new tokens, stays eager).
    static_decoding = True

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, qkv_bias: bool = False,
                 qk_norm: bool = False, window_size: int | None = None, rope_theta: float = 10000.0,
                 layer_idx: int = 0):
        super().__init__()
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by the attention num_heads ({num_heads})")
        self.head_dim = hidden_size // num_heads
        self.window_size, self.rope_theta, self.layer_idx = window_size, rope_theta, layer_idx
        self.rotary_key = (self.head_dim, rope_theta)  # which of the model's rotary tables it reads
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        self.qk_norm = qk_norm

    def forward(self, x: torch.Tensor, *, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary[self.rotary_key]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        is_token = padding_mask(attention_mask, T)
        if cache is not None:  # the keys' padding mask is cached with them: a step needs no growing mask
            is_token = is_token if is_token is not None else x.new_ones(B, T, dtype=torch.bool)
            keep = None if self.window_size is None else self.window_size - 1
            k, v, is_token = cache.append(self.layer_idx, "attention", (k, v, is_token), keep)
        o = attention(q, k, v, causal=True, window_size=self.window_size, cu_seqlens=cu_seqlens,
                      attention_mask=is_token, backend=self.backend)
        return self.o_proj(o.reshape(B, T, -1))


def hybrid_attention(config: PretrainedConfig, layer_idx: int) -> Attention | None:
    """The softmax attention a hybrid config puts at `layer_idx`, or None for the family's mixer."""
    spec = config.attn_spec(layer_idx) if isinstance(config, HybridConfig) else None
    if spec is None:
        return None
    return Attention(config.hidden_size, spec["num_heads"], spec["num_kv_heads"], qkv_bias=spec["qkv_bias"],
                     window_size=spec["window_size"], rope_theta=spec["rope_theta"], layer_idx=layer_idx)


class DecoderBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: token mixer (`attn`) then SwiGLU MLP."""

    def __init__(self, config: PretrainedConfig, mixer: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = mixer
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config.hidden_size, config.hidden_ratio, config.intermediate_size, config.hidden_act)
        # the residual branches' output projections: initialised by the config's prenorm_residual_strategy
        self.attn.o_proj.is_residual_output = self.mlp.down_proj.is_residual_output = True

    def forward(self, hidden_states: torch.Tensor, rotary: Rotary,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: Cache | None = None, **mixer_inputs: torch.Tensor) -> torch.Tensor:
        """`rotary`: the attention layers' cos/sin tables (`LmlabModel.rotary_tables`); other mixers ignore it.
        `mixer_inputs`: this layer's share of `LmlabModel.mixer_inputs`, passed on to the mixer."""
        hidden_states = hidden_states + self.attn(self.attn_norm(hidden_states), rotary=rotary,
                                                  attention_mask=attention_mask, cu_seqlens=cu_seqlens, cache=cache,
                                                  **mixer_inputs)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


# ---------------------------------------------------------------------------------------------------
# Models


def token_positions(B: int, T: int, past: int, attention_mask: torch.Tensor | None,
                    cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Rotary positions [B or 1, T]: per document with cu_seqlens, counting real tokens only with
    padding, else past .. past + T - 1."""
    if cu_seqlens is not None:
        flat = torch.arange(B * T, device=device)
        return document_positions(cu_seqlens, flat)[1].view(B, T)
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    return torch.arange(past, past + T, device=device)[None]


@torch.no_grad()
def init_dt_bias(dt_bias: nn.Parameter, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
    """Mamba's and Mamba2's time-step bias (fla's init, also Gated DeltaNet's): dt ~ logU(dt_min, dt_max), at least
    dt_floor, stored as softplus^-1(dt). A parameter loaded from a checkpoint (flagged by transformers) is
    left alone."""
    if getattr(dt_bias, "_is_hf_initialized", False):
        return
    log_dt = torch.rand_like(dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp(min=dt_floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class LmlabPreTrainedModel(PreTrainedModel):
    """Shared HF plumbing; a family subclass sets `config_class` and `mixer_factory` (builds its token
    mixer as `mixer_factory(config, layer_idx)`)."""

    mixer_factory: Callable[[PretrainedConfig, int], nn.Module]
    base_model_prefix = "model"  # the decoder's attribute in the causal LM (BackboneLayout: backbone)
    # "rescale" divides by √(residual_branches · num_hidden_layers): two per block (mixer, MLP), as in the
    # HQLT fork; BackboneLayout's families divide by √num_hidden_layers
    residual_branches = 2
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderBlock"]
    # Recurrent states cannot be rolled back: no assisted decoding, no cache cropping.
    _is_stateful = True

    def post_init(self) -> None:
        super().post_init()
        self.set_kernel_backend(self.config.backend)

    def set_kernel_backend(self, backend: str) -> None:
        """Run this model's kernels on `backend` (one of lmlab.kernels.dispatch.BACKENDS; an op without it
        runs "auto"). Only this model changes; its config's `backend` key is left as it was loaded."""
        check_backend(backend)
        for module in self.modules():
            if isinstance(module, UsesKernels):
                module.backend = backend

    def _init_weights(self, module: nn.Module) -> None:
        """fla's scheme: N(0, initializer_range) for linear, conv and embedding weights, zero biases, unit
        norms, and the family's own rule for special parameters (GDN's A_log / dt_bias); then the residual
        branches' output projections as the config's `prenorm_residual_strategy` says."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, ShortConvolution)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            strategy = self.config.prenorm_residual_strategy
            if getattr(module, "is_residual_output", False) and strategy == "rescale":
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.weight /= math.sqrt(self.residual_branches * self.config.num_hidden_layers)
            elif getattr(module, "is_residual_output", False) and strategy == "zero":
                nn.init.zeros_(module.weight)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
        elif hasattr(module, "reset_special_parameters"):
            module.reset_special_parameters()

    def make_mixer(self, config: PretrainedConfig, layer_idx: int) -> nn.Module:
        return hybrid_attention(config, layer_idx) or self.mixer_factory(config, layer_idx)


class LmlabModel(LmlabPreTrainedModel):
    """The decoder: embeddings, blocks (`layers`), final norm."""

    final_norm_name = "norm"  # BackboneLayout: norm_f
    embedding_padding = True  # padding_idx = pad_token_id (BackboneLayout: none)

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        padding_idx = config.pad_token_id if self.embedding_padding else None
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(self.make_block(config, i) for i in range(config.num_hidden_layers))
        self.add_module(self.final_norm_name, RMSNorm(config.hidden_size, config.norm_eps))
        # (head_dim, rope_theta) of every layer that rotates its queries and keys (a `rotary_key`), found
        # once: the tables are built every forward
        self.rotary_keys = {key for m in self.modules() if (key := getattr(m, "rotary_key", None)) is not None}
        self.post_init()

    def make_block(self, config: PretrainedConfig, layer_idx: int) -> nn.Module:
        """Block `layer_idx`, called as block(hidden, rotary, attention_mask=, cu_seqlens=, cache=,
        **mixer_inputs) -> hidden."""
        return DecoderBlock(config, self.make_mixer(config, layer_idx))

    def rotary_tables(self, positions: torch.Tensor) -> Rotary:
        """cos/sin tables for every (head_dim, rope_theta) of the model's attention layers (none for a
        purely linear model), at `positions` [B or 1, T]."""
        return {key: rotary_tables(positions, *key) for key in self.rotary_keys}

    def mixer_inputs(self, positions: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per layer, keyword inputs of its mixer computed once per forward, outside the blocks, from the
        model's own parameters (HGRN2's forget-gate lower bounds) or the token `positions` [B or 1, T]
        (HQLT's windows); none by default."""
        return [{} for _ in self.layers]

    def static_decoding_refusal(self) -> str | None:
        """Why a one-token decoding step of this model, given its tokens, `positions` and the cache, is not
        one fixed computation (a CUDA graph, lmlab.eval.decoding), or None when it is. Every module that
        keeps decoding states (its `layer_idx` is its key in the Cache) must say `static_decoding`: its step
        reads no attention_mask (new tokens are real) and no Python value that changes per step. Whether
        the states keep their shapes (a sliding window once full) the caller checks (`Cache.layout`)."""
        for module in self.modules():
            if hasattr(module, "layer_idx") and not getattr(module, "static_decoding", False):
                return f"its {type(module).__name__} layers read the growing attention mask"
        return None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"lmlab models need an lmlab.models.cache.Cache; got {type(cache).__name__}")
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = hidden.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cu_seqlens is not None:
            if attention_mask is not None or cache is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with attention_mask or a cache")
            use_cache = False
        if cache is None and use_cache:
            cache = Cache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must cover the cached and new tokens: shape ({B}, {past + T}); "
                             f"got {tuple(attention_mask.shape)}")
        if positions is None:
            positions = token_positions(B, T, past, attention_mask, cu_seqlens, hidden.device)
        rotary = self.rotary_tables(positions)
        all_hidden = []
        for layer, mixer_inputs in zip(self.layers, self.mixer_inputs(positions)):
            all_hidden.append(hidden)
            hidden = layer(hidden, rotary, attention_mask=attention_mask, cu_seqlens=cu_seqlens, cache=cache,
                           **mixer_inputs)
        hidden = getattr(self, self.final_norm_name)(hidden)
        if cache is not None:
            cache.advance(T)
        want_all = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=(*all_hidden, hidden) if want_all else None,
            **{_CACHE_FIELD: cache},
        )


class LmlabForCausalLM(LmlabPreTrainedModel, GenerationMixin, UsesKernels):
    """Decoder + linear head. A family subclass sets `model_class` (its LmlabModel subclass); the decoder is
    the attribute `base_model_prefix` names (`model` reads it under either name)."""

    model_class: type[LmlabModel]
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        setattr(self, self.base_model_prefix, self.model_class(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> LmlabModel:
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        loss_only: bool = False,
        positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """With `labels` (unshifted, -100 ignored): loss = token sum / num_items_in_batch when given, else the
        token mean, computed chunk by chunk from the hidden states, and the logits as without labels (HF's
        convention). `loss_only` (the trainer's memory-saving path): the logits are not computed (None)."""
        outputs = self.model(input_ids, attention_mask, cache if cache is not None else past_key_values,
                             inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
                             output_hidden_states=output_hidden_states, positions=positions)
        hidden = outputs.last_hidden_state
        loss = logits = None
        if labels is not None:
            shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device)
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                        shifted.reshape(-1), ignore_index=IGNORE_INDEX,
                                        reduction="mean" if num_items_in_batch is None else "sum",
                                        backend=self.backend)
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        if labels is None or not loss_only:
            if isinstance(logits_to_keep, int):
                hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            else:
                hidden = hidden[:, logits_to_keep]
            logits = self.lm_head(hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not create a transformers DynamicCache: the forward creates an lmlab Cache.
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen. Works with transformers 5.17 (`past_key_values`)
        and 5.24 (`cache`); position ids, cache positions and the like are ignored (the model derives
        positions from the cache length and the attention mask)."""
        cache = cache if cache is not None else past_key_values
        seen = cache.get_seq_length() if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, "past_key_values": cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs


class BackboneLayout:
    """fla's Mamba, Mamba2 and Samba layout, mixed into a family's PreTrainedModel: the decoder at `backbone`,
    the final norm `norm_f`, an embedding without a padding index, "rescale" by √num_hidden_layers."""

    base_model_prefix = "backbone"
    final_norm_name = "norm_f"
    embedding_padding = False
    residual_branches = 1


class BackboneForCausalLM(LmlabForCausalLM):
    """A causal LM whose decoder is `backbone`, read as `model` too (lmlab's trainer and evaluation use it)."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    @property
    def model(self) -> LmlabModel:
        return self.backbone
