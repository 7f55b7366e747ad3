"""Local softmax attention: each query sees only the keys within a short range before it (the KV-memory of
the Hybrid Quadratic-Linear Transformer, HQLT).

Semantics (the reference, `local_attention_reference`, is the specification):
- q `[B, Tq, H, D]`, k and v `[B, Tk, H, D]`, Tq <= Tk: query i sits at key index t = Tk - Tq + i
  (decoding with a cache of Tk - Tq past keys);
- `q_positions [B or 1, Tq]`, `k_positions [B or 1, Tk]`: each token's position inside its own document
  (packed documents restart at 0, padding tokens are at 0); the last Tq key positions are the queries';
- the query at key index t sees the key at index s when 0 <= t - s < window and pos(t) - pos(s) == t - s:
  the last `window` tokens of its own document, itself included (the position test rules out keys of
  an earlier document and left padding, whose positions do not count up to the query's);
- `chunked=True` ("Delayed-Chunk"): also pos(s) // window == pos(t) // window, only the keys of the
  query's aligned chunk of `window` positions.
Every query sees at least itself.

Three implementations, none building [Tq, Tk] scores or masks:
- the PyTorch one, `local_attention_sdpa`: queries go in blocks of Q, each block against the Q + window - 1
  keys it can see at most (an unfold of the left-padded keys), all blocks in one SDPA call with a
  [Q, Q + window - 1] mask per block built from the positions. The work is T * (Q + window - 1) instead of
  T * Tk, the unfolded keys take (Q + window - 1) / Q times the keys' memory (saved for backward);
- on CUDA for windows <= 64 with as many queries as keys (training, prompts, scoring), the "triton"
  backend: lmlab's kernel over 64-token blocks (`local_attention_triton.py`);
- on CUDA inside torch.compile'd code (training's blocks) for longer windows, the "flex" backend: torch's
  FlexAttention over the 128 x 128 tiles a query tile can reach (a block mask from the sizes alone), the
  positions test evaluated inside the kernel; nothing copied or saved but q, k, v and the output.
Shapes depend only on the input's sizes (no host sync: torch.compile captures one graph for every
document layout).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from lmlab.kernels import dispatch
from lmlab.kernels.attention import scaled_dot_product_attention
from lmlab.kernels.local_attention_triton import local_attention_triton, triton_unfit_reason
from lmlab.kernels.recurrent_common import triton_health_check

OP = "local_attention"

# Queries per block: the window rounded up to a multiple of 16 (GPU attention kernels take queries in
# tiles), at most 256. Each query does Q + window - 1 keys' work, but smaller blocks are more, smaller
# problems with more unfolded keys: on an H100 (torch 2.11, bf16, 8 x 4096 tokens, 16 heads of 64, forward
# + backward) window 512 took 4.8 ms with Q = 256, 5.3 with 128, 7.6 with 64; window 64 took 3.2 ms with
# Q = 64, 4.2 with 32. Far above 256 the unfolded keys dominate: window 2048 took 11.1 ms and 3.2 GB with
# Q = 256, 10.5 ms and 1.8 GB with Q = 1024. (Causal flash attention over all 4096 tokens took 2.75 ms:
# below a few thousand tokens the masked SDPA kernel makes local attention no faster than full.)
_BLOCK_ALIGN = 16
_BLOCK_MAX = 256


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    window: int,
    chunked: bool = False,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Local attention output `[B, Tq, H, D]` in q's dtype; see the module docstring for the semantics."""
    _check_inputs(q, k, v, q_positions, k_positions, window)
    triton_unfit = triton_unfit_reason(q, k, window)
    name = dispatch.choose(OP, q, backend, unfit={} if triton_unfit is None else {"triton": triton_unfit})
    if name == "triton":
        return local_attention_triton(q, k, v, q_positions, k_positions, window=window, chunked=chunked,
                                      scale=scale)
    if name == "flex":
        # inside compiled code dynamo lowers flex_attention itself; called eagerly it needs its compiled form
        attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention
        return local_attention_flex(q, k, v, q_positions, k_positions, window=window, chunked=chunked,
                                    scale=scale, attend=attend)
    return local_attention_sdpa(q, k, v, q_positions, k_positions, window=window, chunked=chunked, scale=scale)


