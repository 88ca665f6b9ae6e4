"""AdamW with the usual decay groups, and the warmup + cosine learning-rate schedule (as a factor of
each group's peak rate)."""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from scratchlm.config import TrainConfig


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, no_decay_names: Collection[str] = ()
) -> torch.optim.AdamW:
    """AdamW: matrices decay, norms and embeddings do not; fused kernels where available.
    no_decay_names are further embeddings (a pipeline stage's copy of a tied embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "embed" in name or name in no_decay_names
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    # Each group keeps its peak rate: the loop sets lr = base_lr x the schedule's factor.
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    # Fused AdamW runs on CPU and CUDA and is 6x faster than foreach on CPU (PLATFORM.md); DTensor
    # parameters (FSDP2, TP) take the foreach path, which supports them everywhere.
    params = decay + no_decay
    is_dtensor = any(type(p).__name__ == "DTensor" for p in params)
    device_ok = all(p.device.type in ("cpu", "cuda") for p in params)
    fused = device_ok and not is_dtensor
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=fused or None,
        foreach=None if fused else True,
    )


def lr_factor(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """The learning rate at `step` as a share of the peak: linear warmup over warmup_steps, then
    cosine decay to min_lr / lr.

    The decay ends at max_steps, or at max_seconds of training when that comes first, so a run
    stopped by the clock still ends its schedule (this part then depends on the machine's speed).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_seconds > 0:
        progress = max(progress, elapsed / cfg.max_seconds)
    progress = min(1.0, progress)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))
