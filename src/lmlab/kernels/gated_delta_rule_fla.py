"""fla's chunked gated delta rule with its one Hopper-broken backward kernel replaced by lmlab's own.

On Hopper GPUs, triton 3.4 - 3.7.0 miscompiles fla's `chunk_bwd_kernel_dqkwg` when a gate is present
(fla issue #640: a transpose of a matmul result), and fla 0.6.0 then refuses the whole gated delta rule
backward. Every other kernel of that backward is sound (the delta rule runs the same `dqkwg` kernel
without a gate, and passes on Hopper). So this module runs fla's forward and fla's backward kernels
unchanged, except `dqkwg`: `dqkwg_triton` is lmlab's kernel for that step, written without the
transpose; `dqkwg_torch` is its PyTorch twin and specification (batched matmuls over all chunks at once:
that step only reads the chunk states fla's backward already produced). Gated DeltaNet thus trains on
fla's kernels on Hopper instead of on lmlab's much slower all-PyTorch chunk kernel.

`forward` and `backward` are the gated delta rule's family of `fla_chunk`'s custom ops. Imported only when
fla's kernels are used; fla is required here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local
from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd
from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
from fla.ops.utils import chunk_local_cumsum

from lmlab.kernels.recurrent_common import triton_version

CHUNK_SIZE = 64  # fla's default for the gated delta rule; every kernel below assumes the same
DQKWG_BLOCK_K = 64  # key dims per program of `_dqkwg_kernel`
DQKWG_BLOCK_V = 64  # value dims per step of its loop
# fla issue #640: the triton versions that miscompile fla's gated dqkwg kernel on Hopper. lmlab's kernel is
# exact on any GPU, so the version alone decides.
TRITON_BREAKS_HOPPER_BACKWARD = triton_version() < (3, 7, 1)


def chunk_positions(
    batch: int, length: int, chunk_indices: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    chunk_size: int, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token positions of fla's chunks in the flattened [batch * length] stream, in fla's chunk order:
    (positions [N, C] (clamped into range), valid [N, C] (inside the chunk's sequence), last [N] (the
    chunk's last valid position)). Without cu_seqlens each row is one sequence; with them (batch 1) the
    chunks are those of `chunk_indices` ([N, 2]: sequence, chunk within the sequence)."""
    if cu_seqlens is None:
        n_chunks = -(-length // chunk_size)
        rows = torch.arange(batch, device=device).repeat_interleave(n_chunks)
        starts = rows * length + torch.arange(n_chunks, device=device).repeat(batch) * chunk_size
        ends = (rows + 1) * length
    else:
        sequence, chunk = chunk_indices[:, 0].long(), chunk_indices[:, 1].long()
        starts = cu_seqlens[sequence].long() + chunk * chunk_size
        ends = cu_seqlens[sequence + 1].long()
    positions = starts[:, None] + torch.arange(chunk_size, device=device)
    valid = positions < ends[:, None]
    last = torch.minimum(starts + chunk_size, ends) - 1
    return positions.clamp_max(batch * length - 1), valid, last


def dqkwg_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor | None,
    g: torch.Tensor,
    h: torch.Tensor,
    dv: torch.Tensor | None,
    do: torch.Tensor,
    dh: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """What fla's `chunk_bwd_dqkwg` returns with a gate (state layout [K, V]): dq, dk, dw, dg.

    Inputs as fla's backward has them: q, k [B,T,H,K] (H may divide v's heads HV), v = the corrected
    values v_new (the plain values for simple GLA), w, dv, do [B,T,HV,*] (w and dv None for simple GLA:
    then dw is None), g the chunk-local cumulative log2-decay [B,T,HV], h and dh the chunk states and their
    gradients [B,NT,HV,K,V] (bf16, or float32 for simple GLA). Per chunk, with decays Γ_t = 2^{g_t}:
        dq = scale Γ ⊙ (dO hᵀ) + dS K,          dS = scale ((dO Vᵀ) ⊙ Γ_t / Γ_s)_{s<=t}
        dk = (Γ_C / Γ) ⊙ (V dhᵀ) + dSᵀ Q,       dw = −dV hᵀ
        dg = Σ_k (dq ⊙ q − dk ⊙ k), plus Γ_C Σ(h ⊙ dh) + Σ(dk_state ⊙ k) at the chunk's last token.
    Matmuls take the bf16 operands fla's kernel takes (states cast to do's dtype); sums and decays are
    float32, as in fla.
    """
    B, T, H, K = q.shape
    HV = v.shape[2]
    if HV != H:  # grouped value heads: each q/k head serves HV // H consecutive value heads
        q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q, k))
    positions, valid, last = chunk_positions(B, T, chunk_indices, cu_seqlens, chunk_size, q.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B,T,HV,*D] -> [N,HV,C,*D], zero outside the sequence
        x = x.flatten(0, 1)[positions]
        return (x * valid.view(*valid.shape, *(1,) * (x.ndim - 2)).to(x.dtype)).transpose(1, 2)

    q_c, k_c, v_c, do_c = (chunked(x) for x in (q, k, v, do))
    g_c = chunked(g).float()  # [N,HV,C]
    g_last = g.flatten(0, 1)[last].float()  # [N,HV]
    h, dh = h.flatten(0, 1), dh.flatten(0, 1)  # [N,HV,K,V]
    h_t = h.transpose(-1, -2).to(do.dtype)

    dq = (do_c @ h_t).float() * (g_c.exp2() * scale)[..., None]
    dk_state = (v_c @ dh.transpose(-1, -2).to(do.dtype)).float()
    dk_state = dk_state * torch.where(valid[:, None], (g_last[..., None] - g_c).exp2(), 0)[..., None]
    dg_last = (h.float() * dh.float()).sum((-2, -1)) * g_last.exp2() + (dk_state * k_c.float()).sum((-2, -1))

    # causal pairs of the sequence's tokens only: a padding token's g (0) minus a valid token's overflows exp2
    # once the chunk's decay passes 2^-128 (Mamba2's strong decays do), and that inf times the padding's 0 is NaN
    pairs = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    pairs = pairs & valid[:, None, :, None] & valid[:, None, None, :]  # [N,1,C,C]
    decay = torch.where(pairs, g_c[..., :, None] - g_c[..., None, :], float("-inf")).exp2()
    ds = ((do_c @ v_c.transpose(-1, -2)).float() * decay * scale).to(k.dtype)
    dq = dq + (ds @ k_c).float()
    dk = dk_state + (ds.transpose(-1, -2) @ q_c).float()
    dg = (dq * q_c.float()).sum(-1) - (dk * k_c.float()).sum(-1)  # [N,HV,C]
    at_last = torch.arange(chunk_size, device=q.device) == (last - positions[:, 0])[:, None]  # [N,C]
    dg = dg + at_last[:, None] * dg_last[..., None]

    # Back to [B,T,HV,*D]: every token is in exactly one chunk; padding goes to one extra row, dropped.
    # (No boolean-mask indexing: its data-dependent shape would break the compiled graph and sync.)
    targets = torch.where(valid, positions, B * T).flatten()

    def unchunked(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.transpose(1, 2).flatten(0, 1).to(dtype)
        out = x.new_empty(B * T + 1, *x.shape[1:])
        out[targets] = x
        return out[:-1].view(B, T, *x.shape[1:])

    dq, dk = unchunked(dq, q.dtype), unchunked(dk, k.dtype)
    if HV != H:
        dq, dk = (x.view(B, T, H, HV // H, K).sum(3) for x in (dq, dk))
    dw = None if w is None else unchunked(-(chunked(dv) @ h_t), w.dtype)
    return dq, dk, dw, unchunked(dg, torch.float32)


@triton.jit
def _dqkwg_kernel(q, k, v, g, h, dh, dv, do, dq, dk, dw, dg_blocks, cu_seqlens, chunk_indices, scale, T,
                  n_tokens, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DW: tl.constexpr):
    """One chunk of BT tokens, one value head, BK of the K key dims (`dqkwg_torch` says what it computes).

    Written for Triton 3.4-3.7.0 on Hopper, which miscompile a transpose of a matmul result (fla #640):
    dSᵀ is accumulated as its own product (V dOᵀ) instead of transposing dS."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        i_n, i_c = tl.load(chunk_indices + i_t * 2).to(tl.int32), tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        i_state = i_t.to(tl.int64)  # fla's chunk states follow chunk_indices
    else:
        i_c = i_t
        bos, eos = i_b.to(tl.int64) * T, i_b.to(tl.int64) * T + T
        i_state = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
    o_i = tl.arange(0, BT)
    rows = bos + i_c * BT + o_i  # token rows in the flattened [B*T] stream
    m_t = rows < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_state = (i_state * HV + i_hv) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_ds_t = tl.zeros([BT, BT], dtype=tl.float32)
    b_h_dh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        p_tv = (rows[:, None] * HV + i_hv) * V + o_v[None, :]
        b_v = tl.load(v + p_tv, mask=m_tv, other=0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0)
        p_kv = p_state + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(h + p_kv, mask=m_kv, other=0)
        b_dh = tl.load(dh + p_kv, mask=m_kv, other=0)
        b_h_dh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
        b_h, b_dh = b_h.to(b_do.dtype), b_dh.to(b_do.dtype)  # float32 states (simple GLA): bf16 operands, as fla
        b_ds += tl.dot(b_do, tl.trans(b_v))
        b_ds_t += tl.dot(b_v, tl.trans(b_do))
        b_dq += tl.dot(b_do, tl.trans(b_h))
        b_dk += tl.dot(b_v, tl.trans(b_dh))
        if HAS_DW:
            b_dv = tl.load(dv + p_tv, mask=m_tv, other=0)
            b_dw += tl.dot(b_dv, tl.trans(b_h))

    b_g = tl.load(g + rows * HV + i_hv, mask=m_t, other=0).to(tl.float32)
    last = tl.minimum(bos + i_c * BT + BT, eos) - 1
    b_g_last = tl.load(g + last * HV + i_hv).to(tl.float32)
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = (rows[:, None] * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_tk, mask=m_tk, other=0)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0)
    b_dq = b_dq * (tl.exp2(b_g) * scale)[:, None]
    b_dk = b_dk * tl.where(m_t, tl.exp2(b_g_last - b_g), 0)[:, None]
    dg_last = tl.sum(b_h_dh, 0) * tl.exp2(b_g_last) + tl.sum(tl.sum(b_dk * b_k.to(tl.float32), 1), 0)
    # causal pairs of the sequence's tokens only, as in `dqkwg_torch` (else inf · 0 = NaN past a partial chunk's end)
    pairs = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    b_ds = tl.where(pairs, b_ds * tl.exp2(b_g[:, None] - b_g[None, :]), 0) * scale
    b_ds_t = tl.where(pairs.T, b_ds_t * tl.exp2(b_g[None, :] - b_g[:, None]), 0) * scale
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    b_dk += tl.dot(b_ds_t.to(b_q.dtype), b_q)
    b_dg = tl.sum(b_dq * b_q.to(tl.float32), 1) - tl.sum(b_dk * b_k.to(tl.float32), 1)
    b_dg += tl.where(rows == last, dg_last, 0)

    p_out = (rows[:, None] * HV + i_hv) * K + o_k[None, :]
    tl.store(dq + p_out, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_out, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if HAS_DW:
        tl.store(dw + p_out, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
    tl.store(dg_blocks + (i_k * n_tokens + rows) * HV + i_hv, b_dg, mask=m_t)  # summed over i_k after


def dqkwg_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor | None,
    g: torch.Tensor,
    h: torch.Tensor,
    dv: torch.Tensor | None,
    do: torch.Tensor,
    dh: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`dqkwg_torch` as one Triton kernel: reads the chunk states h and dh once (the PyTorch version's
    gathers, products and scatters cost ≈ 210 ms of a gated_deltanet_340M step on an H200)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[-1]
    n_chunks = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    # grouped value heads: per value head first, then summed into the q/k heads they share
    grad_dtype = q.dtype if HV == H else torch.float32
    dq, dk = (q.new_empty(B, T, HV, K, dtype=grad_dtype) for _ in range(2))
    dw = None if w is None else torch.empty_like(w)
    n_k = triton.cdiv(K, DQKWG_BLOCK_K)
    dg_blocks = g.new_empty(n_k, B * T, HV, dtype=torch.float32)
    _dqkwg_kernel[(n_k, n_chunks, B * HV)](
        q, k, v, g, h, dh, do if dv is None else dv, do, dq, dk, dq if dw is None else dw, dg_blocks, cu_seqlens,
        chunk_indices, scale, T, B * T, H=H, HV=HV, K=K, V=V, BT=chunk_size, BK=DQKWG_BLOCK_K, BV=DQKWG_BLOCK_V,
        IS_VARLEN=cu_seqlens is not None, HAS_DW=w is not None, num_warps=4)
    if HV != H:
        dq, dk = (x.view(B, T, H, HV // H, K).sum(3).to(q.dtype) for x in (dq, dk))
    return dq, dk, dw, dg_blocks.sum(0).view(B, T, HV)


def dqkwg(**kwargs: torch.Tensor | float | int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                 torch.Tensor]:
    """fla's `chunk_bwd_dqkwg` (its keyword arguments), or `dqkwg_triton` where triton miscompiles fla's."""
    return (dqkwg_triton if TRITON_BREAKS_HOPPER_BACKWARD else chunk_bwd_dqkwg)(**kwargs)


def forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_size):
    """fla's gated delta rule forward: (o, final state or None, A, g's chunk-local cumulative sum) (a family of
    `fla_chunk`)."""
    g_cumsum, o, A, final_state, _, _ = chunk_gated_delta_rule_fwd(
        q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
        chunk_size=chunk_size)
    return o, final_state, A, g_cumsum


def backward(q, k, v, g_cumsum, beta, A, scale, initial_state, do, dht, cu_seqlens, chunk_indices, chunk_size):
    """fla's `chunk_gated_delta_rule_bwd`, step by step, with `dqkwg` (lmlab's kernel where fla's is broken):
    (dq, dk, dv, dg, dbeta, dh0); g_cumsum is the forward's chunk-local cumulative sum of the gate."""
    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)  # the WY steps read the size from A
    sized = dict(common, chunk_size=chunk_size)
    w, u = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, g=g_cumsum, **common)
    h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=g_cumsum, initial_state=initial_state,
                                               output_final_state=False, **sized)
    dv = chunk_bwd_dv_local(q=q, k=k, g=g_cumsum, do=do, scale=scale, **sized)
    dh, dh0, dv = chunk_gated_delta_rule_bwd_dhu(q=q, k=k, w=w, g=g_cumsum, h0=initial_state, dht=dht, do=do, dv=dv,
                                                 scale=scale, **sized)
    dq, dk, dw, dg = dqkwg(q=q, k=k, v=v_new, w=w, g=g_cumsum, h=h, dv=dv, do=do, dh=dh, scale=scale, **sized)
    dk2, dv, dbeta, dg2 = prepare_wy_repr_bwd(k=k, v=v, beta=beta, g=g_cumsum, A=A, dw=dw, du=dv, **common)
    dg = chunk_local_cumsum(dg + dg2, reverse=True, **sized)
    return dq, dk + dk2, dv, dg, dbeta, dh0
