"""Process groups and model parallelization: torchrun, FSDP2, activation checkpointing, per-block compile.

Usage (in this order):

    dist = init_distributed(cfg)              # reads torchrun's env; a plain `python` run is a single process
    model = build_model(...).to(dist.device)
    model = parallelize(model, cfg, dist)     # AC -> torch.compile -> FSDP2, each per block of model.model.layers
    ...
    total = dist.all_reduce(torch.tensor(n, device=dist.device), "sum")   # metrics: "sum" | "max" | "min"
    dist.barrier()
    dist.close()

- Backend: NCCL for CUDA tensors (plus gloo for CPU tensors, which DCP's async save needs) when CUDA is
  available, else gloo. Each process uses `cuda:LOCAL_RANK`. Timeouts: `comm.init_timeout_seconds` until
  `dist.use_train_timeout()` (call it after the first step, which may compile), then
  `comm.train_timeout_seconds`.
- Without torchrun's env (`RANK`, `WORLD_SIZE`, ...) no process group is created: world size 1, the
  collectives are no-ops and DCP runs in its single-process mode.
- Every rank is a data-parallel rank: the data loader shards by `dist.rank` / `dist.world_size`.
  `dist.mesh` is a 1-D mesh `("dp_shard",)` (FSDP), or 2-D `("dp_replicate", "dp_shard")` when
  `training.data_parallel_replicate_degree > 1` (HSDP: shard within groups, replicate across them);
  `data_parallel_shard_degree -1` takes all remaining ranks. None for a single process.
- Mixed precision: with FSDP2 (world size > 1) the `MixedPrecisionPolicy` casts parameters to
  `mixed_precision_param` for compute and reduces gradients in `mixed_precision_reduce`, keeping fp32
  master weights. A single process keeps a plain fp32 module: the trainer wraps forward in
  `torch.autocast(device, dtype=mixed_precision_param)` (weights stay fp32, as with FSDP2).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from lmlab.config import JobConfig
from lmlab.errors import UserError

_REDUCE_OPS = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Dist:
    """This process's place in the job. Collectives are no-ops when `world_size == 1`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None
    train_timeout_seconds: int = 100

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return torch_dist.is_available() and torch_dist.is_initialized()

    def barrier(self) -> None:
        if self.initialized:
            # gloo ignores device_ids; NCCL needs it to avoid guessing the device of this rank
            kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            torch_dist.barrier(**kwargs)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` in place over all ranks ("sum", "max" or "min") and return it."""
        if self.initialized:
            torch_dist.all_reduce(tensor, op=_REDUCE_OPS[op])
        return tensor

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff `flag` is True on every rank (lets one rank's failure stop all)."""
        return bool(self.all_reduce(torch.tensor(int(flag), device=self.device), "min"))

    def use_train_timeout(self) -> None:
        """Switch collectives from the (long) init timeout to `comm.train_timeout_seconds`."""
        if self.initialized:
            timeout = datetime.timedelta(seconds=self.train_timeout_seconds)
            torch_dist.distributed_c10d._set_pg_timeout(timeout, None)

    def close(self) -> None:
        if self.initialized:
            torch_dist.destroy_process_group()


def init_distributed(cfg: JobConfig) -> Dist:
    """Join the torchrun job described by the environment (or run alone) and build the data-parallel mesh."""
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _mesh_shape(cfg, world_size=1)  # reject degrees that need more processes
        return Dist(0, 1, 0, device, None, cfg.comm.train_timeout_seconds)

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    shape = _mesh_shape(cfg, world_size)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    torch_dist.init_process_group(
        backend, timeout=datetime.timedelta(seconds=cfg.comm.init_timeout_seconds), device_id=_device_id(device)
    )
    mesh = None
    if world_size > 1:
        names = ("dp_replicate", "dp_shard") if len(shape) == 2 else ("dp_shard",)
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    return Dist(rank, world_size, local_rank, device, mesh, cfg.comm.train_timeout_seconds)


def _device_id(device: torch.device) -> torch.device | None:
    # Binding the process group to the CUDA device makes NCCL initialize eagerly and skip device guessing.
    return device if device.type == "cuda" else None


def _mesh_shape(cfg: JobConfig, world_size: int) -> tuple[int, ...]:
    """(shard,) or (replicate, shard) from the degrees; UserError when they don't multiply to world_size."""
    t = cfg.training
    replicate, shard = t.data_parallel_replicate_degree, t.data_parallel_shard_degree
    if replicate < 1 or world_size % replicate:
        raise UserError(
            f"--training.data_parallel_replicate_degree {replicate} must be >= 1 and divide the {world_size} processes"
        )
    if shard == -1:
        shard = world_size // replicate
    if shard < 1 or replicate * shard != world_size:
        raise UserError(
            f"data parallel degrees replicate {replicate} x shard {t.data_parallel_shard_degree} "
            f"!= {world_size} processes; use --training.data_parallel_shard_degree -1 to take the remaining ranks"
        )
    return (replicate, shard) if replicate > 1 else (shard,)


# Matmuls and attention are expensive to recompute and their outputs are what selective AC keeps; every
# other op (norms, activations, elementwise) is recomputed in backward.
_SAVED_OP_NAMES = (
    "mm",
    "addmm",
    "bmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def _saved_ops() -> list:
    return [getattr(torch.ops.aten, name).default for name in _SAVED_OP_NAMES if hasattr(torch.ops.aten, name)]


def _checkpointed_blocks(cfg: JobConfig, n_blocks: int) -> tuple[list[int], dict]:
    """Which blocks get activation checkpointing, and the checkpoint_wrapper kwargs."""
    ac = cfg.activation_checkpoint
    if ac.mode == "none":
        return [], {}
    if ac.mode == "full":
        return list(range(n_blocks)), {}
    option = ac.selective_ac_option
    if option == "op":
        return list(range(n_blocks)), {"context_fn": partial(create_selective_checkpoint_contexts, _saved_ops())}
    if not option.isdigit() or int(option) < 1:
        raise UserError(f"--activation_checkpoint.selective_ac_option must be 'op' or a positive integer, got {option!r}")
    every = int(option)
    return [i for i in range(n_blocks) if i % every == 0], {}


def _reshard_after_forward(policy: str, index: int, n_blocks: int) -> bool:
    if policy == "always":
        return True
    if policy == "never":
        return False
    # default: the last block's parameters are needed again right away by backward, so keep them gathered
    return index < n_blocks - 1


def parallelize(model: nn.Module, cfg: JobConfig, dist: Dist) -> nn.Module:
    """Apply activation checkpointing, torch.compile and FSDP2 to each block of `model.model.layers`.

    Order matters: AC wraps the block, compile traces the wrapped block (so recomputation is compiled
    too), and FSDP2 shards last so its hooks stay outside the compiled region. Parameter names (and so
    checkpoint keys) do not change: compile is applied in place and DCP's state-dict helpers strip the
    AC wrapper's prefix. The main rank prints one line saying what was applied (e.g. "compiled 24 blocks").
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(
            f"{type(model).__name__} has no block list at model.model.layers (an nn.ModuleList); "
            "lmlab can only train causal LMs laid out like HF Llama / fla models"
        )
    t = cfg.training
    n_blocks = len(layers)
    checkpointed, ac_kwargs = _checkpointed_blocks(cfg, n_blocks)
    for i in checkpointed:
        layers[i] = checkpoint_wrapper(layers[i], **ac_kwargs)
    if t.compile:
        for block in layers:
            block.compile()  # in place: keeps parameter names (torch.compile(block) would add "_orig_mod.")
    compiled = sum(getattr(block, "_compiled_call_impl", None) is not None for block in layers)

    if dist.world_size > 1:
        fsdp_kwargs: dict = {
            "mesh": dist.mesh,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=DTYPES[t.mixed_precision_param], reduce_dtype=DTYPES[t.mixed_precision_reduce]
            ),
        }
        if t.enable_cpu_offload:
            fsdp_kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda")
        for i, block in enumerate(layers):
            fully_shard(
                block, reshard_after_forward=_reshard_after_forward(t.fsdp_reshard_after_forward, i, n_blocks),
                **fsdp_kwargs,
            )
        fully_shard(model, **fsdp_kwargs)  # the root: embeddings, final norm, head (FSDP2 places the shards)
    elif t.enable_cpu_offload:
        raise UserError("--training.enable_cpu_offload needs FSDP2, i.e. more than one process (torchrun)")
    else:
        model.to(dist.device)

    if dist.is_main:
        fsdp = f"FSDP2 over mesh {dict(zip(dist.mesh.mesh_dim_names, dist.mesh.shape))}" if dist.mesh else "no FSDP"
        print(
            f"lmlab: {n_blocks} blocks; activation checkpointing on {len(checkpointed)} "
            f"({cfg.activation_checkpoint.mode}); compiled {compiled}; {fsdp}",
            flush=True,
        )
    return model
