"""Softmax attention: causal / sliding-window / packed documents (varlen) / padded batches, with GQA.

Semantics (the reference, `attention_reference`, is the specification):
- q `[B, Tq, H, D]`, k and v `[B, Tk, Hkv, D]` with H % Hkv == 0 (grouped-query attention);
- Tq <= Tk: query i sits at absolute position Tk - Tq + i (decoding with a KV cache);
- causal: a query sees keys at positions <= its own; `window_size=w` (implies causal): only the last w
  of them, itself included (flash-attn's window (w-1, 0), as in fla's Attention);
- `cu_seqlens` (int32 `[N+1]`, Tq == Tk): packed documents over the B*T tokens of the B rows one after
  the other; every row start is a document start (the data pipeline's guarantee, checked on the device);
  no query sees a key of another document;
- `attention_mask [B, Tk]` (1 = token, 0 = padding): padding keys are never seen; a query that sees no
  key at all (a padding query under left padding) outputs zeros.

Backends: "torch" is PyTorch's scaled_dot_product_attention (any device); "flash" is flash-attn on CUDA,
when installed (it is preferred then). flex_attention was tried and left out: on an H200 (torch 2.11,
bf16, 8 x 2048 tokens, 16 heads of 64, forward+backward) it took 1.55 ms for causal attention where SDPA
took 0.88 ms, was no faster for packed documents, and building its block mask cost ~4 ms per call;
outside torch.compile it also materialises all [N, N] scores.
Packed documents on SDPA (`_sdpa_packed`) never read `cu_seqlens` on the host, so torch.compile captures
one graph for every document layout: each row's queries go in blocks, each block against the keys of its
row it can see (all earlier ones, or the window's) with a mask to the query's document. Masks are
[block, keys], never [N, N]; the work is causal attention's within each row, so callers pass the rows
they have (the models pass the batch's [B, T] rows, not one [1, B*T] row).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmlab.kernels import dispatch
from lmlab.kernels.documents import document_index

# Dispatch keys: flash-attn runs calls without a padding mask; padded batches (evaluation) use SDPA.
_OP = "attention"
_OP_PADDED = "attention.padded"
# Queries per SDPA call with packed documents: masks are [block, keys], never [N, N]. Small blocks waste
# little work above the diagonal; long inputs get bigger ones, so that calls stay few (launches on GPU).
_PACKED_BLOCK = 256
_PACKED_MAX_CALLS = 16
# Looked up once: health checks run inside torch.compile'd code, which cannot trace importlib.
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention output `[B, Tq, H, D]` in q's dtype; see the module docstring for the semantics."""
    _check_inputs(q, k, v, window_size, cu_seqlens, attention_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if causal and window_size is not None and window_size >= k.shape[1]:
        # every key a query may see is inside its window: plain causal attention, whose SDPA call needs no
        # mask (Samba's 2048-token windows at training's 2048-token rows)
        window_size = None
    if dispatch.choose(_OP if attention_mask is None else _OP_PADDED, q, backend) == "flash":
        return _flash_attention(q, k, v, causal, window_size, cu_seqlens, scale)
    return _sdpa_attention(q, k, v, causal, window_size, cu_seqlens, attention_mask, scale)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit float32 scores, masks and softmax: the specification (small sizes only)."""
    _check_inputs(q, k, v, window_size, cu_seqlens, attention_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[2] // k.shape[2]
    k = k.float().repeat_interleave(groups, dim=2)
    v = v.float().repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    doc_ids = None if cu_seqlens is None else _document_ids(cu_seqlens, k.shape[:2])
    allowed = _allowed(*_positions(q.shape[1], k.shape[1], q.device), causal, window_size, doc_ids,
                       attention_mask)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = torch.where(allowed.any(-1, keepdim=True), probs, 0)  # rows with no key: zeros, not NaN
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).to(q.dtype)


def _check_inputs(q, k, v, window_size, cu_seqlens, attention_mask) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q [B,Tq,H,D] and k, v [B,Tk,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"more queries ({q.shape[1]}) than keys ({k.shape[1]})")
    if window_size is not None and window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if cu_seqlens is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError("cu_seqlens needs packed inputs: as many queries as keys")
        if attention_mask is not None:
            raise ValueError("cu_seqlens and attention_mask cannot be combined")
    if attention_mask is not None and attention_mask.shape != k.shape[:2]:
        raise ValueError(f"attention_mask must be [B, Tk] = {tuple(k.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")


def _document_ids(cu_seqlens: torch.Tensor, rows: torch.Size) -> torch.Tensor:
    """The document index of each packed token, [B, T] for B rows of T tokens."""
    B, T = rows
    doc_ids = document_index(cu_seqlens, torch.arange(B * T, device=cu_seqlens.device)).view(B, T)
    # a document crossing rows would be cut there silently: check on the device (no host sync)
    torch._assert_async((doc_ids[1:, 0] != doc_ids[:-1, -1]).all(), "a document crosses a row of cu_seqlens")
    return doc_ids


def _positions(Tq: int, Tk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the queries (aligned to the last Tq keys) and of the keys."""
    return torch.arange(Tk - Tq, Tk, device=device), torch.arange(Tk, device=device)


def _allowed(q_pos, k_pos, causal, window_size, doc_ids=None, attention_mask=None) -> torch.Tensor | None:
    """Boolean [B or 1, 1, Tq, Tk]: which keys (at positions k_pos) each query (at q_pos) may see; None
    when it sees all of them.

    doc_ids: [B, Tk] document index per position (packed documents, Tq == Tk); attention_mask: [B, Tk]."""
    q_pos, k_pos = q_pos[:, None], k_pos[None, :]
    allowed = None
    if causal or window_size is not None:
        allowed = k_pos <= q_pos
    if window_size is not None:
        allowed = allowed & (k_pos > q_pos - window_size)
    if allowed is not None:
        allowed = allowed[None, None]
    if doc_ids is not None:
        same_doc = (doc_ids[:, q_pos] == doc_ids[:, k_pos])[:, None]
        allowed = same_doc if allowed is None else allowed & same_doc
    if attention_mask is not None:
        is_token = attention_mask.bool()[:, None, None, :]
        allowed = is_token if allowed is None else allowed & is_token
    return allowed


def _sdpa_attention(q, k, v, causal, window_size, cu_seqlens, attention_mask, scale):
    Tq, Tk = q.shape[1], k.shape[1]
    if cu_seqlens is not None:
        return _sdpa_packed(q, k, v, causal, window_size, cu_seqlens, scale)
    if causal and Tq == Tk and window_size is None and attention_mask is None:
        return _sdpa(q, k, v, None, True, scale)  # the fast path: no mask tensor at all
    allowed = _allowed(*_positions(Tq, Tk, q.device), causal, window_size)
    if attention_mask is None:
        return _sdpa(q, k, v, allowed, False, scale)
    bias = _padding_bias(allowed, attention_mask, q.dtype)
    # a query that sees no key (padding, under left padding) outputs zeros (and so gets no gradient)
    has_key = bias.amax(-1, keepdim=True) == 0
    return _sdpa(q, k, v, bias, False, scale).masked_fill(~has_key.transpose(1, 2), 0)


def _padding_bias(allowed: torch.Tensor | None, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [B, 1, Tq or 1, Tk] of a padded batch: 0 where a query may see a key (`allowed`,
    and a token), else the dtype's lowest finite value, not -inf: a query that sees no key then averages
    its keys instead of giving NaN, and every other query's output is the same, since exp of that bias
    underflows to 0. Built in one op from the [B, Tk] and [Tq, Tk] masks, it saves the boolean mask's
    passes (and, any, or) and SDPA's conversion of it: on CPU a call on 64 left-padded prompts of up to
    1,000 tokens took 0.57 s against 0.73 s (evaluation's prefill of long prompts)."""
    lowest = torch.finfo(dtype).min
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill_(attention_mask == 0, lowest)[:, None, None, :]
    return bias if allowed is None else torch.where(allowed, bias, lowest)


def _sdpa_packed(q, k, v, causal, window_size, cu_seqlens, scale):
    """Packed documents (see the module docstring); every query sees at least itself."""
    T = q.shape[1]
    doc_ids = _document_ids(cu_seqlens, q.shape[:2])
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)  # once, not per block
    positions = torch.arange(T, device=q.device)
    block = max(_PACKED_BLOCK, -(-T // _PACKED_MAX_CALLS))
    outputs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        first = 0 if window_size is None else max(0, start - window_size + 1)
        last = end if causal or window_size is not None else T
        allowed = _allowed(positions[start:end], positions[first:last], causal, window_size, doc_ids)
        outputs.append(_sdpa(q[:, start:end], k[:, first:last], v[:, first:last], allowed, False, scale))
    return torch.cat(outputs, dim=1)


def _sdpa(q, k, v, mask, is_causal, scale):
    """SDPA on [B, T, H, D] tensors (`mask`: boolean, or additive in q's dtype); GQA natively without a mask, by repeating k, v with one."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and mask is not None:
        # The memory-efficient kernel (the one taking a mask) has no GQA; enable_gqa would fall back to math.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    o = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                     enable_gqa=groups > 1 and mask is None)
    return o.transpose(1, 2)


# cuDNN's attention builds an execution plan for every new input shape (a few hundred ms each, as cuDNN's
# users report), and evaluation's batches change shape at nearly every call: without gradients, lmlab's
# SDPA calls on CUDA leave cuDNN out. Training's fixed shapes keep it.
_BACKENDS_WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on [B, H, T, D] tensors, without cuDNN's kernel in inference on CUDA."""
    if torch.is_grad_enabled() or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(_BACKENDS_WITHOUT_CUDNN):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _flash_attention(q, k, v, causal, window_size, cu_seqlens, scale):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    # flash-attn aligns causal masks to the bottom-right (query i at Tk - Tq + i), as we do.
    window = (-1, -1) if window_size is None else (window_size - 1, 0)
    causal = causal or window_size is not None
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window)
    cu_seqlens = cu_seqlens.to(torch.int32)
    max_len = int(cu_seqlens.diff().max())
    o = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens,
                               max_len, max_len, softmax_scale=scale, causal=causal, window_size=window)
    return o.view(q.shape)


def _flash_unavailable(q: torch.Tensor) -> str | None:
    if not q.is_cuda:
        return "input is not on a CUDA device"
    if not _HAS_FLASH_ATTN:
        return "flash-attn is not installed"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] > 256:
        return f"flash-attn supports head dims up to 256, got {q.shape[-1]}"
    return None


dispatch.register_health_check(_OP, _flash_unavailable, backend="flash")
