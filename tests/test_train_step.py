"""The training step's arithmetic: gradient accumulation equivalence (on a tiny Llama), and the micro-batch
size that fits a GPU (--training.micro_batch_size 0)."""
import lmlab  # noqa: F401  (registers lmlab's model types)
import contextlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmlab import train
from lmlab.distributed import Dist
from lmlab.optim import pending_state_bytes
from lmlab.train import fit_micro_batch, forward_backward, rows_that_fit, split_rows


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def grads_after(model, batch, accum):
    model.zero_grad()
    micro = [{k: v.chunk(accum)[i] for k, v in batch.items()} for i in range(accum)]
    tokens = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    loss_sum = forward_backward(model, micro, torch.device("cpu"), tokens, contextlib.nullcontext())
    return float(loss_sum) / tokens, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_split_gives_the_same_loss_and_gradients():
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (8, 16))
    labels = ids.clone()
    labels[0, :5] = -100  # uneven token counts per micro-batch must still give the step's token mean
    labels[3, 7:] = -100
    batch = {"input_ids": ids, "labels": labels}
    model = tiny_llama()
    loss_1, grads_1 = grads_after(model, batch, accum=1)
    loss_4, grads_4 = grads_after(model, batch, accum=4)
    assert abs(loss_1 - loss_4) < 1e-6
    for name in grads_1:
        torch.testing.assert_close(grads_4[name], grads_1[name], atol=1e-6, rtol=1e-5, msg=name)
    # and it is the plain mean cross-entropy over all the step's tokens
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss
    assert abs(loss_1 - float(reference)) < 1e-6


def test_the_trainer_asks_lmlab_models_for_the_loss_only(monkeypatch):
    """The training step takes lmlab's memory-saving path (no logits) explicitly; other models get no such
    argument (the Llama above)."""
    config = AutoConfig.for_model("gla", hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    outputs = []
    model.register_forward_hook(lambda module, args, output: outputs.append(output))
    ids = torch.randint(0, 64, (2, 8))
    forward_backward(model, [{"input_ids": ids, "labels": ids}], torch.device("cpu"), 14, contextlib.nullcontext())
    assert outputs[0].logits is None and outputs[0].loss is not None


def test_micro_batches_split_rows_and_document_boundaries():
    ids = torch.arange(4 * 6).view(4, 6)
    batch = {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": torch.tensor([0, 4, 6, 12, 15, 18, 24])}
    pieces = split_rows(batch, 2)
    assert [p["input_ids"].tolist() for p in pieces] == [ids[:2].tolist(), ids[2:].tolist()]
    assert [p["cu_seqlens"].tolist() for p in pieces] == [[0, 4, 6, 12], [0, 3, 6, 12]]
    assert split_rows(batch, 0) == [batch] and split_rows(batch, 4) == [batch]


def test_micro_batch_size_gives_the_same_loss_and_gradients():
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (8, 16))
    labels = ids.clone()
    labels[1, :9] = -100
    model = tiny_llama()
    loss_whole, grads_whole = grads_after(model, {"input_ids": ids, "labels": labels}, accum=1)
    model.zero_grad()
    micro = split_rows({"input_ids": ids, "labels": labels}, 2)
    tokens = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    loss_sum = forward_backward(model, micro, torch.device("cpu"), tokens, contextlib.nullcontext())
    assert abs(float(loss_sum) / tokens - loss_whole) < 1e-6
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_whole[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rows_that_fit_takes_the_largest_divisor_within_the_budget():
    assert rows_that_fit(16, fixed=20, per_row=7.5, budget=150) == 16  # 140 fits
    assert rows_that_fit(16, fixed=20, per_row=7.5, budget=72) == 4    # 8 rows need 80; 6 fit but divide not
    assert rows_that_fit(12, fixed=20, per_row=7.5, budget=72) == 6    # divisors of 12: 6 fits
    assert rows_that_fit(16, fixed=20, per_row=7.5, budget=10) == 1    # none fits: one row, the step advises


def test_pending_state_bytes_counts_adams_moments_until_the_first_step():
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters())
    assert pending_state_bytes(optimizer) == 2 * sum(p.nbytes for p in model.parameters())
    model(input_ids=torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss.backward()
    optimizer.step()
    assert pending_state_bytes(optimizer) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fit_micro_batch_measures_rows_and_leaves_no_gradients(monkeypatch):
    """--training.micro_batch_size 0 on a GPU: all rows when they fit; with a budget for fewer, the most rows
    (a divisor) that fit; the probe leaves no gradients behind and the batch untouched."""
    device = torch.device("cuda", torch.cuda.current_device())  # as the trainer's: with its index
    model = tiny_llama().to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    dist = Dist(0, 1, 0, device, None)
    ids = torch.randint(0, 64, (8, 64))
    batch = {"input_ids": ids, "labels": ids.clone()}
    assert fit_micro_batch(model, batch, optimizer, dist, contextlib.nullcontext()) == 0
    assert all(p.grad is None for p in model.parameters()) and torch.equal(batch["input_ids"], ids)
    peaks = []
    monkeypatch.setattr(train, "rows_that_fit", lambda rows, fixed, per_row, budget: peaks.append(
        (fixed, per_row)) or rows_that_fit(rows, fixed, per_row, fixed + 4.5 * per_row))
    assert fit_micro_batch(model, batch, optimizer, dist, contextlib.nullcontext()) == 4
    fixed, per_row = peaks[0]
    assert per_row > 0 and fixed >= pending_state_bytes(optimizer) > 0

    def two_rows_run_out(model, batch, device, autocast):
        if len(batch["input_ids"]) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        return 0

    monkeypatch.setattr(train, "peak_memory", two_rows_run_out)
    assert fit_micro_batch(model, batch, optimizer, dist, contextlib.nullcontext()) == 1
