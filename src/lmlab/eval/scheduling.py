"""How lmlab's models run lm-eval's requests (issue 22): packed loglikelihood scoring and batched greedy
generation. The lm-eval side (tokenisation, truncation, stop strings, results) is `lmlab.eval.lm`.

Loglikelihood. Every request is one model input (lm-eval's `(context + continuation)[-(max_length+1):][:-1]`)
whose last `len(continuation)` positions are scored. Inputs are packed whole into rows of `row_len` tokens
(best-fit decreasing, longest first: the first forwards are the largest, so an out-of-memory comes at once
and progress estimates err long) and `token_budget // row_len` rows go through one forward as packed
documents (`cu_seqlens`): positions, recurrent and conv states restart at every request, so each request
sees exactly what it would see alone, and no padding enters the model except the free tail of a row (its
own document). Only the scored positions go through the output layer. One host sync per forward.

Generation. Contexts sorted by length run in batches of at most `token_budget` prefill tokens, left-padded
(`attention_mask`; padding never enters a state, see docs/CONTRACTS.md), then one token per step for the
whole batch from the models' decoding Cache. EOS and stop strings are checked on the host every
`CHECK_EVERY` steps only (generating past a stop cannot change the text cut at the first stop).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from lmlab.models.cache import Cache

# Scored positions per output-layer call: bounds the [positions, vocab] logits (8192 x 32k fp32 = 1 GiB).
LOGITS_CHUNK = 8192
# Decode steps between two host checks of EOS and stop strings.
CHECK_EVERY = 16


@dataclass(frozen=True)
class Scoring:
    """One loglikelihood request as the model sees it: `tokens` in, the last len(targets) positions scored."""

    tokens: list[int]
    targets: list[int]


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Indices of `lengths` in rows of at most `row_len` tokens: best-fit decreasing, longest first."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > row_len:
            raise ValueError(f"an input of {lengths[i]} tokens does not fit rows of {row_len}")
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (row_len - lengths[i], len(rows) - 1))
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - lengths[i], row))
    return rows


def row_length(longest: int, max_length: int) -> int:
    """Rows as long as the longest input, at least 1024 tokens (or max_length) so short inputs pack densely;
    not longer, since softmax attention within a row costs its length squared."""
    return max(longest, min(1024, max_length))


@torch.no_grad()
def score_packed(model: torch.nn.Module, requests: Sequence[Scoring], *, token_budget: int, max_length: int,
                 softmax_dtype: torch.dtype | None = None) -> Iterator[tuple[list[int], list[tuple[float, bool]]]]:
    """Log-likelihood and is-greedy of each request, as lm-eval's HF model computes them one by one.
    Yields (request indices, results) per forward, longest requests first; a forward's results are read
    once the next one is queued, so the device never waits for the host."""
    if not requests:
        return
    row_len = row_length(max(len(r.tokens) for r in requests), max_length)
    rows = pack_rows([len(r.tokens) for r in requests], row_len)
    rows_per_forward = max(1, token_budget // row_len)
    device = next(model.parameters()).device
    pending = None
    for first in range(0, len(rows), rows_per_forward):
        order = [i for row in rows[first:first + rows_per_forward] for i in row]
        sums, misses = _score_forward(model, requests, rows[first:first + rows_per_forward], row_len, device,
                                      softmax_dtype)
        if pending is not None:
            yield _results(*pending)
        pending = order, sums, misses
    yield _results(*pending)


def _score_forward(model: torch.nn.Module, requests: Sequence[Scoring], rows: list[list[int]], row_len: int,
                   device: torch.device, softmax_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of packed rows: per request (in row order) its log-likelihood and its count of
    non-greedy targets, on the device."""
    tokens, starts, positions, targets, counts = [], [0], [], [], []
    for row in rows:
        row_start = len(tokens)
        for i in row:
            end = len(tokens) + len(requests[i].tokens)
            positions.extend(range(end - len(requests[i].targets), end))
            targets.extend(requests[i].targets)
            counts.append(len(requests[i].targets))
            tokens.extend(requests[i].tokens)
            starts.append(end)
        if len(tokens) < row_start + row_len:  # the row's free tail: a document of its own
            tokens.extend([0] * (row_start + row_len - len(tokens)))
            starts.append(len(tokens))
    input_ids = torch.tensor(tokens, device=device).view(len(rows), row_len)
    cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
    hidden = model.model(input_ids=input_ids, cu_seqlens=cu_seqlens).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(positions, device=device)]
    targets_t = torch.tensor(targets, device=device)
    logprobs, greedy = [], []
    for at in range(0, len(targets), LOGITS_CHUNK):  # only the scored positions reach the output layer
        logits = F.log_softmax(model.lm_head(hidden[at:at + LOGITS_CHUNK]), dim=-1, dtype=softmax_dtype)
        chunk_targets = targets_t[at:at + LOGITS_CHUNK]
        logprobs.append(logits.gather(1, chunk_targets[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == chunk_targets)
    logprob = torch.cat(logprobs)
    owners = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device),
                                     output_size=len(targets))  # the request of each position; no host sync
    # lm-eval sums a request's log-probs in the logits' dtype (accumulated in float32, then rounded)
    sums = torch.zeros(len(counts), device=device).index_add_(0, owners, logprob.float()).to(logprob.dtype)
    misses = torch.zeros(len(counts), device=device).index_add_(0, owners, (~torch.cat(greedy)).float())
    return sums, misses


def _results(order: list[int], sums: torch.Tensor, misses: torch.Tensor) -> tuple[list[int], list[tuple[float, bool]]]:
    return order, [(s, m == 0) for s, m in zip(sums.float().tolist(), misses.tolist())]


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_ids: set[int], stopped: Callable[[list[int]], bool]) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, each cut after its first EOS; generation ends early
    once every row has an EOS or `stopped(its tokens)` (checked every CHECK_EVERY steps)."""
    def finished(row: list[int]) -> bool:
        return any(t in eos_ids for t in row) or stopped(row)

    out = torch.empty(input_ids.shape[0], max_new_tokens, dtype=torch.long, device=input_ids.device)
    cache = Cache()
    logits = model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits
    steps = 0
    while steps < max_new_tokens:
        out[:, steps] = logits[:, -1].argmax(-1)
        steps += 1
        if steps == max_new_tokens or (steps % CHECK_EVERY == 0 and all(map(finished, out[:, :steps].tolist()))):
            break
        attention_mask = F.pad(attention_mask, (0, 1), value=1)
        logits = model(out[:, steps - 1:steps], attention_mask=attention_mask, past_key_values=cache,
                       use_cache=True).logits
    return [cut_at_eos(row, eos_ids) for row in out[:, :steps].tolist()]


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first EOS (what generate() returns before its padding)."""
    return next((tokens[:i + 1] for i, t in enumerate(tokens) if t in eos_ids), tokens)

