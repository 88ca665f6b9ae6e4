"""Pipeline parallelism through torch.distributed.pipelining: stage split, schedule, evaluation.

The model is cut between blocks, the layers split evenly over `parallel.pp` stages: the first
stage keeps the token embeddings, the last the final norm and the output head (model.py accepts
None for those). A tied embedding lives on both the first and the last stage, as in Megatron: the
two copies start equal, their gradients are summed after each backward, so they stay equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor

from scratchlm.config import ParallelConfig
from scratchlm.device import Runtime
from scratchlm.errors import UserError

if TYPE_CHECKING:
    from scratchlm.parallel import DistInfo


def stage_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Layer indices of each stage: an even split, the first stages one longer when uneven."""
    if n_layers < n_stages:
        raise UserError(f"model.n_layers={n_layers} is fewer than parallel.pp={n_stages} stages")
    per, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for stage in range(n_stages):
        end = start + per + (1 if stage < extra else 0)
        bounds.append(list(range(start, end)))
        start = end
    return bounds


def split_stage(model: nn.Module, stage: int, n_stages: int) -> set[str]:
    """Cut the model down to its stage in place; returns the names of tied-embedding copies on
    this stage that the optimizer must treat as embeddings (no weight decay)."""
    mine = {str(i) for i in stage_layers(len(model.layers), n_stages)[stage]}
    for name in list(model.layers.keys()):
        if name not in mine:
            del model.layers[name]
    tied = model.config.tie_embeddings
    if stage > 0:
        model.tok_embeddings = None
    if stage < n_stages - 1:
        model.norm = None
        model.output = None
    return {"output.weight"} if tied and stage == n_stages - 1 and n_stages > 1 else set()


class PipelineRunner:
    """Runs one training step (all micro-batches) through this rank's stage of the schedule."""

    def __init__(
        self,
        stage_module: nn.Module,
        dist: DistInfo,
        cfg: ParallelConfig,
        runtime: Runtime,
        micro_batches: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        if cfg.pp_schedule == "1f1b" and micro_batches < cfg.pp:
            raise UserError(
                f"parallel.pp_schedule='1f1b' needs at least parallel.pp={cfg.pp} micro-batches "
                f"per step, got {micro_batches}; raise pretrain.tokens_per_step or lower "
                "pretrain.micro_batch_size"
            )
        assert dist.mesh is not None
        self.module, self.runtime = stage_module, runtime
        self.micro_batches = micro_batches
        self.is_first, self.is_last = dist.pp_rank == 0, dist.pp_rank == cfg.pp - 1
        pp_group = dist.mesh["pp"].get_group()
        self.pp_group = pp_group
        self.last_rank = torch_dist.get_global_rank(pp_group, cfg.pp - 1)
        stage = PipelineStage(stage_module, dist.pp_rank, cfg.pp, runtime.device, group=pp_group)
        schedule = ScheduleGPipe if cfg.pp_schedule == "gpipe" else Schedule1F1B
        self.schedule = schedule(stage, n_microbatches=micro_batches, loss_fn=loss_fn)
        self.tied_group = self._tied_group(dist) if stage_module.config.tie_embeddings else None

    def whole_model(self, rows: int, seq_len: int, vocab_size: int) -> PipelineForward:
        """A forward-only module over all stages, for evaluation (batches of up to `rows`)."""
        return PipelineForward(self, rows, seq_len, vocab_size)

    @staticmethod
    def _tied_group(dist: DistInfo) -> torch_dist.ProcessGroup | None:
        """The group of the first and last stage of this rank's pipeline (new_group is collective,
        so every rank creates every pipeline's group)."""
        assert dist.mesh is not None
        columns = dist.mesh.mesh.reshape(dist.pp_size, -1)
        mine = None
        for column in range(columns.shape[1]):
            ranks = [int(columns[0, column]), int(columns[-1, column])]
            group = torch_dist.new_group(ranks)
            if dist.rank in ranks:
                mine = group
        return mine

    def _tied_weight(self) -> torch.Tensor | None:
        if self.is_first:
            return self.module.tok_embeddings.weight
        if self.is_last:
            return self.module.output.weight
        return None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch; the mean loss on the last stage, else 0."""
        device = self.runtime.device
        losses: list[torch.Tensor] = []
        inputs = (x.to(device),) if self.is_first else ()
        target = y.to(device) if self.is_last else None
        with self.runtime.autocast():
            self.schedule.step(*inputs, target=target, losses=losses)
        weight = self._tied_weight()
        if self.tied_group is not None and weight is not None and weight.grad is not None:
            grad = weight.grad
            torch_dist.all_reduce(
                grad.to_local() if isinstance(grad, DTensor) else grad, group=self.tied_group
            )
        if self.is_last:
            return torch.stack([loss.detach() for loss in losses]).mean()
        return torch.zeros((), device=device)


class PipelineForward(nn.Module):
    """A forward-only view of the whole pipeline for evaluation: model(tokens) -> logits on every
    stage. Batches are padded to the training shape, which the stages' buffers are sized for."""

    def __init__(self, runner: PipelineRunner, rows: int, seq_len: int, vocab_size: int) -> None:
        super().__init__()
        self.runner, self.rows, self.seq_len, self.vocab_size = runner, rows, seq_len, vocab_size
        self.stage = runner.module  # registered so train()/eval() reach it

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        runner, (batch, length) = self.runner, tokens.shape
        if batch > self.rows or length > self.seq_len:
            raise ValueError(f"evaluation batch {tuple(tokens.shape)} exceeds the training shape")
        padded = F.pad(tokens, (0, self.seq_len - length, 0, self.rows - batch))
        logits = torch.empty(self.rows, self.seq_len, self.vocab_size, device=runner.runtime.device)
        padded = padded.to(runner.runtime.device)
        inputs = (padded,) if runner.is_first else ()
        # The schedule computes the (unused) loss on the last stage, so it needs some target.
        target = padded if runner.is_last else None
        with runner.runtime.autocast():
            out = runner.schedule.eval(*inputs, target=target, losses=[])
        if runner.is_last:
            logits.copy_(out)
        torch_dist.broadcast(logits, src=runner.last_rank, group=runner.pp_group)
        return logits[:batch, :length]
