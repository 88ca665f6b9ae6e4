"""Parallelism applied to a model from outside: the same model.py runs on one CPU or many GPUs.

Under torchrun (WORLD_SIZE > 1) this initialises torch.distributed (NCCL on GPUs, gloo on CPU) and
wraps the model for the layout the recipe's [parallel] section names. At world size 1 every
collective here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from scratchlm.config import ParallelConfig
from scratchlm.errors import UserError
from scratchlm.train.device import Runtime


@dataclass
class DistInfo:
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    ddp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.world_size == 1:
            return "1 process"
        return f"{self.world_size} processes, data-parallel {self.dp_size}"

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks (each saw a different part of the global batch)."""
        if self.dp_size == 1:
            return value
        value = value.detach().clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value / self.dp_size

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP's no_sync() for all but the last micro-batch of a step."""
        if self.ddp and not sync and self._model is not None:
            return self._model.no_sync()
        return contextlib.nullcontext()

    _model: torch.nn.Module | None = None


def check_layout(cfg: ParallelConfig, world_size: int) -> None:
    degrees = {
        "dp_replicate": cfg.dp_replicate,
        "dp_shard": cfg.dp_shard,
        "tp": cfg.tp,
        "pp": cfg.pp,
    }
    for key, value in degrees.items():
        if value < 1:
            raise UserError(f"parallel.{key}={value} must be at least 1")
    product = cfg.dp_replicate * cfg.dp_shard * cfg.tp * cfg.pp
    if product != world_size:
        named = " x ".join(f"parallel.{k}={v}" for k, v in degrees.items())
        raise UserError(f"{named} = {product}, but the world size is {world_size}")


def init(cfg: ParallelConfig, device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment; world size 1 without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(cfg, world_size)
    if world_size == 1:
        return DistInfo(rank=0, world_size=1, dp_rank=0, dp_size=1)
    if cfg.dp_shard > 1 or cfg.tp > 1 or cfg.pp > 1:
        raise UserError("parallel.dp_shard, tp and pp are not available yet; use dp_replicate")
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank = torch_dist.get_rank()
    return DistInfo(rank=rank, world_size=world_size, dp_rank=rank, dp_size=world_size)


def apply(
    model: torch.nn.Module, dist: DistInfo, cfg: ParallelConfig, runtime: Runtime
) -> torch.nn.Module:
    """Move the model to its device and wrap it for the recipe's layout."""
    model = model.to(runtime.device)
    if dist.world_size == 1:
        return model
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    dist.ddp = True
    dist._model = wrapped
    return wrapped


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain Transformer inside whatever wrapper `apply` or torch.compile put around it."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def shutdown(dist: DistInfo) -> None:
    if dist.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
