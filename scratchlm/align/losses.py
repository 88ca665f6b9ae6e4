"""Every alignment loss, in one file (as OpenRLHF's models/loss.py): what each stage minimises.

Supervised and preference losses first; the reinforcement-learning losses (PPO, GAE, the KL
estimators, GRPO) follow in their own section at the end. Shapes: B rows, T positions, V tokens.
Each function takes plain tensors and returns the mean over the batch, so the training loop can
average micro-batches.
"""

from __future__ import annotations

from typing import Literal

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
# Shapes: B rows (responses), T response positions; `mask` [B, T] is 1 on a response's tokens and 0
# on the padding after it (responses are right-padded). Log-probabilities are per token.

KLEstimator = Literal["k1", "k2", "k3"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (over all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x shifted to mean 0 and scaled to variance 1 over the masked positions (the population
    variance); positions outside the mask become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    With log r = log pi(x) - log pi_ref(x) (Schulman, "Approximating KL divergence", 2020):
    k1 = log r (unbiased, can be negative), k2 = (log r)^2 / 2 (biased, low variance),
    k3 = exp(-log r) - 1 + log r (unbiased and never negative; GRPO's choice).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: expected k1, k2 or k3")


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over right-padded responses.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after a response's last token, and
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = advantages + values),
    both 0 on padding.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al., 2017), the mean over response tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = pi / pi_old.

    Also returns the share of tokens where the clipped term won (clip_fraction) and the k3
    estimate of KL(pi_old || pi) (approx_kl), both without gradient.
    """
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's clipped loss: 0.5 * the mean over response tokens of
    max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -eps, eps), so one
    rollout cannot move the value far (as OpenAI's baselines and OpenRLHF clip it)."""
    values = values.float()
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_loss = (values - returns).square()
    clipped_loss = (clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((clipped_loss > unclipped_loss).float(), mask)}
    return loss, stats


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO's advantages (Shao et al., 2024): each reward minus the mean of its group of
    `group_size` samples of one prompt, divided by the group's standard deviation (unbiased,
    + 1e-4) when `scale`. rewards [N * group_size], groups contiguous; returns the same shape."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centred.view(-1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective as a loss: per token -min(ratio * A, clip(ratio) * A) + kl_coef * KL_t,
    where A [B] is the response's group advantage and KL_t the estimate of KL(pi || pi_ref);
    averaged over each response's tokens, then over responses (as in the paper)."""
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = log_ratio.exp()
    adv = advantages.float().unsqueeze(1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    stats: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None and kl_coef > 0:
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        per_token = per_token + kl_coef * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        stats["clip_fraction"] = masked_mean((clipped > unclipped).float(), mask)
        stats["approx_kl"] = masked_mean(ratio - 1.0 - log_ratio, mask)
    return loss, stats
