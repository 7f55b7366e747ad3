"""Training FLOPs per token by architecture, and the bf16 matmul peak of the device, for MFU.

flame used the Transformer formula 6·N + 12·L·H·d·ctx for every model, which over-counts linear models
(MFU > 100%). Here each layer counts what it computes, forward, then x3 for forward + backward:
- dense matmuls: 2 FLOPs per weight of every projection and of the LM head (embedding lookups are free);
- softmax attention: QKᵀ and AV, 2·2·d per (query, key) pair per head, over the keys a query really
  sees: (T+1)/2 on average with a causal mask, at most `window_size` with a sliding window;
- chunkwise linear recurrences (chunk C = 64): intra-chunk scores and values 2·C·(dk + dv), the
  inter-chunk read-out and state update 2·2·dk·dv, and for the delta rules the WY/UT correction
  (another 2·C·(dk + dv) + 2·dk·dv), per token and head; HGRN2 is GLA with dk = expand_ratio, GSA two
  such recurrences (keys -> M slots: dk = head dim, dv = M; slots -> values: dk = M, dv = head dim),
  Mamba2's SSD one with dk = state_size, dv = head_dim (its short convolution and gates are not counted);
- Mamba's selective scan (Mamba and Samba's Mamba layers), per token and channel: the causal conv
  (2 per tap) and, per state entry, 6 (discretise Δ·A and Δ·u·B, update the state, read it with C);
- hybrid_qlt layers: both memories: the local softmax attention over the keys a query sees (at most W =
  chunk_size in a sliding window, (W+1)/2 on average inside Delayed-Chunk's chunks) and the recurrence
  (the delta rule, or plain linear attention in sync_chunk_linear mode).
"""
from __future__ import annotations

import functools
import json

import torch
from transformers import PretrainedConfig

CHUNK = 64
RECURRENT_ONLY = ("mamba", "mamba2")  # families with neither softmax attention nor fla's hybrid `attn` key


def _linear_weights(config: PretrainedConfig) -> int:
    """Weights of all matmuls (projections, MLPs, LM head), counted by building the model on 'meta'."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel()
    embeddings = model.get_output_embeddings()
    if embeddings is not None and not isinstance(embeddings, torch.nn.Linear):
        total += embeddings.weight.numel()
    return total


def _attention_layers(config: PretrainedConfig) -> tuple[set[int], int, int, int | None]:
    """(layer indices using softmax attention, heads, head dim, window) of a config."""
    layers = config.num_hidden_layers
    if config.model_type in RECURRENT_ONLY:
        return set(), 0, 0, None
    if config.model_type == "transformer" or not hasattr(config, "attn"):
        heads = getattr(config, "num_heads", None) or getattr(config, "num_attention_heads")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return set(range(layers)), heads, head_dim, getattr(config, "window_size", None)
    attn = config.attn
    if not attn:
        return set(), 0, 0, None
    spec = attn[0] if isinstance(attn, list) else attn
    heads = spec["num_heads"]
    return set(spec["layers"]), heads, config.hidden_size // heads, spec.get("window_size")


def _recurrences(config: PretrainedConfig) -> list[tuple[int, int, int, bool]]:
    """(heads, key dim per head, value dim per head, uses the delta rule) of each chunkwise recurrence of a
    linear-attention layer: one, or GSA's two passes (keys -> slots, then slots -> values)."""
    h = config.hidden_size
    if config.model_type == "mamba2":  # simple GLA, whose keys and queries are B and C
        return [(config.num_heads, config.state_size, config.head_dim, False)]
    if config.model_type == "gated_deltanet":
        heads = getattr(config, "num_v_heads", None) or config.num_heads
        return [(heads, config.head_dim, int(config.head_dim * config.expand_v), True)]
    if config.model_type == "hgrn2":  # GLA with key dim expand_ratio
        return [(config.num_heads, config.expand_ratio, h // config.num_heads, False)]
    heads = config.num_heads
    key_dim = int(h * getattr(config, "expand_k", 1.0))
    value_dim = int(h * getattr(config, "expand_v", 1.0))
    if config.model_type == "gsa":
        slots = config.num_slots or key_dim // heads
        return [(heads, key_dim // heads, slots, False), (heads, slots, value_dim // heads, False)]
    delta = config.model_type == "delta_net" or (config.model_type == "hybrid_qlt"
                                                 and config.attn_mode != "sync_chunk_linear")
    return [(heads, key_dim // heads, value_dim // heads, delta)]


def _local_keys_seen(config: PretrainedConfig, seq_len: int) -> float:
    """Keys an average query of a hybrid_qlt layer's local attention sees (0 for other families)."""
    if config.model_type != "hybrid_qlt":
        return 0.0
    W = config.chunk_size
    if config.attn_mode == "chunk":  # a query sees its chunk so far
        return (min(W, seq_len) + 1) / 2
    return min(W, (seq_len + 1) / 2)


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`."""
    # json.dumps keeps inf (Mamba2's dt_limit) as Infinity, which json.loads reads back; to_json_string tags it
    return _flops_per_token(json.dumps(config.to_dict(), sort_keys=True), seq_len)


@functools.lru_cache(maxsize=None)
def _flops_per_token(config_json: str, seq_len: int) -> float:
    from transformers import AutoConfig

    values = json.loads(config_json)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    forward = 2.0 * _linear_weights(config)
    attn_layers, heads, head_dim, window = _attention_layers(config)
    keys_seen = (seq_len + 1) / 2 if window is None else min(window, (seq_len + 1) / 2)
    forward += len(attn_layers) * heads * 4.0 * head_dim * keys_seen
    recurrent_layers = config.num_hidden_layers - len(attn_layers)
    if config.model_type in ("mamba", "samba"):
        forward += recurrent_layers * config.intermediate_size * (2.0 * config.conv_kernel + 6.0 * config.state_size)
    elif recurrent_layers:
        for rheads, dk, dv, delta in _recurrences(config):
            per_head = 2.0 * CHUNK * (dk + dv) + 4.0 * dk * dv
            if delta:
                per_head += 2.0 * CHUNK * (dk + dv) + 2.0 * dk * dv
            forward += recurrent_layers * rheads * per_head
            forward += recurrent_layers * rheads * 2.0 * (dk + dv) * _local_keys_seen(config, seq_len)
    return 3.0 * forward


def dense_flops_per_token(n_params: int) -> float:
    """The plain 6·N estimate, printed beside the architecture-aware figure."""
    return 6.0 * n_params


@functools.lru_cache(maxsize=None)
def _measured_peak(device_index: int) -> float:
    n = 8192
    a = torch.randn(n, n, device=f"cuda:{device_index}", dtype=torch.bfloat16)
    b = torch.randn(n, n, device=f"cuda:{device_index}", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    iters = 20
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2.0 * n**3 * iters / (start.elapsed_time(end) / 1e3)


def peak_flops(device: torch.device) -> float | None:
    """Measured bf16 dense matmul FLOP/s of a CUDA device (None on CPU: MFU is not reported there)."""
    if device.type != "cuda":
        return None
    return _measured_peak(device.index or 0)
