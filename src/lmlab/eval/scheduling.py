"""How lmlab's models run lm-eval's requests (issue 22): packed loglikelihood scoring and batched greedy
generation. The lm-eval side (tokenisation, truncation, stop strings, results) is `lmlab.eval.lm`.

Loglikelihood. Every request is one model input (lm-eval's `(context + continuation)[-(max_length+1):][:-1]`)
whose last `len(continuation)` positions are scored. Inputs are packed whole into rows of `row_len` tokens
(best-fit decreasing, longest first: the first forwards are the largest, so an out-of-memory comes at once
and progress estimates err long) and `token_budget // row_len` rows go through one forward as packed
documents (`cu_seqlens`): positions, recurrent and conv states restart at every request, so each request
sees exactly what it would see alone, and no padding enters the model except the free tail of a row (its
own document). Only the scored positions go through the output layer. One host sync per forward, read
once the next forward is queued.

Multiple choice (hellaswag 4x, arc 3-5x, piqa 2x the same context): the context runs once, left-padded
in a batch of contexts of similar length, with the models' decoding Cache (recurrent, conv and KV states);
the Cache is copied to one row per continuation and the continuations run from it, right-padded (what
follows a token cannot change its output). A batch holds as many rows as the token budget and the
memory set aside for decoding states allow (`StateMemory`: a 340M Gated DeltaNet's state is 64 MiB a
row, so the token budget alone let hellaswag's batches exhaust an 80 GB card). Against packed rows that
repeat the context, on 100 hellaswag-sized documents (60-100 context and 4 x 20-40 continuation tokens; CPU, 2 cores shared with
other jobs, one thread; bench/experiments/shared_context.py, in commit afb14bf): 14.7 s
against 29.0 s (tiny_gated_deltanet), 7.8 s against 15.6 s (tiny_transformer), 11.6 s against 35.6 s
(tiny_hqlt_sync), results within 1e-4 of each other. The tokens fall from 43.6k to 20.0k (+ padding), so
the context runs once wherever no truncation applies; truncated requests are packed.

Batch sizes. The shared-context and generation paths run batches of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... rows
only (`batch_rows_at_most`, `batch_rows_at_least`: powers of two and 1.5 times them; a continuation batch
is padded up with unscored rows from its first context). fla's Triton kernels autotune on first use for every new batch
size (their autotune keys include it; seconds each, on an H100 they stalled each task's start), so few
sizes keep that to a handful of tunings, cached on disk for later runs. Packed rows are one document
batch (`cu_seqlens`), whatever their number.

Generation. Contexts sorted by length run in batches of as many rows as `StateMemory` allows, left-padded
(`attention_mask`; padding never enters a state, see docs/CONTRACTS.md), their prompts in pieces of at
most `token_budget` tokens, then one token per step for the whole batch from the models' decoding Cache
(`lmlab.eval.decoding`: on CUDA a step replayed from a CUDA graph wherever the model's step is one fixed
computation). EOS and stop strings are checked on the host every `CHECK_EVERY` steps only (generating past
a stop cannot change the text cut at the first stop).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from lmlab.eval.decoding import Decoder
from lmlab.models.cache import Cache

# Scored positions per output-layer call: bounds the [positions, vocab] logits (8192 x 32k fp32 = 1 GiB).
LOGITS_CHUNK = 8192
# Decode steps between two host checks of EOS and stop strings.
CHECK_EVERY = 16


@dataclass(frozen=True)
class StateMemory:
    """How many rows' decoding states fit the memory set aside for them: a row's Cache holds `fixed` bytes
    (recurrent, short-conv and delay states) and, for each state that grows (attention keys and values),
    its bytes per token for as many tokens as it keeps: all, or a sliding window's last W - 1 (`growing`:
    (bytes per token, tokens kept or None) pairs)."""

    fixed: int
    growing: tuple[tuple[int, int | None], ...]
    budget: int

    def row_bytes(self, tokens: int) -> int:
        """Bytes of one row's states after `tokens` tokens."""
        return self.fixed + sum(per_token * (tokens if kept is None else min(tokens, kept))
                                for per_token, kept in self.growing)

    def rows(self, tokens: int) -> int:
        """Rows whose states after `tokens` tokens fit the budget (at least 1)."""
        return max(1, self.budget // max(1, self.row_bytes(tokens)))


@torch.no_grad()
def measure_state_memory(model: torch.nn.Module, budget: int) -> StateMemory:
    """`model`'s StateMemory, from the Cache it leaves after one row of one token."""
    cache = Cache()
    model.model(input_ids=torch.ones(1, 1, dtype=torch.long, device=next(model.parameters()).device),
                past_key_values=cache, use_cache=True)
    fixed, growing = cache.footprint()
    return StateMemory(fixed=fixed, growing=tuple(growing), budget=budget)


def default_state_budget(device: torch.device) -> int:
    """Bytes for a batch's decoding states: an eighth of the GPU memory free now (the forward's chunked
    intermediate states and activations need the rest), 2 GiB on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 8
    return 2 << 30


def batch_rows_at_most(n: int) -> int:
    """The largest batch size of 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5 times them) not above n."""
    power = 1 << (n.bit_length() - 1)
    return power * 3 // 2 if power >= 2 and n >= power * 3 // 2 else power


def batch_rows_at_least(n: int) -> int:
    """The smallest batch size of 1, 2, 3, 4, 6, 8, 12, ... not below n."""
    power = 1 << (n - 1).bit_length()
    return power * 3 // 4 if power >= 4 and n <= power * 3 // 4 else power


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


def shared_contexts(pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
                    token_budget: int) -> tuple[list[list[int]], list[int]]:
    """(context, continuation) token pairs: groups of indices that share a context (for
    `score_shared_context`), and the other indices (for `score_packed`): a request truncated to
    max_length, or a group whose continuations alone pass the token budget (e.g. wikitext's first windows,
    all after the same BOS)."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        if len(context) + len(continuation) <= max_length + 1:
            by_context.setdefault(tuple(context), []).append(i)
    groups = [g for context, g in by_context.items()
              if len(g) > 1 and len(context) + len(g) * max(len(pairs[i][1]) for i in g) <= token_budget]
    grouped = {i for g in groups for i in g}
    return groups, [i for i in range(len(pairs)) if i not in grouped]


