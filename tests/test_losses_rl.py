"""The reinforcement-learning losses against examples worked by hand (the arithmetic is in the
comments)."""

import math

import pytest
import torch

from scratchlm.align.losses import (
    gae,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)


def t(*rows):
    """t([1, 2]) is a vector, t([1, 2], [3, 4]) a matrix, t(1, 2) a vector."""
    return torch.tensor(rows[0] if len(rows) == 1 else rows, dtype=torch.float32)


def test_masked_mean_and_whiten_ignore_padding():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    assert float(masked_mean(x, mask)) == pytest.approx(2.0)
    # mean 2, population variance (1 + 0 + 1) / 3 = 2/3, so 1 / sqrt(2/3) = 1.2247449
    white = masked_whiten(x, mask)
    torch.testing.assert_close(white, t([-1.2247449, 0.0, 1.2247449, 0.0]))


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])  # log r = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t([0.125, 0.5]))
    # k3 = exp(-log r) - 1 + log r: exp(-0.5) - 0.5 = 0.1065307; e - 2 = 0.7182818
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), t([0.1065307, 0.7182818]))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_gae_over_right_padded_responses():
    rewards = t([0.0, 0.0, 1.0], [2.0, 5.0, 5.0])
    values = t([0.5, 0.6, 0.7], [1.0, 9.0, 9.0])  # row 2's padding holds garbage
    mask = t([1, 1, 1], [1, 0, 0])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 1, from the end: delta2 = 1 - 0.7 = 0.3, A2 = 0.3
    #   delta1 = 0.9 * 0.7 - 0.6 = 0.03, A1 = 0.03 + 0.45 * 0.3 = 0.165
    #   delta0 = 0.9 * 0.6 - 0.5 = 0.04, A0 = 0.04 + 0.45 * 0.165 = 0.11425
    # row 2 ends after one token: A0 = 2 + 0.9 * 0 - 1 = 1
    torch.testing.assert_close(advantages, t([0.11425, 0.165, 0.3], [1.0, 0.0, 0.0]))
    torch.testing.assert_close(returns, t([0.61425, 0.765, 1.0], [2.0, 0.0, 0.0]))


def test_ppo_policy_loss_clips_and_stops_the_gradient_where_clipped():
    ratios = [1.5, 0.5, 1.1, 10.0]
    logp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    old = torch.zeros(1, 4)
    advantages, mask = t([1.0, 1.0, -2.0, 5.0]), t([1, 1, 1, 0])
    loss, stats = ppo_policy_loss(logp, old, advantages, mask, clip_range=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5;
    # token 3: max(2.2, 2.2) = 2.2; token 4 is padding. Mean (-1.2 - 0.5 + 2.2) / 3 = 1/6.
    assert float(loss.detach()) == pytest.approx(1 / 6, abs=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(1 / 3)
    # k3(old || new) = r - 1 - log r: 0.0945349, 0.1931472, 0.0046898 -> mean 0.0974573
    assert float(stats["approx_kl"]) == pytest.approx(0.0974573, abs=1e-6)
    loss.backward()
    # d/dlogp of -A * r / 3 = -A * r / 3 where not clipped; 0 where clipped or padded
    torch.testing.assert_close(logp.grad, t([0.0, -0.5 / 3, 2.2 / 3, 0.0]).unsqueeze(0))


def test_ppo_value_loss_clips_the_step_from_the_old_value():
    values, old = t([1.0, 2.0, 0.0]), t([0.5, 2.5, 0.0])
    returns, mask = t([2.0, 2.0, 1.0]), t([1, 1, 1])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    # token 1: clipped value 0.7: max((1-2)^2, (0.7-2)^2) = 1.69
    # token 2: clipped value 2.3: max(0, 0.09) = 0.09; token 3: max(1, 1) = 1
    # 0.5 * (1.69 + 0.09 + 1) / 3 = 0.4633333
    assert float(loss) == pytest.approx(0.4633333, abs=1e-6)
    assert float(stats["value_clip_fraction"]) == pytest.approx(2 / 3)


def test_group_advantages():
    rewards = t([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.25, unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    # group 2: all equal, std 0: advantages 0 (nothing to learn from it)
    expected = t([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / 0.5001
    torch.testing.assert_close(group_advantages(rewards, 4), expected)
    unscaled = group_advantages(rewards, 4, scale=False)
    torch.testing.assert_close(unscaled, t([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


def test_grpo_loss_per_response_then_over_responses():
    logp = t([0.0, math.log(1.5)], [math.log(0.5), 3.0])
    old = torch.zeros(2, 2)
    advantages, mask = t(1.0, -1.0), t([1, 1], [1, 0])
    loss, stats = grpo_loss(logp, old, advantages, mask, clip_range=0.2)
    # response 1 (A=1): tokens -1 and max(-1.5, -1.2) = -1.2 -> mean -1.1
    # response 2 (A=-1): one token, max(0.5, 0.8) = 0.8 -> mean 0.8; loss (-1.1 + 0.8) / 2
    assert float(loss) == pytest.approx(-0.15, abs=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 3)

    ref = torch.zeros(2, 2)
    loss, stats = grpo_loss(logp, old, advantages, mask, 0.2, ref, kl_coef=0.1)
    # k3 per token: 0; 1/1.5 - 1 + log 1.5 = 0.0721318; 2 - 1 + log 0.5 = 0.3068528
    # response 1: (-1 + 0 - 1.2 + 0.00721318) / 2 = -1.0963934; response 2: 0.8 + 0.0306853
    assert float(loss) == pytest.approx((-1.0963934 + 0.8306853) / 2, abs=1e-6)
    assert float(stats["kl"]) == pytest.approx((0.0721318 + 0.3068528) / 3, abs=1e-6)
