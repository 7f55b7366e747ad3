"""The decoding steps of greedy generation (`lmlab.eval.scheduling.greedy_generate`): one token for every
row of a batch per step, from the decoding Cache its prompts left.

A decoding step of a 340M model costs about the same at 32 rows as at 128 (54 ms on an H100,
gated_deltanet_340M in bf16): the host launching some 24 layers' kernels, not the GPU's work. So where a
step is one fixed computation it is captured once as a CUDA graph and replayed for every token (`Decoder`):
- the model says its step can be one (`LmlabModel.static_decoding_refusal`): every layer's step reads only
  its cached states and the new token, and HQLT's and softmax attention's the token's position too, which
  `StaticStep` passes as `positions` instead of the attention mask (that grows by a column every step, and
  the step's shapes and positions with it); softmax attention keeps its keys' padding in the cache, with
  the keys;
- softmax attention's KV caches without a window would grow by a key every step: `StaticStep` makes them
  buffers of the prompt + the steps to come once (`Cache.reserve`: the unwritten keys are padding), every
  step writes its key and value at a slot the device counts and attends over the whole buffer. That is the
  memory the batch's rows were sized for (StateMemory: the states after the longest prompt +
  max_new_tokens). The eager step attends over the keys so far, the static one over the same keys and
  masked ones: on CPU their logits differ in float32's last bits (the sums run in another order) and the
  tests' greedy tokens are the same; on an H100 the replayed graph equals the static step run eagerly, bit
  for bit in bf16, and its float32 tokens the growing cache's;
- a step leaves the states' shapes and dtypes as they were (`Cache.layout`, checked after every step
  until it holds: an HQLT window or a sliding attention window of W - 1 keys fills up once the batch has
  seen W - 1 tokens, padding included; until then the step runs eagerly, e.g. Samba's 2048-key windows
  after shorter prompts): from then on the cache keeps its tensors and every step copies its new states
  into them (`Cache.in_place`), so that the graph reads and writes the same memory at every replay. The
  copies double the states' memory traffic (fla's kernels write their final states to new tensors): at
  128 rows of gated_deltanet_340M a step reads and writes 8 GiB of states, and copies them once more.
The graph's inputs are fixed buffers: the token ids, written before each replay, and the positions and KV
slot, which the step advances itself. The eager step just before the capture ran the same code at the same
shapes: its warm-up (Triton compiled and autotuned its kernels there, none of which may happen while
capturing). Everything else decodes as before: each step is the model's forward with the attention mask
grown by one.

Cost of a capture: one pass through the step's Python, as long as an eager step (the kernels are recorded,
not run), the graph's instantiation and torch.cuda.graph's device synchronisation and emptying of the
allocator's cache (the next batch's prompts allocate afresh). A batch decodes up to
max_gen_toks tokens (48 in the paper's generation tasks) at about 54 ms an eager step, so one capture per
batch costs about one step more. Graphs are not kept across batches: their buffers are the batch's own
decoding states (as much as StateMemory sets aside: an eighth of the GPU's free memory), and keeping them
for the next batch of the same size would hold a second set of states while that batch runs its prompts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.models.blocks import token_positions
from lmlab.models.cache import Cache


class StaticStep:
    """One decoding step from fixed buffers, for a model whose `static_decoding_refusal()` is None: the token
    ids `tokens` [R, 1] (the caller writes them), their positions (the step advances them) and the cache's
    states (replaced, or overwritten once `cache.in_place`; KV caches in buffers with room for `steps`
    steps, `Cache.reserve`). No attention mask: every new token is real."""

    def __init__(self, model: torch.nn.Module, cache: Cache, attention_mask: torch.Tensor, steps: int):
        """`attention_mask` [R, L]: the tokens `cache` has seen."""
        self.model, self.cache = model, cache
        cache.reserve(steps)
        self.tokens = attention_mask.new_zeros(attention_mask.shape[0], 1, dtype=torch.long)
        # the next token's position, as the forward derives it from the mask grown by one real token
        grown = F.pad(attention_mask, (0, 1), value=1)
        self.positions = token_positions(grown.shape[0], 1, 0, grown, None, grown.device).clone()

    def __call__(self) -> torch.Tensor:
        """The logits [R, 1, vocab] after `tokens`."""
        logits = self.model(self.tokens, past_key_values=self.cache, positions=self.positions, use_cache=True).logits
        self.positions += 1
        return logits


class Decoder:
    """At most `steps` decoding steps from `cache`, prefilled with a left-padded batch whose `attention_mask`
    [R, L] covers the tokens it has seen: `decoder(tokens [R, 1])` -> the next logits [R, 1, vocab], which
    the following step may overwrite. `how` tells how the steps ran: "cuda_graph" or "eager: <why>".
    `static=False`: every step eager (the reference the graphs are tested against)."""

    def __init__(self, model: torch.nn.Module, cache: Cache, attention_mask: torch.Tensor, steps: int,
                 static: bool = True):
        self.model, self.cache, self.mask, self.steps_left = model, cache, attention_mask, steps
        refusal = model.model.static_decoding_refusal() if static else "static steps off"
        self.step = None if refusal else StaticStep(model, cache, attention_mask, steps)
        self.graph: torch.cuda.CUDAGraph | None = None
        if refusal is None:  # the step runs eagerly until its states keep their shapes
            refusal = "not on CUDA" if not attention_mask.is_cuda else \
                "the decoding states changed shape at every step (a sliding window not yet full)"
        self.how = f"eager: {refusal}"

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.steps_left:  # a static step's KV buffers have no room for more
            raise RuntimeError("this Decoder has taken all the steps it was made for")
        self.steps_left -= 1
        if self.step is None:
            self.mask = F.pad(self.mask, (0, 1), value=1)
            return self.model(tokens, attention_mask=self.mask, past_key_values=self.cache, use_cache=True).logits
        self.step.tokens.copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
            self.cache.seen_tokens += 1  # the graph advanced the device-side count (`next_slot`) itself
            return self.logits
        if self.cache.in_place:
            return self.step()
        layout = self.cache.layout()
        logits = self.step()
        if self.cache.layout() == layout:  # from now on the states stay in these tensors
            self.cache.in_place = True
            if tokens.is_cuda:
                self._capture()
        return logits

    def _capture(self) -> None:
        """Record one step as a CUDA graph, replayed from the next step on. Capturing runs the step's Python,
        not its kernels: the cache's token count is put back."""
        seen, graph = self.cache.seen_tokens, torch.cuda.CUDAGraph()
        # autocast's casts of the weights are cached until its outermost context exits: cast inside the graph
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        with autocast, torch.cuda.graph(graph):
            self.logits = self.step()
        self.cache.seen_tokens = seen
        self.graph, self.how = graph, "cuda_graph"