def row_length(longest: int, max_length: int) -> int:
    """Rows as long as the longest input, at least 1024 tokens (or max_length) so short inputs pack densely;
    not longer, since softmax attention within a row costs its length squared."""
    return max(longest, min(1024, max_length))


@torch.no_grad()
def score_packed(model: torch.nn.Module, requests: Sequence[Scoring], *, token_budget: int, max_length: int,
                 softmax_dtype: torch.dtype | None = None) -> Iterator[tuple[list[int], list[tuple[float, bool]]]]:
    """Log-likelihood and is-greedy of each request, as lm-eval's HF model computes them one by one.
    Yields (request indices, results) per forward, longest requests first."""
    if not requests:
        return
    row_len = row_length(max(len(r.tokens) for r in requests), max_length)
    rows = pack_rows([len(r.tokens) for r in requests], row_len)
    step = max(1, token_budget // row_len)
    device = next(model.parameters()).device
    yield from read_behind(([i for row in rows[at:at + step] for i in row],
                            *_score_forward(model, requests, rows[at:at + step], row_len, device, softmax_dtype))
                           for at in range(0, len(rows), step))


@torch.no_grad()
def score_shared_context(model: torch.nn.Module, groups: Sequence[tuple[list[int], list[list[int]]]], *,
                         token_budget: int, state: StateMemory, softmax_dtype: torch.dtype | None = None
                         ) -> Iterator[tuple[list[tuple[int, int]], list[tuple[float, bool]]]]:
    """Multiple choice: each (context, continuations) group runs its context once, left-padded with the
    groups of similar length, and every continuation from a copy of its context's decoding state
    (right-padded: what follows a token never changes it). Yields ((group, continuation) indices, results)
    per batch, longest contexts first; the results are lm-eval's HF model's for context + continuation."""
    order = sorted(range(len(groups)), key=lambda g: -len(groups[g][0]))
    batches, at = [], 0
    while at < len(order):  # as many groups as fit: tokens (padded) and states of contexts + continuations
        end, width, conts = at + 1, max(map(len, groups[order[at]][1])), len(groups[order[at]][1])
        ctx_len = len(groups[order[at]][0])
        while end < len(order):
            w, n = max(width, *map(len, groups[order[end]][1])), conts + len(groups[order[end]][1])
            rows = end + 1 - at + batch_rows_at_least(n)
            if (end + 1 - at) * ctx_len + n * w > token_budget or rows > state.rows(ctx_len + w):
                break
            end, width, conts = end + 1, w, n
        end = at + batch_rows_at_most(end - at)
        batches.append(order[at:end])
        at = end
    device = next(model.parameters()).device
    yield from read_behind(_shared_forward(model, [groups[g] for g in batch], batch, device, softmax_dtype)
                           for batch in batches)


def _shared_forward(model: torch.nn.Module, groups: list[tuple[list[int], list[list[int]]]], group_ids: list[int],
                    device: torch.device, softmax_dtype: torch.dtype | None
                    ) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """One batch of score_shared_context: (group, continuation) indices, log-likelihoods and counts of
    non-greedy targets (on the device)."""
    G, ctx_len = len(groups), max(len(context) for context, _ in groups)
    contexts = torch.zeros(G, ctx_len, dtype=torch.long)
    mask = torch.zeros(G, ctx_len, dtype=torch.long)
    for row, (context, _) in enumerate(groups):  # left padding
        contexts[row, ctx_len - len(context):] = torch.tensor(context)
        mask[row, ctx_len - len(context):] = 1
    conts = [(row, c) for row, (_, continuations) in enumerate(groups) for c in continuations]
    # padded up to a batch size of batch_rows_at_least with rows from the first context, not scored
    owners = [row for row, _ in conts]
    owners = torch.tensor(owners + owners[:1] * (batch_rows_at_least(len(conts)) - len(conts)), device=device)
    mask, cache = mask.to(device), Cache()
    # each context's last output scores its continuations' first tokens
    hidden = [model.model(input_ids=contexts.to(device), attention_mask=mask, past_key_values=cache,
                          use_cache=True).last_hidden_state[:, -1]]
    width = max(len(c) for _, c in conts) - 1  # a continuation's last token is only a target
    if width:
        inputs = torch.zeros(len(owners), width, dtype=torch.long)  # right padding
        for r, (_, c) in enumerate(conts):
            inputs[r, :len(c) - 1] = torch.tensor(c[:-1])
        cache.batch_select_indices(owners)  # one copy of its context's state per continuation
        hidden.append(model.model(input_ids=inputs.to(device), attention_mask=torch.cat([mask[owners],
                                  mask.new_ones(len(owners), width)], 1), past_key_values=cache,
                                  use_cache=True).last_hidden_state.flatten(0, 1))
    # each continuation's positions in a row: its context's last one, then its own but the last
    positions = [i for r, (row, c) in enumerate(conts)
                 for i in (row, *range(G + r * width, G + r * width + len(c) - 1))]
    targets = torch.tensor([t for _, c in conts for t in c], device=device)
    sums, misses = score_positions(model, torch.cat(hidden)[torch.tensor(positions, device=device)], targets,
                                   [len(c) for _, c in conts], softmax_dtype)
    index = [(group_ids[row], j) for row, (_, continuations) in enumerate(groups) for j in range(len(continuations))]
    return index, sums, misses


def read_behind(forwards: Iterator[tuple[list, torch.Tensor, torch.Tensor]]) -> Iterator[tuple[list, list]]:
    """Each forward's results, read from the device once the next forward is queued: the device never
    waits for the host to build a batch."""
    pending = None
    for forward in forwards:
        if pending is not None:
            yield _results(*pending)
        pending = forward
    if pending is not None:
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
    return score_positions(model, hidden, torch.tensor(targets, device=device), counts, softmax_dtype)


def score_positions(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, counts: list[int],
                    softmax_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The output layer on the scored positions only (`hidden` [P, D], each request's `counts[r]` positions
    in a row): per request its log-likelihood of `targets` and its count of non-greedy targets, on the
    device."""
    logprobs, greedy = [], []
    for at in range(0, len(targets), LOGITS_CHUNK):  # bounded [positions, vocab] logits
        logits = F.log_softmax(model.lm_head(hidden[at:at + LOGITS_CHUNK]), dim=-1, dtype=softmax_dtype)
        chunk_targets = targets[at:at + LOGITS_CHUNK]
        logprobs.append(logits.gather(1, chunk_targets[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == chunk_targets)
    logprob = torch.cat(logprobs)
    owners = torch.repeat_interleave(torch.arange(len(counts), device=hidden.device),
                                     torch.tensor(counts, device=hidden.device),
                                     output_size=len(targets))  # the request of each position; no host sync
    # lm-eval sums a request's log-probs in the logits' dtype (accumulated in float32, then rounded)
    sums = torch.zeros(len(counts), device=hidden.device).index_add_(0, owners, logprob.float()).to(logprob.dtype)
    misses = torch.zeros(len(counts), device=hidden.device).index_add_(0, owners, (~torch.cat(greedy)).float())
    return sums, misses


def _results(order: list, sums: torch.Tensor, misses: torch.Tensor) -> tuple[list, list[tuple[float, bool]]]:
    return order, [(s, m == 0) for s, m in zip(sums.float().tolist(), misses.tolist())]


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_ids: set[int], stopped: Callable[[list[int]], bool],
                    prefill_rows: int, static_steps: bool = True) -> tuple[list[list[int]], str]:
    """Greedy continuations of a left-padded batch, each cut after its first EOS, and how the decoding
    steps ran (`Decoder.how`: "cuda_graph" or "eager: <why>"; `static_steps=False`: all eager); generation
    ends early once every row has an EOS or `stopped(its tokens)` (checked every CHECK_EVERY steps). The
    prompts run `prefill_rows` rows at a time (a forward's activations), the decoding steps all rows at once
    (a step of a 340M model costs about the same at 32 rows as at 128: kernel launches, not arithmetic)."""
    def finished(row: list[int]) -> bool:
        return any(t in eos_ids for t in row) or stopped(row)

    out = torch.empty(input_ids.shape[0], max_new_tokens, dtype=torch.long, device=input_ids.device)
    cache, logits = prefill(model, input_ids, attention_mask, prefill_rows)
    decode = Decoder(model, cache, attention_mask, max_new_tokens - 1, static_steps)
    steps = 0
    while steps < max_new_tokens:
        out[:, steps] = logits[:, -1].argmax(-1)
        steps += 1
        if steps == max_new_tokens or (steps % CHECK_EVERY == 0 and all(map(finished, out[:, :steps].tolist()))):
            break
        logits = decode(out[:, steps - 1:steps])
    return [cut_at_eos(row, eos_ids) for row in out[:, :steps].tolist()], decode.how


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            rows_per_forward: int) -> tuple[Cache, torch.Tensor]:
    """The decoding Cache and last logits [R, 1, vocab] of a left-padded batch of prompts, run
    `rows_per_forward` rows at a time; the pieces' caches are gone when it returns (one copy of the states
    while decoding)."""
    parts, logits, at = [], [], 0
    while at < len(input_ids):
        rows = batch_rows_at_most(min(rows_per_forward, len(input_ids) - at))
        parts.append(Cache())
        logits.append(model(input_ids[at:at + rows], attention_mask=attention_mask[at:at + rows],
                            past_key_values=parts[-1], use_cache=True, logits_to_keep=1).logits)
        at += rows
    return Cache.concatenate(parts), torch.cat(logits)


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first EOS (what generate() returns before its padding)."""
    return next((tokens[:i + 1] for i, t in enumerate(tokens) if t in eos_ids), tokens)

