"""Every alignment loss, in one file (as OpenRLHF's models/loss.py): what each stage minimises.

Supervised and preference losses first; the reinforcement-learning losses (PPO, GAE, the KL
estimators, GRPO) follow in their own section at the end. Shapes: B rows, T positions, V tokens.
Each function takes plain tensors and returns the mean over the batch, so the training loop can
average micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchlm.model import cross_entropy_loss

IGNORE = -100
"""A target that no loss counts (prompt tokens, padding, the boundary between packed chats)."""


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where mask is true (the assistant's tokens
    in SFT): -sum_t mask_t log p(targets_t) / sum_t mask_t. logits [B, T, V], targets and mask
    [B, T]. A batch without any masked position gives 0."""
    return cross_entropy_loss(logits, targets.masked_fill(~mask.bool(), IGNORE))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets_t) under softmax(logits_t), [B, T], computed in fp32 at least; a target of
    IGNORE gives 0."""
    logits = logits.float()
    safe = targets.clamp(min=0).unsqueeze(-1)
    logp = logits.gather(-1, safe).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp.masked_fill(targets == IGNORE, 0.0)


def sequence_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """log p(response | prompt) of each row: the sum over masked positions of log p(targets_t),
    [B]; with average=True the mean over them (IPO's length-normalised form)."""
    mask = mask.to(torch.float32)
    total = (token_logprobs(logits, targets) * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Pairwise reward-model loss: mean of -log sigmoid(r_chosen - r_rejected - margin).

    The margin (Llama 2's reward models) asks pairs rated far apart to be scored further apart;
    None or 0 is the plain Bradley-Terry likelihood."""
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation on sequence log-probabilities [B].

    With h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)):
      sigmoid (DPO):          -log sigmoid(beta h)
      sigmoid, smoothing e:   -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
                              (conservative DPO: each label is wrong with probability e)
      ipo (IPO):              (h - 1 / (2 beta))^2
    Returns (mean loss, the implicit rewards beta (log pi - log ref) of chosen and of rejected).
    """
    chosen_ratio = policy_chosen.float() - reference_chosen.float()
    rejected_ratio = policy_rejected.float() - reference_rejected.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# --- reinforcement learning ---
