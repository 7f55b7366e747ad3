"""Hybrid Quadratic-Linear Transformer (`hybrid_qlt`; Irie, Yau, Gershman, arXiv 2506.00744): two memories
and a mixer in every layer.

- KV-memory: softmax attention over a short local range of W = `chunk_size` tokens (queries and keys as
  projected, rotary with `use_local_pos_encoding`): a sliding window (token t sees t−W+1 … t), or in
  Delayed-Chunk mode only the tokens of t's aligned chunk of W positions.
- FW-memory (fast weights): the delta rule over q̂ = l2norm(silu(q)), k̂ = l2norm(silu(k)), or linear
  attention with elu+1 features.
- Mixer: a sigmoid gate per value channel, two gates, two dynamic scalars per head, two learned scalars,
  or a plain sum; then the per-head output norm (gated with `use_gate`) and `o_proj`.

The four `attn_mode`s of the paper's fork (the paper's names in brackets) say what the FW-memory sees:
  sync_chunk         [Synchronous]          the delta rule over every token up to t
  delayed            [Delayed-Streaming]    the delta rule fed the token W steps back
  chunk              [Delayed-Chunk]        the state at the start of t's chunk (chunks of W positions)
  sync_chunk_linear  [Synchronous, linear]  linear attention over every token up to t
Two numerical quirks of the fork are kept by default, so that its checkpoints compute what they computed
there; a config key selects the corrected variant of each:
  delayed_beta           "current" (fork): Delayed-Streaming writes key t−W with the β of token t;
                         "delayed": with its own β
  linear_attn_normalizer "heads" (fork): the normaliser sums φ(k) cumulatively over the heads at the
                         same position; "time": over the tokens so far (linear attention's definition)
Every "where" (window, delay, chunk grid) is computed from token positions (real tokens since the
document's start), so packed documents, left padding and a decoding cache all restart or continue them
correctly, which the fork does not do.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.kernels.delta_rule import delta_rule
from lmlab.kernels.delta_rule_chunk_read import delta_rule_chunk_read
from lmlab.kernels.local_attention import local_attention
from lmlab.kernels.simple_gla import simple_gla
from lmlab.models.blocks import (
    HybridConfig,
    LmlabForCausalLM,
    LmlabModel,
    LmlabPreTrainedModel,
    Rotary,
    ShortConvolution,
    GatedRMSNorm,
    RMSNorm,
    UsesKernels,
    apply_rotary,
    delta_mixer_output,
    l2_norm,
    padding_mask,
    project_qkv,
    zero_padding,
)
from lmlab.models.cache import Cache

ATTN_MODES = ("sync_chunk", "delayed", "chunk", "sync_chunk_linear")
ROPE_THETA = 10000.0  # fixed in the fork


class HybridQLTConfig(HybridConfig):
    """The fork's HybridQLTConfig: same keys and the same (unusual) defaults: allow_neg_eigval, use_gate and
    use_short_conv true, qk_activation "silu" (which the layer refuses: configs must say "identity").

    Accepted and ignored, as in the fork: head_dim (the head size is hidden_size · expand_k / num_heads),
    use_output_norm, max_position_embeddings, norm_first (the paper's 340M files carry it). lmlab's own keys:
    `delayed_beta`, `linear_attn_normalizer` (module docstring) and the shared `prenorm_residual_strategy`
    ("rescale", as the fork initialises).
    """

    model_type = "hybrid_qlt"
    extra_keys = ("norm_first",)

    def __init__(
        self,
        attn_mode: str = "chunk",
        expand_k: float = 1,
        expand_v: float = 1,
        use_gate: bool = True,
        use_beta: bool = True,
        allow_neg_eigval: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        chunk_size: int = 64,
        use_forgetting_gate: bool = False,
        use_local_pos_encoding: bool = False,
        use_memory_gate: bool = False,
        use_memory_scaler: bool = False,
        use_memory_gate_separate: bool = False,
        use_memory_dynamic_scaler: bool = False,
        qk_norm: str = "l2",
        qk_activation: str = "silu",
        use_output_norm: bool = True,
        head_dim: int = 256,
        num_heads: int = 6,
        delayed_beta: str = "current",
        linear_attn_normalizer: str = "heads",
        **kwargs,
    ):
        problem = _config_problem(attn_mode, chunk_size, qk_norm, use_forgetting_gate,
                                  use_memory_gate, use_memory_gate_separate, use_memory_scaler,
                                  use_memory_dynamic_scaler, delayed_beta, linear_attn_normalizer)
        if problem:
            raise ValueError(f"hybrid_qlt config: {problem}")
        self.attn_mode = attn_mode
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.use_beta = use_beta
        self.allow_neg_eigval = allow_neg_eigval
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.chunk_size = chunk_size
        self.use_forgetting_gate = use_forgetting_gate
        self.use_local_pos_encoding = use_local_pos_encoding
        self.use_memory_gate = use_memory_gate
        self.use_memory_scaler = use_memory_scaler
        self.use_memory_gate_separate = use_memory_gate_separate
        self.use_memory_dynamic_scaler = use_memory_dynamic_scaler
        self.qk_norm = qk_norm
        self.qk_activation = qk_activation
        self.use_output_norm = use_output_norm
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.delayed_beta = delayed_beta
        self.linear_attn_normalizer = linear_attn_normalizer
        super().__init__(**kwargs)


def _config_problem(attn_mode, chunk_size, qk_norm, use_forgetting_gate, use_memory_gate,
                    use_memory_gate_separate, use_memory_scaler, use_memory_dynamic_scaler, delayed_beta,
                    linear_attn_normalizer) -> str | None:
    """What is wrong with these values, in one line, or None."""
    if attn_mode not in ATTN_MODES:
        return f"attn_mode must be one of {', '.join(ATTN_MODES)}; got {attn_mode!r}"
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        return f"chunk_size (the local attention's window) must be a positive integer; got {chunk_size!r}"
    if qk_norm not in ("l2", "sum"):
        return f"qk_norm must be 'l2' or 'sum'; got {qk_norm!r}"
    if use_forgetting_gate:
        return "use_forgetting_gate is not implemented (the paper's code accepts it and ignores it)"
    if use_memory_gate_separate and not use_memory_gate:
        return "use_memory_gate_separate needs use_memory_gate"
    mixers = [name for name, on in (("use_memory_gate", use_memory_gate), ("use_memory_scaler", use_memory_scaler),
                                    ("use_memory_dynamic_scaler", use_memory_dynamic_scaler)) if on]
    if len(mixers) > 1:
        return f"{' and '.join(mixers)} are exclusive: choose one way to mix the two memories"
    if delayed_beta not in ("current", "delayed"):
        return f"delayed_beta must be 'current' (the paper's code) or 'delayed'; got {delayed_beta!r}"
    if linear_attn_normalizer not in ("heads", "time"):
        return f"linear_attn_normalizer must be 'heads' (the paper's code) or 'time'; got {linear_attn_normalizer!r}"
    return None


class HybridQLT(nn.Module, UsesKernels):
    """The fork's HybridQLT layer (same parameter names and shapes)."""

    # A decoding step reads its states and the new token's position (the model's `positions`); its window
    # keeps a fixed size once full, and its delay line always does.
    static_decoding = True

    def __init__(self, config: HybridQLTConfig, layer_idx: int):
        super().__init__()
        # Checked here, not in the config: the config's own default is "silu" (the fork's), and transformers
        # builds a default config whenever it prints or saves one.
        if config.qk_activation != "identity":
            raise ValueError(f"hybrid_qlt config: qk_activation must be 'identity' (silu is applied inside the "
                             f"FW-memory, as in the paper's code); got {config.qk_activation!r}")
        hidden, H = config.hidden_size, config.num_heads
        self.key_dim, self.value_dim = int(hidden * config.expand_k), int(hidden * config.expand_v)
        if self.key_dim % H or self.value_dim % H:
            raise ValueError(f"hidden_size * expand_k ({self.key_dim}) and * expand_v ({self.value_dim}) must be "
                             f"multiples of num_heads ({H})")
        self.num_heads, self.head_k_dim, self.head_v_dim = H, self.key_dim // H, self.value_dim // H
        self.layer_idx, self.mode, self.window = layer_idx, config.attn_mode, config.chunk_size
        self.qk_norm, self.use_beta, self.allow_neg_eigval = config.qk_norm, config.use_beta, config.allow_neg_eigval
        self.use_gate, self.use_short_conv = config.use_gate, config.use_short_conv
        self.delayed_beta, self.linear_attn_normalizer = config.delayed_beta, config.linear_attn_normalizer
        self.rotary_key = (self.head_k_dim, ROPE_THETA) if config.use_local_pos_encoding else None

        self.q_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.value_dim, bias=False)
        if self.use_beta:
            self.b_proj = nn.Linear(hidden, H, bias=False)
        if self.use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, config.conv_size, activation=None)
            self.k_conv1d = ShortConvolution(self.key_dim, config.conv_size, activation=None)
            self.v_conv1d = ShortConvolution(self.value_dim, config.conv_size)
        self.mixing = ("gate" if config.use_memory_gate else "dynamic_scaler" if config.use_memory_dynamic_scaler
                       else "scaler" if config.use_memory_scaler else "sum")
        if config.use_memory_gate:
            self.num_gates = 2 if config.use_memory_gate_separate else 1
            self.memory_gate_proj = nn.Linear(hidden, self.value_dim * self.num_gates, bias=False)
        if config.use_memory_dynamic_scaler:
            self.memory_mixer = nn.Linear(hidden, 2 * H, bias=False)
        if config.use_memory_scaler:
            self.fw_scale = nn.Parameter(torch.ones(1))
            self.kv_scale = nn.Parameter(torch.ones(1))
        if self.use_gate:
            self.g_proj = nn.Linear(hidden, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, config.norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def reset_special_parameters(self) -> None:
        if self.mixing == "scaler":
            nn.init.ones_(self.fw_scale)
            nn.init.ones_(self.kv_scale)

    def forward(self, x: torch.Tensor, *, rotary: Rotary, positions: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: Cache | None = None) -> torch.Tensor:
        """`positions` [B or 1, T]: the tokens' positions (HybridQLTModel.mixer_inputs)."""
        B, T, _ = x.shape
        mask = padding_mask(attention_mask, T)
        (x,) = zero_padding(mask, x)  # padding must not enter the short-conv states
        state = cache[self.layer_idx] if cache is not None else {}
        q, k, v, conv_state = project_qkv(self, x, state.get("conv_state"), cache is not None, cu_seqlens)
        if not self.use_short_conv:
            v = F.silu(v)  # what the v convolution's activation would do
        q, k = q.view(B, T, -1, self.head_k_dim), k.view(B, T, -1, self.head_k_dim)
        v = v.view(B, T, -1, self.head_v_dim)
        if self.qk_norm == "sum":  # both memories see it; no epsilon, as in the fork
            q, k = q / q.sum(-1, keepdim=True), k / k.sum(-1, keepdim=True)
        beta = self.b_proj(x).sigmoid() if self.use_beta else q.new_ones(B, T, self.num_heads)
        if self.allow_neg_eigval:
            beta = beta * 2
        q, k, v, beta = zero_padding(mask, q, k, v, beta)

        o_kv = self.kv_memory(q, k, v, positions, rotary, cache)
        o_fw, fw_states = self.fw_memory(q, k, v, beta, positions, mask, cu_seqlens, state, cache is not None)
        if cache is not None:
            cache.update(self.layer_idx, conv_state=conv_state, **fw_states)
        return delta_mixer_output(self, self.mix(o_fw, o_kv, x), x, None, None, None)

    def kv_memory(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  rotary: Rotary, cache: Cache | None) -> torch.Tensor:
        """Local softmax attention; the cache keeps the last W − 1 (rotated) keys, values and positions."""
        if self.rotary_key is not None:
            cos, sin = rotary[self.rotary_key]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_positions = positions.expand(q.shape[0], -1)
        if cache is not None:
            k, v, k_positions = cache.append(self.layer_idx, "attention", (k, v, k_positions), self.window - 1)
        return local_attention(q, k, v, positions, k_positions, window=self.window, chunked=self.mode == "chunk",
                               backend=self.backend)

    def fw_memory(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                  positions: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                  state: dict, keep: bool) -> tuple[torch.Tensor, dict]:
        """The fast-weight memory's output, and (with `keep`) its new decoding states."""
        B, T = q.shape[:2]
        h0, positions = state.get("recurrent_state"), positions.expand(B, -1)
        if self.mode == "sync_chunk_linear":
            return self.linear_memory(q, k, v, mask, cu_seqlens, h0, keep)
        if self.mode == "chunk" and self.qk_norm == "sum":
            q_fw, k_fw = q, k  # the fork's Delayed-Chunk kernel applies silu only with its l2 norm
        else:
            q_fw, k_fw = F.silu(q), F.silu(k)
        if self.qk_norm == "l2":
            q_fw, k_fw = l2_norm(q_fw), l2_norm(k_fw)
        if self.mode == "chunk":
            # without padding or a cache, positions count from each row's (or document's) start: the kernel
            # may then use a grid of its own (fla's chunks)
            chunk_positions = None if mask is None and not keep else positions
            o, h, read_state = delta_rule_chunk_read(
                q_fw, k_fw, v, beta, chunk_positions, chunk_size=self.window, initial_state=h0,
                initial_read_state=state.get("read_state"), output_final_state=keep, cu_seqlens=cu_seqlens,
                backend=self.backend)
            return o, dict(recurrent_state=h, read_state=read_state) if keep else {}
        states = {}
        if self.mode == "delayed":
            (k_fw, v, delayed_beta), states["delay"] = self.delay((k_fw, v, beta), positions, state.get("delay"))
            if self.delayed_beta == "delayed":
                beta = delayed_beta
        o, states["recurrent_state"] = delta_rule(q_fw, k_fw, v, beta, initial_state=h0, output_final_state=keep,
                                                  cu_seqlens=cu_seqlens, backend=self.backend)
        return o, states if keep else {}

    def delay(self, tensors: tuple[torch.Tensor, ...], positions: torch.Tensor,
              past: tuple[torch.Tensor, ...] | None) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """Delayed-Streaming's feed: each [B, T, ...] tensor shifted W steps later, zero where the token W
        steps back is not in the same document (position < W); and the last W steps, for the cache."""
        W, T = self.window, tensors[0].shape[1]
        past = past or tuple(x.new_zeros(x.shape[0], W, *x.shape[2:]) for x in tensors)
        joined = [torch.cat([old, x], dim=1) for old, x in zip(past, tensors)]
        return zero_padding(positions >= W, *(x[:, :T] for x in joined)), tuple(x[:, -W:] for x in joined)

    def linear_memory(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None, h0: torch.Tensor | None,
                      keep: bool) -> tuple[torch.Tensor, dict]:
        """Linear attention with φ(x) = elu(x) + 1, normalised as `linear_attn_normalizer` says."""
        phi_q, phi_k = zero_padding(mask, F.elu(q) + 1, F.elu(k) + 1)  # φ(0) = 1: padding must stay out
        scale = self.head_k_dim ** -0.5
        over_time = self.linear_attn_normalizer == "time"
        if over_time:  # a column of ones: the same recurrence then also sums φ(k) over time
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        # no decay: simple GLA with log-decay 0 (one per head; GLA's per-channel decays would cost its
        # heavier intra-chunk kernels for nothing)
        no_decay = phi_k.new_zeros(phi_k.shape[:3], dtype=torch.float32)
        o, h = simple_gla(phi_q, phi_k, v, no_decay, scale=scale, initial_state=h0, output_final_state=keep,
                          cu_seqlens=cu_seqlens, backend=self.backend)
        if over_time:
            o, z = o[..., :-1], o[..., -1:]
        else:
            z = (scale * phi_q * phi_k.cumsum(2)).sum(-1, keepdim=True)
        return o / (z + 1e-10), dict(recurrent_state=h) if keep else {}

    def mix(self, o_fw: torch.Tensor, o_kv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        if self.mixing == "gate":
            # per head: [gate of the FW-memory, gate of the KV-memory] (the fork's layout)
            g = self.memory_gate_proj(x).view(B, T, self.num_heads, -1).sigmoid()
            if self.num_gates == 1:
                return g * o_fw + (1 - g) * o_kv
            g_fw, g_kv = g.split(self.head_v_dim, dim=-1)
            return g_fw * o_fw + g_kv * o_kv
        if self.mixing == "dynamic_scaler":
            s_fw, s_kv = self.memory_mixer(x).sigmoid()[..., None].split(self.num_heads, dim=2)
            return s_fw * o_fw + s_kv * o_kv
        if self.mixing == "scaler":
            return self.fw_scale * o_fw + self.kv_scale * o_kv
        return o_fw + o_kv


class HybridQLTPreTrainedModel(LmlabPreTrainedModel):
    config_class = HybridQLTConfig
    mixer_factory = HybridQLT


class HybridQLTModel(HybridQLTPreTrainedModel, LmlabModel):
    def mixer_inputs(self, positions: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The token positions, for every HQLT layer (its windows, delays and chunks); none for hybrid
        attention layers."""
        return [{"positions": positions} if isinstance(layer.attn, HybridQLT) else {} for layer in self.layers]


class HybridQLTForCausalLM(HybridQLTPreTrainedModel, LmlabForCausalLM):
    model_class = HybridQLTModel