def local_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    window: int,
    chunked: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Blocked SDPA over unfolded keys (the PyTorch implementation; see the module docstring)."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    # One block when the queries are few (decoding): all the keys they can see, no padded queries.
    Q = min(Tq, _BLOCK_MAX, -(-window // _BLOCK_ALIGN) * _BLOCK_ALIGN)
    blocks = -(-Tq // Q)
    L = Q + window - 1  # keys per block
    # Keep the window - 1 keys before the first query (left-padded where the cache is shorter), then pad
    # the queries to whole blocks. Padding slots get position -window: they fail the position test
    # against every real token (positions >= 0), and a padded query sees only its own padded key.
    first = max(0, Tk - Tq - window + 1)
    left, right = window - 1 - (Tk - Tq - first), blocks * Q - Tq
    sentinel = -window
    q = F.pad(q, (0, 0, 0, 0, 0, right))
    k, v = (F.pad(t[:, first:], (0, 0, 0, 0, left, right)) for t in (k, v))
    q_pos = F.pad(q_positions, (0, right), value=sentinel).view(-1, blocks, Q, 1)
    k_pos = F.pad(k_positions[:, first:], (left, right), value=sentinel).unfold(1, L, Q).unsqueeze(2)
    # distance t - s between query r and key c of a block: query r is the block's key r + window - 1
    distance = torch.arange(Q, device=q.device)[:, None] + window - 1 - torch.arange(L, device=q.device)
    allowed = _allowed(q_pos, k_pos, distance, window, chunked)  # [B or 1, blocks, Q, L]
    allowed = allowed.expand(B, blocks, Q, L).reshape(B * blocks, 1, Q, L)

    q = q.view(B, blocks, Q, H, D).permute(0, 1, 3, 2, 4).reshape(B * blocks, H, Q, D)
    k, v = (t.unfold(1, L, Q).permute(0, 1, 2, 4, 3).reshape(B * blocks, H, L, D) for t in (k, v))
    o = scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return o.view(B, blocks, H, Q, D).transpose(2, 3).reshape(B, blocks * Q, H, D)[:, :Tq]


# FlexAttention's tile (its default sparse block size): the block mask says which key tiles each query tile
# visits; the positions test runs per element inside them. 64-token tiles (half the masked work at W = 64) do
# not compile on Hopper with torch 2.11: Inductor's only backward config there for head size 128 needs
# 128-token blocks (bench/RESULTS.md, fifteenth GPU session). fla 0.6.0's own sliding-window kernel
# (`parallel_attn(window_size=...)`, the same semantics for whole documents) is not a backend here: at the
# 340M layer's size it took 1.34 ms forward + backward against FlexAttention's 0.89 (sixteenth session).
# For windows <= 64 lmlab's Triton kernel (`local_attention_triton.py`) is auto's choice: at the 340M layer's
# size 0.61 ms forward + backward compiled against FlexAttention's 0.72 (nineteenth session, H100).
_FLEX_TILE = 128
_compiled_flex_attention = torch.compile(flex_attention)


def local_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    window: int,
    chunked: bool = False,
    scale: float | None = None,
    attend: Callable[..., torch.Tensor] = flex_attention,
) -> torch.Tensor:
    """FlexAttention over the key tiles within `window` of each query tile (`attend`: flex_attention or its
    compiled form; uncompiled it materialises the scores, which only tests may afford)."""
    B, Tq, Tk = q.shape[0], q.shape[1], k.shape[1]
    q_pos, k_pos = q_positions.expand(B, Tq), k_positions.expand(B, Tk)

    def mask_mod(b, h, query, key):
        return _allowed(q_pos[b, query], k_pos[b, key], query + (Tk - Tq) - key, window, chunked)

    o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=_window_tiles(
        Tq, Tk, window, mask_mod, q.device), scale=scale)
    return o.transpose(1, 2)


def _window_tiles(Tq: int, Tk: int, window: int, mask_mod, device: torch.device) -> BlockMask:
    """The key tiles a query tile can reach: key indices from its first query's t − window + 1 to its last
    query's t (query i at key index t = Tk − Tq + i); every tile partial, as documents may start anywhere."""
    tile = _FLEX_TILE
    query_tiles, key_tiles = -(-Tq // tile), -(-Tk // tile)
    first = torch.arange(query_tiles, device=device) * tile + (Tk - Tq)
    low = (first - window + 1).clamp_min(0) // tile
    high = (first + tile - 1).clamp_max(Tk - 1) // tile
    # FlexAttention wants one column per key tile; the entries past a row's count are ignored
    indices = (low[:, None] + torch.arange(key_tiles, device=device)).clamp_max(key_tiles - 1)
    return BlockMask.from_kv_blocks((high - low + 1).int()[None, None], indices.int()[None, None],
                                    BLOCK_SIZE=tile, mask_mod=mask_mod, seq_lengths=(Tq, Tk))


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    window: int,
    chunked: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit float32 scores, mask and softmax over all [Tq, Tk] pairs: the specification (small sizes
    only)."""
    _check_inputs(q, k, v, q_positions, k_positions, window)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    Tq, Tk = q.shape[1], k.shape[1]
    distance = torch.arange(Tk - Tq, Tk, device=q.device)[:, None] - torch.arange(Tk, device=q.device)
    allowed = _allowed(q_positions[:, :, None], k_positions[:, None, :], distance, window, chunked)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def _allowed(q_pos, k_pos, distance, window, chunked) -> torch.Tensor:
    """Whether each query sees each key, from their positions and the distance t - s between them."""
    allowed = (distance >= 0) & (distance < window) & (q_pos - k_pos == distance)
    if chunked:
        allowed = allowed & (q_pos // window == k_pos // window)
    return allowed


def _check_inputs(q, k, v, q_positions, k_positions, window) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q [B,Tq,H,D] and k, v [B,Tk,H,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"more queries ({q.shape[1]}) than keys ({k.shape[1]})")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B = q.shape[0]
    for name, positions, T in (("q_positions", q_positions, q.shape[1]),
                               ("k_positions", k_positions, k.shape[1])):
        if positions.dim() != 2 or positions.shape[0] not in (1, B) or positions.shape[1] != T:
            raise ValueError(f"{name} must be [B or 1, {T}] for B = {B}, got {tuple(positions.shape)}")
        if positions.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor, got {positions.dtype}")


# lmlab's kernel first where it fits (windows <= 64, as many queries as keys): faster than FlexAttention in
# training (H100, nineteenth GPU session), and it needs no compilation per input size, so eager calls
# (prompts, evaluation's scoring) take it too
dispatch.register_health_check(OP, triton_health_check, backend="triton")
# auto takes FlexAttention only inside compiled code: eager calls (evaluation, generation) would compile it
# anew for every input size, where the SDPA path needs no compilation
# (FlexAttention is a Triton kernel too, Inductor's: it needs only a CUDA input, as lmlab's)
dispatch.register_health_check(OP, triton_health_check, backend="flex", compiled_only=True)
