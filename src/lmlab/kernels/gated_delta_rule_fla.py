"""fla's chunked gated delta rule with its one Hopper-broken backward kernel replaced by PyTorch.

On Hopper GPUs, triton 3.4 - 3.7.0 miscompiles fla's `chunk_bwd_kernel_dqkwg` when a gate is present
(fla issue #640), and fla 0.6.0 then refuses the whole gated delta rule backward. Every other kernel of
that backward is sound (the delta rule runs the same `dqkwg` kernel without a gate, and passes on
Hopper). So this module runs fla's forward and fla's backward kernels unchanged, except `dqkwg`:
`dqkwg_torch` computes the same gradients with batched matmuls over all chunks at once (no loop, no
recurrence: that step only reads the chunk states fla's backward already produced), so Gated DeltaNet
trains on fla's kernels on Hopper instead of on lmlab's much slower all-PyTorch chunk kernel.

Imported only when fla's kernels are used (`gated_delta_rule._fla_kernels`); fla is required here.
"""
from __future__ import annotations

import torch
from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
from fla.ops.common.chunk_o import chunk_bwd_dv_local
from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd
from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
from fla.ops.utils import chunk_local_cumsum
from fla.ops.utils.index import prepare_chunk_indices
from fla.utils import input_guard

CHUNK_SIZE = 64  # fla's default for the gated delta rule; every kernel below assumes the same


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
    w: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    dv: torch.Tensor,
    do: torch.Tensor,
    dh: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What fla's `chunk_bwd_dqkwg` returns with a gate (state layout [K, V]): dq, dk, dw, dg.

    Inputs as fla's backward has them: q, k [B,T,H,K] (H may divide v's heads HV), v = the corrected
    values v_new, w, dv, do [B,T,HV,*], g the chunk-local cumulative log2-decay [B,T,HV], h and dh the
    chunk states and their gradients [B,NT,HV,K,V]. Per chunk, with decays Γ_t = 2^{g_t}:
        dq = scale Γ ⊙ (dO hᵀ) + dS K,          dS = scale ((dO Vᵀ) ⊙ Γ_t / Γ_s)_{s<=t}
        dk = (Γ_C / Γ) ⊙ (V dhᵀ) + dSᵀ Q,       dw = −dV hᵀ
        dg = Σ_k (dq ⊙ q − dk ⊙ k), plus Γ_C Σ(h ⊙ dh) + Σ(dk_state ⊙ k) at the chunk's last token.
    Matmuls take the bf16 operands fla's kernel takes; sums and decays are float32, as in fla.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[-1]
    if HV != H:  # grouped value heads: each q/k head serves HV // H consecutive value heads
        q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q, k))
    positions, valid, last = chunk_positions(B, T, chunk_indices, cu_seqlens, chunk_size, q.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B,T,HV,*D] -> [N,HV,C,*D], zero outside the sequence
        x = x.flatten(0, 1)[positions]
        return (x * valid.view(*valid.shape, *(1,) * (x.ndim - 2)).to(x.dtype)).transpose(1, 2)

    q_c, k_c, v_c, dv_c, do_c = (chunked(x) for x in (q, k, v, dv, do))
    g_c = chunked(g).float()  # [N,HV,C]
    g_last = g.flatten(0, 1)[last].float()  # [N,HV]
    h, dh = h.flatten(0, 1), dh.flatten(0, 1)  # [N,HV,K,V]
    h_t = h.transpose(-1, -2)

    dq = (do_c @ h_t).float() * (g_c.exp2() * scale)[..., None]
    dk_state = (v_c @ dh.transpose(-1, -2)).float()
    dk_state = dk_state * torch.where(valid[:, None], (g_last[..., None] - g_c).exp2(), 0)[..., None]
    dw = -(dv_c @ h_t)
    dg_last = (h.float() * dh.float()).sum((-2, -1)) * g_last.exp2() + (dk_state * k_c.float()).sum((-2, -1))

    pairs = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
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
    return dq, dk, unchunked(dw, w.dtype), unchunked(dg, torch.float32)


# Inductor fuses the gathers, decays and float32 sums around the matmuls; run eagerly, the float32
# product h ⊙ dh alone would take 1.6 GB per layer of Gated DeltaNet 340M at 16 x 2048 tokens.
dqkwg_compiled = torch.compile(dqkwg_torch)


class ChunkGatedDeltaRule(torch.autograd.Function):
    """fla 0.6.0's `ChunkGatedDeltaRuleFunction` (plain inputs: no in-kernel l2norm, sigmoid or gate),
    with `dqkwg_torch` in its backward."""

    @staticmethod
    @input_guard
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        chunk_indices = None if cu_seqlens is None else prepare_chunk_indices(cu_seqlens, CHUNK_SIZE)
        g, o, A, final_state, initial_state, _ = chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
        )
        ctx.save_for_backward(q, k, v, g, beta, A, initial_state, cu_seqlens, chunk_indices)
        ctx.scale = scale
        return o.to(q.dtype), final_state

    @staticmethod
    @input_guard
    def backward(ctx, do, dht):
        q, k, v, g, beta, A, initial_state, cu_seqlens, chunk_indices = ctx.saved_tensors
        common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
        # fla's chunk_gated_delta_rule_bwd, step by step
        w, u = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, g=g, **common)
        h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=g, initial_state=initial_state,
                                                   output_final_state=False, **common)
        dv = chunk_bwd_dv_local(q=q, k=k, g=g, do=do, scale=ctx.scale, **common)
        dh, dh0, dv = chunk_gated_delta_rule_bwd_dhu(q=q, k=k, w=w, g=g, h0=initial_state, dht=dht, do=do,
                                                     dv=dv, scale=ctx.scale, **common)
        dq, dk, dw, dg = dqkwg_compiled(q, k, v_new, w, g, h, dv, do, dh, ctx.scale, **common)
        dk2, dv, db, dg2 = prepare_wy_repr_bwd(k=k, v=v, beta=beta, g=g, A=A, dw=dw, du=dv, **common)
        dg = chunk_local_cumsum(dg + dg2, chunk_size=CHUNK_SIZE, reverse=True, **common)
        return dq.to(q), (dk + dk2).to(k), dv.to(v), dg.to(g), db.to(beta), None, dh0, None, None


@torch.compiler.disable  # fla's kernels run outside torch.compile's graphs, as fla's own ops do
def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's `chunk_gated_delta_rule` (same arguments and results) with a Hopper-safe backward."""
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
