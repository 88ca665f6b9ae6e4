"""Parallelism applied to a model from outside: the same model.py runs on one CPU or many GPUs.

Under torchrun (WORLD_SIZE > 1) this initialises torch.distributed (NCCL on GPUs, gloo on CPU),
builds a DeviceMesh with the dimensions (pp, dp_replicate, dp_shard, tp) from the recipe's
[parallel] section, and applies, in torchtitan's order: the pipeline split, tensor parallelism,
activation checkpointing, then FSDP2 (or DDP when data parallelism is only replicated). At world
size 1 nothing is wrapped and every collective here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from scratchlm.config import ParallelConfig
from scratchlm.device import Runtime
from scratchlm.errors import UserError
from scratchlm.parallel.pipeline import PipelineRunner, split_stage

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where collectives' tensors live (NCCL reduces only GPU tensors)."""
    mesh: DeviceMesh | None = None
    pp_rank: int = 0
    pp_size: int = 1
    ddp: bool = False
    fsdp: bool = False
    sharded: bool = False
    """Parameters are split over ranks (FSDP2, TP or PP): checkpoints are written with DCP."""
    pipeline: Any = None
    """The PipelineRunner of this rank's stage when parallel.pp > 1."""
    deepspeed: Any = None
    """The DeepSpeedRunner when parallel.engine = "deepspeed"."""
    tied_copies: set[str] = field(default_factory=set)
    """Names of this stage's copy of a tied embedding that another stage also holds: kept out of
    weight decay (as the embedding is) and counted once in the gradient norm."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.world_size == 1:
            return "1 process"
        if self.mesh is None:
            return f"{self.world_size} processes, data-parallel {self.dp_size}"
        sizes = ", ".join(
            f"{n} {self.mesh[n].size()}" for n in MESH_DIMS if self.mesh[n].size() > 1
        )
        return f"{self.world_size} processes, mesh: {sizes}"

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-rank loss over the ranks that hold one: every data-parallel rank sees
        a different part of the global batch, tensor-parallel ranks hold copies, and under
        pipeline parallelism only the last stage computes the loss (the others pass zeros)."""
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value / (self.world_size // self.pp_size)

    def agree_stop(self, signum: int | None) -> int | None:
        """The stop signal if any rank received one, so that every rank saves at the same step."""
        if self.world_size == 1:
            return signum
        flag = torch.tensor([signum or 0], device=self.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def from_rank0(self, value: float) -> float:
        """Rank 0's value on every rank: clock readings that decide the schedule and the stop."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.broadcast(tensor, src=0)
        return float(tensor.item())


def check_layout(cfg: ParallelConfig, world_size: int) -> None:
    """The degrees must multiply to the world size. parallel.dp_shard = -1 takes what the others
    leave (as in torchtitan), so one recipe runs at any world size; it is resolved here, in cfg.
    A layout that does not fit (a run saved on 2 ranks, resumed on 1) fills the world the same
    way when it can, with a note."""
    rest = cfg.dp_replicate * cfg.tp * cfg.pp
    can_fill = rest > 0 and world_size % rest == 0
    if cfg.dp_shard > 0 and cfg.dp_shard * rest != world_size and can_fill:
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"note: parallel.dp_shard={cfg.dp_shard} does not fit the world size "
                f"{world_size}; using dp_shard={world_size // rest}, as dp_shard=-1 would"
            )
        cfg.dp_shard = world_size // rest
    if cfg.dp_shard == -1:
        cfg.dp_shard = world_size // rest if can_fill else 0
        if cfg.dp_shard < 1:
            raise UserError(
                f"parallel.dp_shard=-1: the world size {world_size} is not a multiple of "
                f"parallel.dp_replicate x tp x pp = {rest}"
            )
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
    if cfg.engine == "deepspeed" and "LOCAL_RANK" not in os.environ:
        raise UserError(
            "parallel.engine='deepspeed' needs a launcher: "
            "torchrun --nproc_per_node=N -m scratchlm pretrain ..."
        )
    if world_size == 1 and cfg.engine != "deepspeed":
        return DistInfo(rank=0, world_size=1, dp_rank=0, dp_size=1)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank = torch_dist.get_rank()
    if cfg.engine == "deepspeed":
        if cfg.tp > 1 or cfg.pp > 1:
            raise UserError("parallel.engine='deepspeed' runs data parallel only: set tp=1, pp=1")
        return DistInfo(rank, world_size, dp_rank=rank, dp_size=world_size, device=device)
    if cfg.dp_replicate == world_size:  # plain DDP: no mesh needed
        return DistInfo(rank, world_size, dp_rank=rank, dp_size=world_size, device=device)
    shape = (cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.tp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
    dp_rank = (
        mesh["dp_replicate"].get_local_rank() * cfg.dp_shard + mesh["dp_shard"].get_local_rank()
    )
    return DistInfo(
        rank=rank,
        world_size=world_size,
        dp_rank=dp_rank,
        dp_size=cfg.dp_replicate * cfg.dp_shard,
        device=device,
        mesh=mesh,
        pp_rank=mesh["pp"].get_local_rank(),
        pp_size=cfg.pp,
        sharded=True,
    )


def apply(
    model: nn.Module,
    dist: DistInfo,
    cfg: ParallelConfig,
    runtime: Runtime,
    micro_batches: int = 1,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Move the model to its device and parallelise it for the recipe's layout.

    Under pipeline parallelism the returned module is this rank's stage, and dist.pipeline runs
    the schedule over `micro_batches` micro-batches with `loss_fn` on the last stage.
    """
    model = model.to(runtime.device)
    if dist.world_size == 1 or dist.mesh is None:
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if dist.world_size == 1 or cfg.engine == "deepspeed":  # DeepSpeed wraps it later
            return model
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        dist.ddp = True
        return wrapped
    mesh = dist.mesh
    if cfg.pp > 1:
        dist.tied_copies = split_stage(model, dist.pp_rank, cfg.pp)
    if cfg.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.dp_shard > 1 or cfg.dp_replicate > 1:
        apply_fsdp(model, mesh["dp_replicate", "dp_shard"], runtime)
        dist.fsdp = True
    if cfg.pp > 1:
        if loss_fn is None:
            raise ValueError("pipeline parallelism needs the loss function")
        dist.pipeline = PipelineRunner(model, dist, cfg, runtime, micro_batches, loss_fn)
    return model


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the data-parallel gradient reduction of `model` (as `apply` returned it) for all but
    the last micro-batch of a step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, runtime: Runtime) -> None:
    """FSDP2: each block, then the root (embeddings, final norm, head), sharded over dp_shard and
    replicated over dp_replicate (HSDP when both exceed 1). On GPUs with bf16, parameters are
    gathered in bf16 and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if runtime.autocast_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=runtime.autocast_dtype, reduce_dtype=torch.float32)
    if dp_mesh["dp_replicate"].size() == 1:
        dp_mesh = dp_mesh["dp_shard"]
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


class ReplicateParallel(ParallelStyle):
    """Keep a module whole on every tensor-parallel rank. Its parameters become DTensors
    (Replicate), so that FSDP2, the optimizer and clipping see one kind of tensor, but the forward
    runs on their local tensors and plain activations: the fused norm and loss are autograd
    Functions written for plain tensors. Every rank computes the same gradient, so none is reduced.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, device_mesh)
        forward = type(module).forward

        def forward_on_local(*args: Any, **kwargs: Any) -> Any:
            params = dict(module._parameters)
            try:
                for name, param in params.items():
                    if isinstance(param, DTensor):
                        module._parameters[name] = param.to_local(grad_placements=[Replicate()])
                return forward(module, *args, **kwargs)
            finally:
                module._parameters.update(params)

        module.forward = forward_on_local
        return module


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style: q/k/v and gate/up column-parallel, output and down projections row-parallel,
    so each block needs one all-reduce after attention and one after the MLP.

    The fused weights are laid out in groups of whole kv heads (see model.py), so a contiguous row
    split keeps whole groups on each rank. Norms, embeddings and the head stay replicated: the fused
    RMSNorm and cross-entropy are hand-written autograd Functions on plain tensors, which rules out
    sequence parallelism and a vocabulary-parallel loss.
    """
    tp = tp_mesh.size()
    first = next(iter(model.layers.values()))
    groups = first.attention.wqkv.out_features // (
        (first.attention.n_rep + 2) * first.attention.head_dim
    )
    if groups % tp:
        raise UserError(f"model.n_kv_heads={groups} does not split over parallel.tp={tp}")
    if first.feed_forward.groups % tp:
        raise UserError(
            f"the SwiGLU hidden size does not split into parallel.tp={tp} groups; "
            "make model.ffn_dim a multiple of model.n_kv_heads"
        )
    for block in model.layers.values():
        parallelize_module(
            block,
            tp_mesh,
            {
                "attention_norm": ReplicateParallel(),
                "attention.wqkv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(),
                "ffn_norm": ReplicateParallel(),
                "feed_forward.w_gate_up": ColwiseParallel(),
                "feed_forward.w_down": RowwiseParallel(),
            },
        )
    tied = (
        model.tok_embeddings is not None
        and model.output is not None
        and model.output.weight is model.tok_embeddings.weight
    )
    for name in ("tok_embeddings", "norm", "output"):
        if getattr(model, name) is not None:
            parallelize_module(getattr(model, name), tp_mesh, ReplicateParallel())
    if tied:
        model.output.weight = model.tok_embeddings.weight


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    The block's forward is replaced on the instance, so parameter names (and checkpoints) do not
    change."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers.values():
        forward = block.forward

        def checkpointed(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def clip_grad_norm_(model: nn.Module, max_norm: float, dist: DistInfo) -> torch.Tensor:
    """torch's clip_grad_norm_, for DTensor and plain gradients alike, with the norm summed over
    pipeline stages; a tied embedding's second copy is clipped but counted once."""
    if dist.world_size == 1 or dist.mesh is None:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    skip = dist.tied_copies
    grads = [p.grad for n, p in model.named_parameters() if p.grad is not None]
    counted = [p.grad for n, p in model.named_parameters() if p.grad is not None and n not in skip]
    squares = torch.zeros((), device=grads[0].device if grads else None)
    for g in counted:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares = squares + norm.square()
    if dist.pp_size > 1:
        torch_dist.all_reduce(squares, group=dist.mesh["pp"].get_group())
    total = squares.sqrt()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for g in grads:
        g.mul_(coef)
    return total


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer inside whatever wrapper `apply` or torch.compile put around it."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def shutdown(dist: DistInfo) -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
