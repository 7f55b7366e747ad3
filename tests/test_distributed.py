"""Distributed path with 2 processes: FSDP2 and HSDP match one process, 2 -> 1 rank resharding, per-rank
data loader state, async save; parallelize() on a single process (activation checkpointing, compile, errors).

Runs on CPU/gloo in the default suite; on a machine with 2 GPUs the same tests run on NCCL.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoModelForCausalLM

from lmlab.checkpoint import Checkpointer, export_hf
from lmlab.config import Checkpoint, JobConfig
from lmlab.distributed import Dist, init_distributed, parallelize
from lmlab.errors import UserError
from test_checkpoint import Counters, tiny_llama, token_batches

STEPS_BEFORE_SAVE, STEPS_AFTER_SAVE = 3, 2
GLOBAL_BATCH = 4


def job_config(**training) -> JobConfig:
    cfg = JobConfig()
    cfg.training = dataclasses.replace(cfg.training, mixed_precision_param="float32", **training)
    return cfg


def build(seed: int, cfg: JobConfig, dist: Dist) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = parallelize(tiny_llama(seed), cfg, dist)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: Dist, steps: range) -> list[float]:
    """Each rank takes its slice of the global batch; returns the global mean loss per step."""
    per_rank = GLOBAL_BATCH // dist.world_size
    losses = []
    for step in steps:
        tokens = token_batches(step + 1, batch=GLOBAL_BATCH)[step][dist.rank * per_rank:(dist.rank + 1) * per_rank]
        tokens = tokens.to(dist.device)
        # equal token counts per rank, so FSDP's gradient mean is the global mean
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(dist.all_reduce(loss.detach().clone(), "sum")) / dist.world_size)
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dump = Path(out) / "dump"
    cfg = job_config()
    cfg.activation_checkpoint.mode = "full"  # AC composed with FSDP2 must not change the numbers
    dist = init_distributed(cfg)
    results: dict = {}

    model, optimizer = build(0, cfg, dist)
    loader = StatefulDataLoader(list(range(100 * rank, 100 * rank + 10)), batch_size=2)
    it = iter(loader)
    next(it)
    states = {"model": model, "optimizer": optimizer, "dataloader": loader, "train_state": Counters(step=3)}
    results["fsdp"] = train(model, optimizer, dist, range(STEPS_BEFORE_SAVE))
    dist.use_train_timeout()
    Checkpointer(dump, Checkpoint(enable_checkpoint=True), dist).save(STEPS_BEFORE_SAVE, states)
    export_hf(model, None, dump, "float32", dist)
    async_ckpt = Checkpointer(dump, Checkpoint(enable_checkpoint=True, folder="async", async_mode="async"), dist)
    async_ckpt.save(STEPS_BEFORE_SAVE, states)
    train(model, optimizer, dist, range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + 1))  # collectives meanwhile
    async_ckpt.close()

    # each rank restores its own data loader position
    expected_next = next(it).tolist()
    fresh_model, fresh_optimizer = build(5, cfg, dist)
    fresh_loader = StatefulDataLoader(list(range(100 * rank, 100 * rank + 10)), batch_size=2)
    fresh = {**states, "model": fresh_model, "optimizer": fresh_optimizer, "dataloader": fresh_loader}
    assert Checkpointer(dump, Checkpoint(enable_checkpoint=True), dist).load(fresh) == STEPS_BEFORE_SAVE
    results["next_batch_ok"] = next(iter(fresh_loader)).tolist() == expected_next

    # HSDP: replicate 2 x shard 1
    mesh = init_device_mesh(dist.device.type, (2, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
    hsdp = dataclasses.replace(dist, mesh=mesh)
    results["hsdp"] = train(*build(0, cfg, hsdp), hsdp, range(STEPS_BEFORE_SAVE))

    if dist.is_main:
        (Path(out) / "results.json").write_text(json.dumps(results))
    dist.close()


def _gpu_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """The production settings: bf16 params, compiled blocks, selective op AC, pinned async saves."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = JobConfig()
    cfg.training.compile = True
    cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_ac_option = "selective", "op"
    dist = init_distributed(cfg)
    model, optimizer = build(0, cfg, dist)
    ckpt_cfg = Checkpoint(enable_checkpoint=True, async_mode="async_with_pinned_mem", keep_latest_k=2)
    ckpt = Checkpointer(Path(out), ckpt_cfg, dist)
    losses = []
    for step in range(1, 9):
        losses += train(model, optimizer, dist, range(1))  # the same batch: the loss must fall
        ckpt.save(step, {"model": model, "optimizer": optimizer})
    ckpt.close()
    fresh_model, fresh_optimizer = build(1, cfg, dist)
    assert ckpt.load({"model": fresh_model, "optimizer": fresh_optimizer}) == 8
    for a, b in zip(fresh_model.parameters(), model.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())
    if dist.is_main:
        (Path(out) / "losses.json").write_text(json.dumps({"losses": losses, "steps": ckpt.steps()}))
    dist.close()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_bf16_compile_selective_ac_async(tmp_path):
    mp.spawn(_gpu_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "losses.json").read_text())
    assert all(l == l for l in result["losses"]) and result["losses"][-1] < result["losses"][0]
    assert result["steps"] == [7, 8]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


