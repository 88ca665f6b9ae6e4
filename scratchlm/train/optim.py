"""Optimizers and the learning-rate schedule.

`pretrain.optimizer = "adamw"`: torch's AdamW, with matrices decayed and norms and embeddings not.
`pretrain.optimizer = "muon"`: Muon for the 2-D hidden matrices (attention and MLP projections)
and AdamW for the rest (embeddings, the output head, norms), as the modded-nanogpt speedrun and
nanochat do. Muon is written here rather than taken from torch.optim.Muon, which orthogonalises in
bf16 (30x slower than fp32 on CPUs without AVX-512) and one matrix at a time, and cannot see the
whole matrix of a sharded (DTensor) parameter.

Each param group carries its own peak learning rate under "base_lr"; the training loop sets
`group["lr"] = group["base_lr"] * lr_factor(step, cfg, elapsed)`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam

from scratchlm.config import TrainConfig

# Quintic Newton-Schulz coefficients from Keller Jordan's Muon: the largest slope at zero for which
# five steps bring every singular value of a unit-norm matrix into about [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def is_hidden_matrix(name: str, param: Tensor) -> bool:
    """A 2-D weight inside the transformer blocks: what Muon trains."""
    return param.ndim == 2 and ".layers." in f".{name}."


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, no_decay_names: Collection[str] = ()
) -> torch.optim.Optimizer:
    """AdamW, or Muon + AdamW (cfg.optimizer). Matrices decay, norms and embeddings do not.
    no_decay_names are further embeddings (a pipeline stage's copy of a tied embedding)."""
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "embed" in name or name in no_decay_names
        if cfg.optimizer == "muon" and is_hidden_matrix(name, p) and not is_embedding:
            hidden.append(p)
        else:
            (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    adamw_groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    params = decay + no_decay + hidden
    # Fused AdamW runs on CPU and CUDA and is 6x faster than foreach on CPU (PLATFORM.md); DTensor
    # parameters (FSDP2, TP) take the foreach path, which supports them everywhere.
    is_dtensor = any(type(p).__name__ == "DTensor" for p in params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params) and not is_dtensor
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            adamw_groups,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=1e-8,
            fused=fused or None,
            foreach=None if fused else True,
        )
    muon_group = {
        "params": hidden,
        "use_muon": True,
        "base_lr": cfg.muon_lr,
        "lr": cfg.muon_lr,
        "weight_decay": cfg.muon_weight_decay,
        "momentum": cfg.muon_momentum,
        "nesterov": True,
        "ns_steps": 5,
    }
    for group in adamw_groups:
        group.update(use_muon=False, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    # An empty group would lose its keys in a torch.distributed.checkpoint (groups are stored
    # under their parameters' names there).
    groups = [g for g in (muon_group, *adamw_groups) if g["params"]]
    return MuonAdamW(groups, fused=fused)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over two kinds of group: Muon where group["use_muon"], AdamW elsewhere.

    Muon keeps a Nesterov momentum of each gradient and steps along its orthogonalisation (the
    nearest matrix with all singular values about 1, by a Newton-Schulz iteration), scaled by
    sqrt(max(1, rows / cols)). Being one torch Optimizer, its state_dict is the usual one (loads
    with weights_only=True) and torch.distributed.checkpoint saves and reshards it like AdamW's.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], fused: bool = False) -> None:
        self.fused = fused
        super().__init__(list(param_groups), defaults={})
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon trains 2-D matrices only")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                # As torch.optim.AdamW stores it, so either optimizer's checkpoint reads the same.
                device = p.device if self.fused else None
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None if self.fused else True,
            fused=self.fused or None,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _muon_step(self, group: dict[str, Any]) -> None:
        momentum, lr, decay = group["momentum"], group["lr"], group["weight_decay"]
        by_shape: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            by_shape.setdefault(tuple(p.shape), []).append((p, update))
        for (rows, cols), pairs in by_shape.items():
            # Same-shaped matrices (one per layer) go through Newton-Schulz as one batch.
            full = torch.stack([_full(update) for _, update in pairs])
            ortho = orthogonalize(full, group["ns_steps"])
            scale = math.sqrt(max(1.0, rows / cols))
            for (p, _), direction in zip(pairs, ortho.unbind(0), strict=True):
                if decay:
                    p.mul_(1 - lr * decay)
                p.add_(_like(direction.to(p.dtype), p), alpha=-lr * scale)


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """U V^T (about) of each matrix g[i] = U S V^T, by the quintic Newton-Schulz iteration: in
    bf16 on GPUs, in fp32 elsewhere. g is [batch, rows, cols]."""
    x = g.to(torch.bfloat16 if g.device.type == "cuda" else torch.float32)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the smaller Gram matrix
        x = x.mT
    # The Frobenius norm bounds the spectral norm: every singular value starts at most 1.
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if transposed else x


def _full(t: Tensor) -> Tensor:
    """The whole matrix of a sharded (DTensor) tensor, gathered from every rank; t otherwise.

    Under FSDP2 or tensor parallelism every rank gathers each matrix and orthogonalises it whole,
    then keeps its own shard of the result: the same work on every rank, but only one all-gather
    of each update per step.
    """
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: Tensor, param: Tensor) -> Tensor:
    """full, sharded as param is (each rank slices its part locally, without communication)."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def lr_factor(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """The learning rate at `step` as a share of the peak, in [0, 1].

    Linear warmup over warmup_steps, then either a cosine decay to min_lr / lr ("cosine"), or
    the peak held until the last decay_fraction of the run and a linear decay to min_lr / lr
    ("wsd": warmup-stable-decay, so a run can be extended from a checkpoint taken before the
    decay). The run ends at max_steps, or at max_seconds of training when that comes first, so a
    run stopped by the clock still ends its schedule (this part then depends on the machine).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_seconds > 0:
        progress = max(progress, elapsed / cfg.max_seconds)
    progress = min(1.0, progress)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    if cfg.schedule == "wsd":
        if progress <= 1.0 - cfg.decay_fraction:
            return 1.0
        return floor + (1.0 - floor) * (1.0 - progress) / cfg.decay_fraction
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))
