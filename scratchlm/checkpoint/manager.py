"""The checkpoints of one training stage, as the training loop sees them: `save` and `restore`.

The manager picks the format from the layout: a layout that splits parameters (FSDP2, TP, PP)
writes a sharded (DCP) checkpoint, every rank its own shards; DDP, DeepSpeed (weights gathered from
the ZeRO partitions) and one process write a single file from rank 0. Either format restores at any
layout: a sharded one is resharded by DCP after the model is split, a single-file one is loaded
before it is split and its optimizer state named by parameter and scattered after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm import parallel
from scratchlm.checkpoint.consolidated import load_weights, model_tensors, save_checkpoint
from scratchlm.checkpoint.folder import list_checkpoints
from scratchlm.checkpoint.read import Checkpoint, load_checkpoint
from scratchlm.checkpoint.sharded import (
    is_sharded,
    load_full_optimizer_state,
    load_sharded,
    parameter_order,
    save_sharded,
)
from scratchlm.parallel import DistInfo
from scratchlm.parallel.deepspeed import warn_optimizer_restart

Optimizer = torch.optim.Optimizer
TrainedPart = tuple[nn.Module, Optimizer, dict[str, Any]]
"""A trained model as the loop holds it: (parallelised) model, optimizer, model config."""


class CheckpointManager:
    """Saves a stage's trained models at a step and restores them on resume.

    `plain_optimizer(model)` builds the optimizer of an unsplit model: the positions in a
    single-file checkpoint's optimizer state are that optimizer's."""

    def __init__(
        self,
        stage_dir: Path,
        dist: DistInfo,
        engine: str,
        keep: int,
        plain_optimizer: Callable[[nn.Module], Optimizer],
    ) -> None:
        self.stage_dir, self.dist, self.engine, self.keep = stage_dir, dist, engine, keep
        self.plain_optimizer = plain_optimizer
        self.restored: Checkpoint | None = None

    def resume(self) -> Checkpoint | None:
        """The stage's newest good checkpoint (None without one), verified, with its state; the
        weights are read by `restore` (a sharded checkpoint's only after the model is split)."""
        if list_checkpoints(self.stage_dir):
            self.restored = load_checkpoint(self.stage_dir, consolidate=False)
        return self.restored

    def restore(
        self,
        name: str,
        model: nn.Module,
        prepare: Callable[[nn.Module], tuple[nn.Module, Optimizer]],
    ) -> tuple[nn.Module, Optimizer]:
        """The trained model `name` and its optimizer, restored from the resumed checkpoint (if
        any) around `prepare`, which splits the unsplit `model` over the ranks and gives it an
        optimizer."""
        restored = self.restored
        if restored is None:
            return prepare(model)
        if is_sharded(restored.path):
            model, optimizer = prepare(model)
            load_sharded(restored.path, model, optimizer, part=name)
            return model, optimizer
        load_weights(model, restored.part(name)[0])
        state = None if self.engine == "deepspeed" else restored.optimizer_state(name)
        scatter = state is not None and self.dist.sharded  # named by position: see before splitting
        order = parameter_order(model, self.plain_optimizer(model)) if scatter else []
        model, optimizer = prepare(model)
        if self.engine == "deepspeed":
            warn_optimizer_restart()
        elif scatter:
            load_full_optimizer_state(model, optimizer, state, order)
        elif state is not None:
            optimizer.load_state_dict(state)
        return model, optimizer

    def save(self, step: int, trainer_state: dict[str, Any], parts: dict[str, TrainedPart]) -> Path:
        """Checkpoint every trained model (collective under torchrun); `parts` by name, the
        stage's result first as "model"."""
        if self.dist.sharded:  # every rank writes its own shards
            return save_sharded(
                self.stage_dir, step, parts, trainer_state, self.dist, keep=self.keep
            )
        deepspeed = self.dist.deepspeed
        path = self.stage_dir / f"step-{step:06d}"
        with deepspeed.full_weights() if deepspeed else contextlib.nullcontext():
            if self.dist.is_main:
                saved = {
                    name: (
                        model_tensors(parallel.unwrap(model)),
                        config,
                        None if deepspeed else optimizer.state_dict(),
                    )
                    for name, (model, optimizer, config) in parts.items()
                }
                tensors, config, optimizer_state = saved.pop("model")
                path = save_checkpoint(
                    self.stage_dir,
                    step,
                    tensors,
                    config,
                    trainer_state,
                    optimizer_state,
                    self.keep,
                    others=saved,
                )
        self.dist.barrier()
        return path
