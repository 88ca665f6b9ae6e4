"""DeepSpeed ZeRO-2/3 as an alternative engine (`parallel.engine = "deepspeed"`).

For users who already run DeepSpeed. The training loop's batch and clipping become a generated
DeepSpeed config: the micro-batch, the derived gradient accumulation, clipping and the ZeRO stage.
The optimizer is scratchlm's own AdamW (a client optimizer, so DeepSpeed compiles none of its C++
Adam kernels), and the trainer keeps setting its learning rate every step.

Checkpoints hold the full weights, gathered from the ZeRO partitions into the single-file format,
so they load, export and resume at any layout. DeepSpeed's own checkpoints (its partitioned
optimizer state) are torch.save pickles that `engine.load_checkpoint` reads with full pickle, so
scratchlm never calls it (tests/test_checkpoint_hostile.py checks): a resumed DeepSpeed run
restarts the AdamW moments and says so.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch import nn

from scratchlm.config import ParallelConfig
from scratchlm.device import Runtime
from scratchlm.errors import UserError
from scratchlm.model import cross_entropy_loss


def deepspeed_config(
    parallel_cfg: ParallelConfig, grad_clip: float, runtime: Runtime, micro: int, accum: int
) -> dict[str, Any]:
    """The batch is given per rank: micro-batch rows and micro-batches per step (DeepSpeed
    derives the global batch from the world size)."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": parallel_cfg.zero_stage},
        "bf16": {"enabled": runtime.autocast_dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError:
        raise UserError(
            "parallel.engine='deepspeed' needs DeepSpeed: pip install 'scratchlm[deepspeed]'"
        ) from None
    return deepspeed


class DeepSpeedRunner:
    """Owns the DeepSpeed engine: one training step, and full weights for checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        parallel_cfg: ParallelConfig,
        grad_clip: float,
        runtime: Runtime,
        micro: int,
        accum: int,
    ) -> None:
        if parallel_cfg.zero_stage not in (2, 3):
            raise UserError(f"parallel.zero_stage={parallel_cfg.zero_stage}: expected 2 or 3")
        deepspeed = import_deepspeed()
        self.deepspeed, self.module, self.accum = deepspeed, model, accum
        config = deepspeed_config(parallel_cfg, grad_clip, runtime, micro, accum)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if runtime.autocast_dtype is not None:  # DeepSpeed's bf16 cast also rounded the RoPE tables
            model.init_rope()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Every micro-batch's forward and backward, then the engine's clipped optimizer step.
        Returns the mean loss and the gradient norm before clipping."""
        device = self.engine.device
        loss_sum = torch.zeros((), device=device)
        for micro_x, micro_y in zip(x.chunk(self.accum), y.chunk(self.accum), strict=True):
            loss = cross_entropy_loss(self.engine(micro_x.to(device)), micro_y.to(device))
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
            self.engine.step()  # the optimizer steps at the accumulation boundary only
            loss_sum += loss.detach().float() / self.accum
        norm = self.engine.get_global_grad_norm()
        return loss_sum, float(norm) if norm is not None else float("nan")

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Collective: inside, every parameter is whole on every rank (ZeRO-3 gathers them)."""
        if self.engine.zero_optimization_stage() == 3:
            return self.deepspeed.zero.GatheredParameters(list(self.module.parameters()))
        return contextlib.nullcontext()


def warn_optimizer_restart() -> None:
    print(
        "warning: DeepSpeed runs do not resume optimizer state; the AdamW moments restart",
        file=sys.stderr,
    )
