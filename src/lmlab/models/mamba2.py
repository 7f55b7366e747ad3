"""Mamba2 (fla's `mamba2`; Dao & Gu, arXiv 2405.21060): blocks of one pre-norm residual mixer each, no MLP
(Mamba's block, `lmlab.models.mamba.MambaBlock`).

The mixer, per token: in_proj x -> (z, xBC, dt); xBC through a causal depthwise conv and silu, split into
x [H heads of head_dim P], B and C [n_groups of state_size N, each shared by H / n_groups heads];
Δ = clamp(softplus(dt + dt_bias), dt_limit); A = −exp(A_log) per head; the SSD recurrence per head
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ,   y_t = h_t C_t + D x_t
then y gated by silu(z) through an RMSNorm over groups of channels (`rmsnorm`; else y · silu(z)), and
out_proj. The recurrence is fla's "simple GLA" (one decay per head) with q = C, k = B, v = Δ·x, g = Δ·A,
scale 1 (`lmlab.kernels.simple_gla`); the state is kept in lmlab's [N, P] layout (Mamba's is [P, N]).

State-dict keys and shapes are fla 0.6.0's Mamba2ForCausalLM's (transformers' Mamba2 has the same): the
decoder is `backbone` (`embeddings`, `layers.i.norm`, `layers.i.mixer.{in_proj, conv1d, dt_bias, A_log, D,
norm, out_proj}`, `norm_f`), with `lm_head` beside it. The decoding cache holds the conv state (the last
conv_kernel inputs of xBC) and the SSM state per layer.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from lmlab.kernels.norm import group_gated_rms_norm
from lmlab.kernels.simple_gla import simple_gla
from lmlab.models.blocks import (
    BackboneForCausalLM,
    BackboneLayout,
    LmlabModel,
    LmlabPreTrainedModel,
    Rotary,
    ShortConvolution,
    UsesKernels,
    check_backend,
    init_dt_bias,
    padding_mask,
    zero_padding,
)
from lmlab.models.cache import Cache
from lmlab.models.mamba import MambaBlock

A_INITS = ("arange", "uniform")
# The seed's fla fork (transformers' Mamba2 names) spells some of fla 0.6.0's keys differently; the seed's
# config files carry them. fla 0.6.0 ignores them: lmlab accepts them only where they agree with fla's key.
FORK_KEYS = {"time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_floor": "dt_init_floor",
             "time_step_limit": "dt_limit", "rms_norm": "rmsnorm", "layer_norm_epsilon": "norm_eps"}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number; got {value!r}")


class Mamba2Config(PretrainedConfig):
    """fla 0.6.0's Mamba2Config: same keys and defaults, plus lmlab's `backend` (see LmlabConfig) and `A_init`.

    Initialisation for training from scratch, as the seed's fla fork by default: A_h = h for heads h = 1..H
    (`A_init: "arange"`, the fork's and transformers' rule); `"uniform"` gives fla 0.6.0's A ~ U(A_init_range).
    Both rescale out_proj as kaiming-uniform(a=√5) / √num_hidden_layers when `rescale_prenorm_residual`
    (one residual branch per block), as fla 0.6.0 and the fork both do.

    `num_heads` is expand · hidden_size / head_dim (fla derives it); a given one must agree. Accepted and
    ignored: `chunk_size` (lmlab's dispatcher picks kernels), `residual_in_fp32` (each block's sum is rounded
    once to the model's dtype either way), fuse_norm, fuse_cross_entropy, fuse_linear_cross_entropy,
    use_l2warp, the fork's `time_step_rank` (fla's Mamba2 has no dt rank); the seed fork's names of fla's keys
    (FORK_KEYS) where they agree with them.
    """

    model_type = "mamba2"
    keys_to_ignore_at_inference = ["past_key_values"]
    extra_keys = (*FORK_KEYS, "time_step_rank")  # see LmlabConfig.extra_keys

    def __init__(
        self,
        head_dim: int = 64,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        state_size: int = 128,
        num_hidden_layers: int = 48,
        norm_eps: float = 1e-5,
        pad_token_id: int | None = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        expand: int = 2,
        conv_kernel: int = 4,
        n_groups: int = 1,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        conv_init: float | None = None,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        residual_in_fp32: bool = True,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        rescale_prenorm_residual: bool = True,
        use_cache: bool = True,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        chunk_size: int = 256,
        fuse_norm: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        tie_word_embeddings: bool = False,
        num_heads: int | None = None,
        backend: str = "auto",
        A_init: str = "arange",
        **kwargs,
    ):
        check_backend(backend)
        if "prenorm_residual_strategy" in kwargs:
            raise ValueError("mamba2 takes fla's rescale_prenorm_residual (true or false) instead of "
                             "prenorm_residual_strategy")
        sizes = dict(head_dim=head_dim, hidden_size=hidden_size, state_size=state_size, conv_kernel=conv_kernel,
                     num_hidden_layers=num_hidden_layers, n_groups=n_groups, chunk_size=chunk_size,
                     vocab_size=vocab_size)
        for name, value in sizes.items():
            _positive_int(name, value)
        for name, value in dict(expand=expand, norm_eps=norm_eps, dt_min=dt_min, dt_max=dt_max,
                                dt_init_floor=dt_init_floor).items():
            _positive(name, value)
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"lmlab's Mamba2 supports hidden_act 'silu' (or 'swish') only; got {hidden_act!r}")
        if A_init not in A_INITS:
            raise ValueError(f"A_init must be 'arange' (the seed fork's) or 'uniform' (fla 0.6.0's); got {A_init!r}")
        if not _ordered_pair(A_init_range) or A_init_range[0] <= 0:
            raise ValueError(f"A_init_range must be a positive (min, max) pair; got {A_init_range!r}")
        if dt_max < dt_min:
            raise ValueError(f"dt_min ({dt_min}) must not exceed dt_max ({dt_max})")
        if not _ordered_pair(dt_limit) or dt_limit[0] < 0:
            raise ValueError(f"dt_limit must be a (min, max) pair with 0 <= min <= max; got {dt_limit!r}")
        if conv_init is not None:
            _positive("conv_init", conv_init)
        intermediate = int(expand * hidden_size)
        if intermediate % head_dim:
            raise ValueError(f"expand * hidden_size ({intermediate}) must be a multiple of head_dim ({head_dim})")
        heads = intermediate // head_dim
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"num_heads ({num_heads}) disagrees with expand * hidden_size / head_dim ({heads}); "
                             "set it to null")
        if heads % n_groups:
            raise ValueError(f"num_heads ({heads}) must be a multiple of n_groups ({n_groups})")
        self.head_dim = head_dim
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.state_size = state_size
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.n_groups = n_groups
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.conv_init = conv_init
        self.A_init_range = A_init_range
        self.D_has_hdim = D_has_hdim
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.residual_in_fp32 = residual_in_fp32
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.dt_limit = dt_limit
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.use_cache = use_cache
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.chunk_size = chunk_size
        self.fuse_norm = fuse_norm
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.num_heads = heads
        self.backend = backend
        self.A_init = A_init
        for fork_key, key in FORK_KEYS.items():
            if fork_key in kwargs and _differs(kwargs[fork_key], getattr(self, key)):
                raise ValueError(f"{fork_key} ({kwargs[fork_key]!r}) is the seed fork's name for fla's {key}, "
                                 f"which is {getattr(self, key)!r}: set {key} instead")
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def prenorm_residual_strategy(self) -> str | None:
        """The shared initialisation's name for `rescale_prenorm_residual` (LmlabPreTrainedModel._init_weights)."""
        return "rescale" if self.rescale_prenorm_residual else None


