"""Decoding cache of lmlab's models: per layer, a dict of named states: a linear mixer's recurrent state
and short-conv states, an attention layer's keys, values and their padding mask (only the last
window_size - 1 for sliding windows: all a later query can see besides itself), or a hybrid_qlt layer's mix
of both.

It is not a transformers `Cache` subclass on purpose: that class's API changes between the transformers
versions lmlab supports (5.17 - 5.24). generate() only needs what is here: `get_seq_length` and the
batch reordering used by beam search and `num_return_sequences`.

`in_place`: the states are fixed buffers that every new state is copied into (same shape and dtype, else
an error), so that a decoding step captured as a CUDA graph reads and writes the same memory at every
replay (lmlab.eval.decoding). A step whose states change shape (a sliding window not yet full) cannot run
so: `layout()` before and after a step tells. A KV cache without a window grows at every step until
`reserve` turns it into a buffer with room for the steps to come.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch


class Cache:
    is_compileable = False  # read by generate() when deciding to auto-compile the forward

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, Any]] = {}
        self.seen_tokens = 0  # tokens processed so far, padding included
        self.in_place = False
        self.kept: dict[tuple[int, str], int | None] = {}  # appended states: the most steps each keeps
        self.next_slot: torch.Tensor | None = None  # after `reserve`: where the next step goes, on the device

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> dict[str, Any]:
        """The states of one layer (empty before its first step)."""
        return self.layers.get(layer_idx, {})

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def advance(self, num_tokens: int) -> None:
        """Called by the model once all layers have consumed `num_tokens` new tokens."""
        self.seen_tokens += num_tokens
        if self.next_slot is not None:
            self.next_slot += num_tokens

    def update(self, layer_idx: int, **states: Any) -> None:
        """Store a linear layer's states: recurrent_state [B, H, K, V] (GSA: a pair), conv_state (a tuple of
        [B, D, W])."""
        for name, value in states.items():
            self._store(layer_idx, name, value)

    def append(self, layer_idx: int, name: str, new: tuple[torch.Tensor, ...],
               keep: int | None) -> tuple[torch.Tensor, ...]:
        """Append [B, T, ...] tensors (time on dim 1) to the ones stored under `name`; store only the last
        `keep` steps (all with None) and return old + new: e.g. an attention layer's keys and values, of
        which a sliding window of W needs W - 1 for the next query. A state that `reserve` made a buffer
        takes the new step at `next_slot` and is returned whole."""
        past = self.layers.get(layer_idx, {}).get(name)
        if self.next_slot is not None and keep is None:
            for buffer, x in zip(past, new):
                buffer.index_copy_(1, self.next_slot, x)
            return past
        if past is not None:
            new = tuple(torch.cat([old, x], dim=1) for old, x in zip(past, new))
        self.kept[(layer_idx, name)] = keep
        length = new[0].shape[1]
        start = 0 if keep is None else length - min(keep, length)
        self._store(layer_idx, name, tuple(x[:, start:] for x in new))
        return new

    def reserve(self, steps: int) -> None:
        """Make room for `steps` more decoding steps of one token in every state that keeps all its steps (an
        attention layer's keys, values and their padding mask, without a window): each becomes a buffer of
        its past steps and `steps` zeros (padding: masked until written), and every later step writes into
        it at the device-side `next_slot`. The states then keep their shapes and no Python value in them
        changes per step: a decoding step can be a CUDA graph (lmlab.eval.decoding)."""
        growing = [key for key, keep in self.kept.items() if keep is None]
        for layer_idx, name in growing:
            past = self.layers[layer_idx][name]
            self.layers[layer_idx][name] = tuple(torch.cat([x, x.new_zeros(x.shape[0], steps, *x.shape[2:])], 1)
                                                 for x in past)
        if growing:
            self.next_slot = torch.tensor([self.seen_tokens], device=past[0].device)

    def _store(self, layer_idx: int, name: str, value: Any) -> None:
        states = self.layers.setdefault(layer_idx, {})
        if self.in_place:
            _copy_into(states.get(name), value, f"layer {layer_idx}'s {name}")
        else:
            states[name] = _own_memory(value)

    def layout(self) -> dict[tuple[int, str], Any]:
        """Every state's shapes and dtypes, by (layer, name): unchanged by a decoding step whose states can
        stay in place."""
        def describe(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return tuple(value.shape), value.dtype
            if isinstance(value, tuple):
                return tuple(describe(v) for v in value)
            return value

        return {(i, name): describe(value) for i, states in self.layers.items() for name, value in states.items()}

    def nbytes(self) -> int:
        """Bytes held by all states (e.g. to size a batch's decoding states, lmlab.eval.scheduling)."""
        return sum(t.nbytes for states in self.layers.values() for value in states.values() for t in _tensors(value))

    def footprint(self) -> tuple[int, list[tuple[int, int | None]]]:
        """Per row: the bytes of the fixed-size states (recurrent, conv, delay), and for each appended state
        (time on dim 1) its bytes per step and the most steps it keeps (None: all). From a cache of one step,
        a row's bytes after any number of tokens (lmlab.eval.scheduling.StateMemory)."""
        fixed, growing = 0, []
        for layer_idx, states in self.layers.items():
            for name, value in states.items():
                row_bytes = sum(t.nbytes // t.shape[0] for t in _tensors(value))
                if (layer_idx, name) not in self.kept:
                    fixed += row_bytes
                elif value[0].shape[1]:  # a window of 1 keeps no past step
                    growing.append((row_bytes // value[0].shape[1], self.kept[(layer_idx, name)]))
        return fixed, growing

    @classmethod
    def concatenate(cls, caches: list[Cache]) -> Cache:
        """One cache holding the rows of `caches` in order (each after the same number of tokens)."""
        if len({cache.seen_tokens for cache in caches}) > 1:
            raise ValueError("caches after different numbers of tokens cannot be concatenated")

        def cat(values: list[Any]) -> Any:
            if isinstance(values[0], torch.Tensor):
                return torch.cat(values)
            if isinstance(values[0], tuple):
                return tuple(cat(list(parts)) for parts in zip(*values))
            return values[0]  # None: an absent state

        merged = cls()
        merged.seen_tokens, merged.kept = caches[0].seen_tokens, dict(caches[0].kept)
        for layer_idx, states in caches[0].layers.items():
            merged.layers[layer_idx] = {name: cat([cache.layers[layer_idx][name] for cache in caches])
                                        for name in states}
        return merged

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t.index_select(0, indices.to(t.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("lmlab's cache holds recurrent states, which cannot be rolled back")

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        def apply(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return fn(value)
            if isinstance(value, tuple):
                return tuple(apply(v) for v in value)
            return value

        for states in self.layers.values():
            for name, value in states.items():
                states[name] = apply(value)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors of a state: a tensor, a tuple of them (nested), or None."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple):
        for part in value:
            yield from _tensors(part)


def _own_memory(value: Any) -> Any:
    """A state (a tensor, a tuple of them, or None) holding no more memory than its own: a view of a larger
    tensor (a sliding window's last keys, Delayed-Streaming's last W steps, sliced from a whole prompt's) is
    copied, else the cache would keep the whole alive."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.untyped_storage().nbytes() > value.nbytes else value
    if isinstance(value, tuple):
        return tuple(_own_memory(part) for part in value)
    return value


def _copy_into(buffer: Any, value: Any, what: str) -> None:
    """Copy a new state (a tensor, a tuple of them, or None) into the buffer holding the old one."""
    if isinstance(value, tuple) and isinstance(buffer, tuple) and len(value) == len(buffer):
        for b, v in zip(buffer, value):
            _copy_into(b, v, what)
    elif isinstance(value, torch.Tensor) and isinstance(buffer, torch.Tensor) \
            and (value.shape, value.dtype) == (buffer.shape, buffer.dtype):
        buffer.copy_(value)
    elif not (value is None and buffer is None):
        raise ValueError(f"an in-place cache cannot take {what}: its shape or dtype changed")
