"""Cross entropy of a linear head, computed chunk by chunk so the [N, V] float32 logits never exist.

The forward pass walks over token chunks: logits -> logsumexp -> loss, and at the same time the gradients
w.r.t. hidden and weight (softmax - one_hot is all the backward needs). Only those gradients are saved;
backward scales them by grad_output.

PyTorch only: on an H200 (N=16384, D=1024, V=32000, bf16) it took 16.5 ms forward+backward, fla 0.6.0's
(also chunked) FusedLinearCrossEntropyLoss 27.3 ms. On CUDA the per-chunk work after the matmul (logsumexp,
softmax - one_hot, scaling, casting) is compiled into two kernels: run op by op it made eight passes over
the float32 logits, 8% of a DeltaNet 340M training step on an H200 (bench/NOTES.md, step 5).
"""
from __future__ import annotations

import torch

from lmlab.kernels import dispatch

_CHUNK_LOGITS_BYTES = 256 * 2**20  # a chunk's float32 logits stay within this


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross entropy of logits = hidden @ weight.T against labels (already shifted); a float32 scalar.

    hidden `[N, D]`, weight `[V, D]`, labels `[N]`. reduction "sum", or "mean" over the labels that are
    not `ignore_index` (0 when there are none, instead of F.cross_entropy's NaN).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    dispatch.choose("linear_cross_entropy", hidden, backend)  # validates an explicit request; only "torch"
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, chunk_size)


def chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor | None,
                        want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: (sum of its token losses (float32), d loss / d logits = (softmax - one_hot(label)) * scale,
    zero for ignored tokens, in the logits' dtype, or None without `want_grad`)."""
    logits_f = logits.float()
    lse = torch.logsumexp(logits_f, dim=-1)
    labels = torch.where(valid, labels, 0)
    target = logits_f.gather(1, labels[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target, 0).sum()
    if not want_grad:
        return loss, None
    is_label = torch.arange(logits.shape[1], device=logits.device) == labels[:, None]
    grad = ((logits_f - lse[:, None]).exp() - is_label.float()) * valid[:, None]
    return loss, (grad if scale is None else grad * scale).to(logits.dtype)


# dynamic=None: the last, shorter chunk (and evaluation's varying lengths) compile one dynamic graph
chunk_loss_compiled = torch.compile(chunk_loss_and_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size):
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[:2]
        valid = labels != ignore_index
        # "mean" divides by the number of real labels; folding it into the chunk gradients now keeps
        # backward a single multiplication.
        scale = 1.0 / valid.sum().clamp(min=1).float() if reduction == "mean" else None
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight_grad else None
        want_grad = grad_hidden is not None or grad_weight is not None
        chunk_loss = chunk_loss_compiled if hidden.is_cuda else chunk_loss_and_grad
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            chunk_sum, grad_logits = chunk_loss(h @ weight.T, labels[start:start + chunk_size],
                                                valid[start:start + chunk_size], scale, want_grad)
            loss += chunk_sum
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.add_(grad_logits.T @ h)
        if scale is not None:
            loss = loss * scale
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None