def single_process(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Dist]:
    cfg = job_config()
    dist = init_distributed(cfg)
    return *build(seed, cfg, dist), dist


def test_two_ranks_match_one_process(two_rank_run):
    results = json.loads((two_rank_run / "results.json").read_text())
    reference = train(*single_process(), range(STEPS_BEFORE_SAVE))
    for name in ("fsdp", "hsdp"):
        assert results[name] == pytest.approx(reference, abs=1e-5), name
    assert results["next_batch_ok"]


def test_two_rank_checkpoint_loads_on_one_rank(two_rank_run):
    reference = train(*single_process(), range(STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE))
    model, optimizer, dist = single_process(seed=5)
    states = {"model": model, "optimizer": optimizer, "dataloader": StatefulDataLoader([0, 1]), "train_state": Counters()}
    with pytest.raises(UserError, match="saved by 2 ranks.*exclude_from_loading dataloader"):
        Checkpointer(two_rank_run / "dump", Checkpoint(enable_checkpoint=True), dist).load(states)
    cfg = Checkpoint(enable_checkpoint=True, exclude_from_loading=["dataloader"])
    assert Checkpointer(two_rank_run / "dump", cfg, dist).load(states) == STEPS_BEFORE_SAVE
    # model and optimizer resharded: training continues exactly as the uninterrupted single process
    resumed = train(model, optimizer, dist, range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE))
    assert resumed == pytest.approx(reference[STEPS_BEFORE_SAVE:], abs=1e-5)

    # the async save holds the same weights as the synchronous one, although training went on meanwhile
    from_async = {"model": tiny_llama(seed=6), "dataloader": StatefulDataLoader([0, 1])}
    cfg = Checkpoint(enable_checkpoint=True, folder="async", exclude_from_loading=["dataloader"])
    assert Checkpointer(two_rank_run / "dump", cfg, dist).load(from_async) == STEPS_BEFORE_SAVE
    from_sync = {"model": tiny_llama(seed=6), "dataloader": StatefulDataLoader([0, 1])}
    cfg = Checkpoint(enable_checkpoint=True, exclude_from_loading=["dataloader"])
    Checkpointer(two_rank_run / "dump", cfg, dist).load(from_sync)
    for a, b in zip(from_async["model"].parameters(), from_sync["model"].parameters()):
        assert torch.equal(a, b)


def test_two_rank_hf_export_reloads(two_rank_run):
    exported = AutoModelForCausalLM.from_pretrained(two_rank_run / "dump")
    model, optimizer, dist = single_process()
    train(model, optimizer, dist, range(STEPS_BEFORE_SAVE))
    tokens = token_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=tokens).logits, model.cpu()(input_ids=tokens).logits,
                                   atol=1e-5, rtol=1e-5)


# --- single process ---------------------------------------------------------------------------------

def grads_after_step(mode: str, option: str = "2") -> list[torch.Tensor]:
    cfg = job_config()
    cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_ac_option = mode, option
    dist = init_distributed(cfg)
    model = parallelize(tiny_llama(), cfg, dist)
    tokens = token_batches(1)[0].to(dist.device)
    # use_cache=False as in training: a KV cache filled by the forward would change the recomputation
    model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("mode,option", [("full", "2"), ("selective", "2"), ("selective", "op")])
def test_activation_checkpointing_keeps_gradients_and_names(mode, option):
    reference = grads_after_step("none")
    for got, want in zip(grads_after_step(mode, option), reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    cfg = job_config()
    cfg.activation_checkpoint.mode = mode
    model = parallelize(tiny_llama(), cfg, init_distributed(cfg))
    assert set(model.state_dict()) == set(tiny_llama().state_dict())


def test_parallelize_errors():
    cfg = job_config()
    with pytest.raises(UserError, match="model.model.layers"):
        parallelize(torch.nn.Linear(2, 2), cfg, init_distributed(cfg))
    cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_ac_option = "selective", "x"
    with pytest.raises(UserError, match="selective_ac_option"):
        parallelize(tiny_llama(), cfg, init_distributed(cfg))
    with pytest.raises(UserError, match="data parallel degrees"):
        init_distributed(job_config(data_parallel_shard_degree=2))


@pytest.mark.slow
def test_compile_compiles_every_block(capsys):
    cfg = job_config(compile=True)
    dist = init_distributed(cfg)
    model = parallelize(tiny_llama(), cfg, dist)
    assert "compiled 2" in capsys.readouterr().out
    tokens = token_batches(1)[0].to(dist.device)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, tiny_llama().to(dist.device)(input_ids=tokens).logits)
