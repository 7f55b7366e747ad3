"""Checkpointer (single process): exact round trip, atomicity, retention, errors, safe loading, HF export."""
from __future__ import annotations

import dataclasses
import pickle
import random
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchdata.stateful_dataloader import StatefulDataLoader
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmlab import convert
from lmlab.checkpoint import Checkpointer, export_hf
from lmlab.config import Checkpoint, JobConfig
from lmlab.distributed import init_distributed
from lmlab.errors import UserError

VOCAB = 64


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def token_batches(n: int, batch: int = 4, seq: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (batch, seq), generator=gen) for _ in range(n)]


@dataclasses.dataclass
class Counters:
    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]


def make_states(seed: int = 0, hidden: int = 32) -> dict:
    model = tiny_llama(seed, hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    # a shuffled loader over a list: its state holds the sampler's generator and position
    loader = StatefulDataLoader(list(range(40)), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(7))
    return {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler, "dataloader": loader,
            "train_state": Counters()}


def train_steps(states: dict, data_iter, n: int) -> list[tuple]:
    """n optimizer steps; returns (loss, data indices, python/numpy/torch random draws) per step."""
    model, optimizer, scheduler = states["model"], states["optimizer"], states["lr_scheduler"]
    trace = []
    for _ in range(n):
        indices = next(data_iter)
        tokens = torch.stack([token_batches(40)[i][0] for i in indices.tolist()])
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        states["train_state"].step += 1
        states["train_state"].tokens_seen += tokens.numel()
        trace.append((loss.item(), indices.tolist(), random.random(), float(np.random.rand()), torch.rand(()).item()))
    return trace


def checkpointer(tmp_path: Path, **overrides) -> Checkpointer:
    cfg = Checkpoint(enable_checkpoint=True, **overrides)
    return Checkpointer(tmp_path, cfg, init_distributed(JobConfig()))


def test_round_trip_resumes_exactly(tmp_path):
    states = make_states()
    it = iter(states["dataloader"])
    train_steps(states, it, 3)
    ckpt = checkpointer(tmp_path)
    ckpt.save(3, states)
    expected = train_steps(states, it, 4)

    fresh = make_states(seed=1)  # different init: everything must come from the checkpoint
    assert checkpointer(tmp_path).load(fresh) == 3
    assert fresh["train_state"] == Counters(step=3, tokens_seen=3 * 2 * 16)
    assert train_steps(fresh, iter(fresh["dataloader"]), 4) == expected
    assert fresh["lr_scheduler"].last_epoch == states["lr_scheduler"].last_epoch
    saved = tmp_path / "checkpoint" / "step-3"
    assert (saved / "config.json").is_file() and (saved / "lmlab.json").is_file()


def test_disabled_is_a_no_op(tmp_path):
    ckpt = Checkpointer(tmp_path, Checkpoint(enable_checkpoint=False), init_distributed(JobConfig()))
    assert not ckpt.should_save(500, 1000)
    ckpt.save(500, make_states())
    assert ckpt.load(make_states()) == 0 and not (tmp_path / "checkpoint").exists()


def test_should_save_interval_and_last_step(tmp_path):
    ckpt = checkpointer(tmp_path, interval=5)
    assert [s for s in range(1, 13) if ckpt.should_save(s, 12)] == [5, 10, 12]


def test_killed_save_is_ignored_cleaned_and_not_counted(tmp_path):
    states = make_states()
    ckpt = checkpointer(tmp_path, keep_latest_k=2)
    for step in (1, 2):
        ckpt.save(step, states)
    # a save killed half-way: a temp dir with DCP files in it (even a .metadata)
    leftover = tmp_path / "checkpoint" / "step-9.tmp"
    leftover.mkdir()
    (leftover / ".metadata").write_bytes(b"partial")
    assert ckpt.steps() == [1, 2]
    assert checkpointer(tmp_path).load(make_states()) == 2  # never step 9
    assert not leftover.exists()  # the new Checkpointer removed it
    ckpt.save(3, states)
    assert ckpt.steps() == [2, 3]  # keep_latest_k counts complete checkpoints only


def test_load_step_selects_and_missing_step_lists_available(tmp_path):
    states = make_states()
    ckpt = checkpointer(tmp_path)
    ckpt.save(2, states)
    ckpt.save(4, states)
    assert checkpointer(tmp_path, load_step=2).load(make_states()) == 2
    with pytest.raises(UserError, match=r"step-3 .*available: 2, 4\)$") as err:
        checkpointer(tmp_path, load_step=3).load(make_states())
    assert "\n" not in str(err.value)


def test_exclude_from_loading_and_weights_only_final_save(tmp_path):
    states = make_states()
    it = iter(states["dataloader"])
    train_steps(states, it, 2)
    ckpt = checkpointer(tmp_path, last_save_model_weights_only=True, export_dtype="bfloat16")
    ckpt.save(2, states, final=True)
    fresh = make_states(seed=1)
    assert checkpointer(tmp_path).load(fresh) == 2
    for a, b in zip(fresh["model"].parameters(), states["model"].parameters()):
        torch.testing.assert_close(a, b.to(torch.bfloat16).float())
    assert fresh["train_state"].step == 0  # weights only: the rest starts fresh

    ckpt.save(3, states)
    fresh = make_states(seed=1)
    assert checkpointer(tmp_path, exclude_from_loading=["optimizer", "dataloader"]).load(fresh) == 3
    assert not fresh["optimizer"].state and fresh["train_state"].step == 2
    with pytest.raises(UserError, match="unknown state 'optimiser'"):
        checkpointer(tmp_path, exclude_from_loading=["optimiser"]).load(fresh)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    checkpointer(tmp_path).save(1, make_states())
    resumed = r"step-1 was saved from another model config: head_dim is 8 there and 12 now \(and 1 more\)"
    with pytest.raises(UserError, match=resumed):
        checkpointer(tmp_path).load(make_states(hidden=48))  # a resume compares the configs first
    warm_start = checkpointer(tmp_path / "fresh", initial_load_path=str(tmp_path / "checkpoint" / "step-1"))
    with pytest.raises(UserError, match="has shape .* another model config"):
        warm_start.load(make_states(hidden=48))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_in_metadata_is_refused(tmp_path, capsys):
    checkpointer(tmp_path).save(1, make_states())
    (tmp_path / "checkpoint" / "step-1" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserError, match="corrupt or not DCP metadata"):
        checkpointer(tmp_path).load(make_states())
    assert "pwned" not in capsys.readouterr().out


class _FileSizeLimit:
    """RLIMIT_FSIZE: writes past `limit` bytes fail with EFBIG, like a full disk (works as root, unlike chmod)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self):
        self.old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old_limit[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old_limit)
        signal.signal(signal.SIGXFSZ, self.old_handler)


def test_failing_write_raises_one_line_and_keeps_earlier_checkpoints(tmp_path):
    states = make_states()
    ckpt = checkpointer(tmp_path, keep_latest_k=2)
    ckpt.save(1, states)
    ckpt.save(2, states)
    before = {p.name: p.stat().st_size for p in (tmp_path / "checkpoint").rglob("*")}
    with _FileSizeLimit(4096), pytest.raises(UserError, match=r"saving checkpoint .*step-3 failed .*intact") as err:
        ckpt.save(3, states)
    assert "\n" not in str(err.value)
    assert {p.name: p.stat().st_size for p in (tmp_path / "checkpoint").rglob("*")} == before
    assert checkpointer(tmp_path).load(make_states()) == 2


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batches(1)[0]).logits


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_export_hf_reloads_identically_and_leaves_other_files(tmp_path):
    model = tiny_llama()
    (tmp_path / "metrics.jsonl").write_text("keep me\n")
    export_hf(model, tiny_tokenizer(), tmp_path, "float32", init_distributed(JobConfig()))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path)("w3 w5")["input_ids"] == [3, 5]
    assert (tmp_path / "metrics.jsonl").read_text() == "keep me\n"
    assert not list(tmp_path.glob("*.tmp"))

    # a failing export keeps the previous one
    weights = (tmp_path / "model.safetensors").read_bytes()
    with _FileSizeLimit(4096), pytest.raises(UserError, match="previous export is intact"):
        export_hf(tiny_llama(seed=3), None, tmp_path, "float32", init_distributed(JobConfig()))
    assert (tmp_path / "model.safetensors").read_bytes() == weights


# --- lmlab convert ------------------------------------------------------------------------------------

def test_convert_dcp_to_hf_round_trip(tmp_path):
    states = make_states()
    train_steps(states, iter(states["dataloader"]), 2)
    checkpointer(tmp_path).save(2, states)
    assert convert.main(["dcp-to-hf", "--path", str(tmp_path), "--step", "2"]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded), _logits(states["model"]), rtol=0, atol=0)
    assert convert.main(["dcp-to-hf", "--path", str(tmp_path), "--output", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16


def test_convert_dcp_to_hf_missing_step(tmp_path, capsys):
    checkpointer(tmp_path).save(2, make_states())
    assert convert.main(["dcp-to-hf", "--path", str(tmp_path), "--step", "7"]) == 2
    assert "step-7" in capsys.readouterr().err


def test_convert_hf_to_dcp_loads_through_checkpointer(tmp_path):
    hf_model = tiny_llama(seed=3)
    hf_model.save_pretrained(tmp_path / "hf")
    # as the first step of a run's dump (resume path) ...
    step0 = tmp_path / "run" / "checkpoint" / "step-0"
    assert convert.main(["hf-to-dcp", "--model", str(tmp_path / "hf"), "--checkpoint", str(step0)]) == 0
    states = make_states()
    assert checkpointer(tmp_path / "run").load(states) == 0
    torch.testing.assert_close(_logits(states["model"]), _logits(hf_model), rtol=0, atol=0)
    # ... and as a warm start of a fresh run; training then continues and saves normally
    states = make_states()
    assert checkpointer(tmp_path / "fresh", initial_load_path=str(step0)).load(states) == 0
    torch.testing.assert_close(_logits(states["model"]), _logits(hf_model), rtol=0, atol=0)
    train_steps(states, iter(states["dataloader"]), 1)
    checkpointer(tmp_path / "fresh").save(1, states)
    assert checkpointer(tmp_path / "fresh").load(make_states()) == 1
    assert convert.main(["hf-to-dcp", "--model", str(tmp_path / "hf"), "--checkpoint", str(step0)]) == 2


def test_initial_load_accepts_flame_layout(tmp_path):
    """flame/torchtitan keep model keys at the top level of the DCP state dict (no "model." prefix)."""
    source = tiny_llama(seed=3)
    dcp.save(source.state_dict(), checkpoint_id=tmp_path / "flame")
    states = make_states()
    assert checkpointer(tmp_path / "run", initial_load_path=str(tmp_path / "flame")).load(states) == 0
    torch.testing.assert_close(_logits(states["model"]), _logits(source), rtol=0, atol=0)


def test_async_save_snapshots_the_state_at_save_time(tmp_path):
    states = make_states()
    it = iter(states["dataloader"])
    train_steps(states, it, 2)
    ckpt = checkpointer(tmp_path, async_mode="async")
    ckpt.save(2, states)
    expected = train_steps(states, it, 2)  # mutates the weights while the save may still be writing
    ckpt.close()
    fresh = make_states(seed=1)
    assert checkpointer(tmp_path).load(fresh) == 2
    assert train_steps(fresh, iter(fresh["dataloader"]), 2) == expected