def _ordered_pair(pair: Any) -> bool:
    """Whether `pair` is two numbers, the first not above the second."""
    return isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair) and pair[0] <= pair[1]


def _differs(a: Any, b: Any) -> bool:
    """a != b, with lists and tuples alike (a config read from JSON holds lists)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    return a != b


class Mamba2Mixer(nn.Module, UsesKernels):
    """fla's Mamba2 layer (same parameter names and shapes). `conv1d` is lmlab's ShortConvolution, whose
    weight [conv_dim, 1, conv_kernel] and bias are nn.Conv1d's."""

    static_decoding = True  # a decoding step reads its fixed-size states and the new token only

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        hidden, H, N, G = config.hidden_size, config.num_heads, config.state_size, config.n_groups
        self.intermediate_size = int(config.expand * hidden)
        self.num_heads, self.head_dim, self.n_groups, self.state_size = H, config.head_dim, G, N
        self.conv_dim = self.intermediate_size + 2 * G * N
        self.layer_idx = layer_idx
        self.dt_limit = tuple(config.dt_limit)
        self.A_init, self.A_init_range = config.A_init, tuple(config.A_init_range)
        self.dt_init = (config.dt_min, config.dt_max, config.dt_init_floor)
        self.conv_init = config.conv_init
        self.in_proj = nn.Linear(hidden, self.intermediate_size + self.conv_dim + H, bias=config.use_bias)
        self.conv1d = ShortConvolution(self.conv_dim, config.conv_kernel, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(self.intermediate_size if config.D_has_hdim else H))
        self.A_log._no_weight_decay = self.D._no_weight_decay = self.dt_bias._no_weight_decay = True
        self.norm = GroupGatedRMSNorm(self.intermediate_size, config.norm_eps, self.intermediate_size // G,
                                      config.norm_before_gate) if config.rmsnorm else None
        self.out_proj = nn.Linear(self.intermediate_size, hidden, bias=config.use_bias)
        self.reset_special_parameters()

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        """A_log (A_init: the fork's A_h = h, or fla 0.6.0's U(A_init_range)), D = 1, dt_bias (fla's: dt ~
        logU(dt_min, dt_max) >= dt_init_floor) and, with conv_init, the conv weight ~ U(±conv_init). Parameters
        loaded from a checkpoint (flagged by transformers) are left alone."""
        if not getattr(self.A_log, "_is_hf_initialized", False):
            A = torch.arange(1, self.num_heads + 1, dtype=torch.float32) if self.A_init == "arange" else \
                torch.empty(self.num_heads).uniform_(*self.A_init_range)
            self.A_log.copy_(A.log())
        if not getattr(self.D, "_is_hf_initialized", False):
            self.D.fill_(1.0)
        init_dt_bias(self.dt_bias, *self.dt_init)
        if self.conv_init is not None and not getattr(self.conv1d.weight, "_is_hf_initialized", False):
            self.conv1d.weight.uniform_(-self.conv_init, self.conv_init)

    def forward(self, x: torch.Tensor, *, rotary: Rotary, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.state_size
        mask = padding_mask(attention_mask, T)
        state = cache[self.layer_idx] if cache is not None else {}
        z, xBC, dt = self.in_proj(x).split([self.intermediate_size, self.conv_dim, H], dim=-1)
        (xBC,) = zero_padding(mask, xBC)  # padding must not enter the conv state
        xBC, conv_state = self.conv1d(xBC, state.get("conv_state"), cache is not None, cu_seqlens)
        xs, B_, C_ = xBC.split([self.intermediate_size, G * N, G * N], dim=-1)
        xs = xs.view(B, T, H, P)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)  # [B, T, H]
        g = -self.A_log.float().exp() * dt
        k, q = (y.view(B, T, G, N).repeat_interleave(H // G, dim=2) for y in (B_, C_))
        v = (xs * dt[..., None]).to(xs.dtype)
        k, v, g = zero_padding(mask, k, v, g)
        y, ssm_state = simple_gla(q, k, v, g, scale=1.0, initial_state=state.get("recurrent_state"),
                                  output_final_state=cache is not None, cu_seqlens=cu_seqlens, backend=self.backend)
        if cache is not None:
            cache.update(self.layer_idx, recurrent_state=ssm_state, conv_state=conv_state)
        y = (y.float() + xs.float() * self.D.float().view(H, -1)).reshape(B, T, -1)  # D per head, or per channel
        if self.norm is not None:
            y = self.norm(y, z)
        else:
            y = y * F.silu(z.float())
        return self.out_proj(y.to(x.dtype))


class GroupGatedRMSNorm(nn.Module, UsesKernels):
    """fla's RMSNormGated (weight only): statistics over groups of `group_size` channels, the gate silu(z)
    applied before the norm (Mamba2's default) or after it (`norm_before_gate`)."""

    def __init__(self, hidden_size: int, eps: float, group_size: int, norm_before_gate: bool):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size))

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        if not getattr(self.weight, "_is_hf_initialized", False):
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return group_gated_rms_norm(x, gate, self.weight, self.eps, group_size=self.group_size,
                                    norm_before_gate=self.norm_before_gate, backend=self.backend)


class Mamba2PreTrainedModel(BackboneLayout, LmlabPreTrainedModel):
    config_class = Mamba2Config
    mixer_factory = Mamba2Mixer
    _no_split_modules = ["MambaBlock"]


class Mamba2Model(Mamba2PreTrainedModel, LmlabModel):
    def make_block(self, config: Mamba2Config, layer_idx: int) -> MambaBlock:
        return MambaBlock(config, self.make_mixer(config, layer_idx))


class Mamba2ForCausalLM(Mamba2PreTrainedModel, BackboneForCausalLM):
    model_class = Mamba2Model
