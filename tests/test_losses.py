"""Each supervised and preference loss against a hand-computed example.

The logits [0, ln 3] give p = (1/4, 3/4): log p(1) = ln 0.75 = -0.287682, log p(0) = ln 0.25 =
-1.386294. -log sigmoid(1) = ln(1 + e^-1) = 0.313262; -log sigmoid(-1) = 1.313262.
"""

import math

import pytest
import torch

from scratchlm.align.losses import (
    IGNORE,
    bradley_terry_loss,
    dpo_loss,
    masked_cross_entropy,
    sequence_logprobs,
    token_logprobs,
)

LN3 = math.log(3)


def two_positions() -> torch.Tensor:
    return torch.tensor([[[0.0, LN3], [0.0, LN3]]])  # [B=1, T=2, V=2]


def test_masked_cross_entropy_counts_only_masked_positions():
    logits, targets = two_positions(), torch.tensor([[1, 0]])
    both = masked_cross_entropy(logits, targets, torch.tensor([[1, 1]]))
    assert float(both) == pytest.approx((0.287682 + 1.386294) / 2, abs=1e-5)  # 0.836988
    first = masked_cross_entropy(logits, targets, torch.tensor([[1, 0]]))
    assert float(first) == pytest.approx(0.287682, abs=1e-5)


def test_masked_cross_entropy_gradient_skips_unmasked_positions():
    logits = two_positions().requires_grad_()
    masked_cross_entropy(logits, torch.tensor([[1, 0]]), torch.tensor([[1, 0]])).backward()
    # d/dlogits of -log p(1) is p - onehot(1) = (0.25, -0.25); the unmasked position gets 0.
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.25, -0.25], [0.0, 0.0]]]))


def test_token_and_sequence_logprobs():
    logits, targets = two_positions(), torch.tensor([[1, 0]])
    per_token = token_logprobs(logits, targets)
    torch.testing.assert_close(per_token, torch.tensor([[-0.287682, -1.386294]]), atol=1e-5, rtol=0)
    assert float(token_logprobs(logits, torch.tensor([[IGNORE, 0]]))[0, 0]) == 0.0
    total = sequence_logprobs(logits, targets, torch.tensor([[1, 1]]))
    assert float(total[0]) == pytest.approx(-1.673976, abs=1e-5)
    mean = sequence_logprobs(logits, targets, torch.tensor([[1, 1]]), average=True)
    assert float(mean[0]) == pytest.approx(-0.836988, abs=1e-5)
    only_second = sequence_logprobs(logits, targets, torch.tensor([[0, 1]]))
    assert float(only_second[0]) == pytest.approx(-1.386294, abs=1e-5)


def test_bradley_terry_with_and_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # pairs: -log sigmoid(1) = 0.313262 and -log sigmoid(-1) = 1.313262; mean 0.813262
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(0.813262, abs=1e-5)
    # a margin of 1 on the first pair: -log sigmoid(0) = ln 2 = 0.693147
    one = bradley_terry_loss(chosen[:1], rejected[:1], margin=torch.tensor([1.0]))
    assert float(one) == pytest.approx(0.693147, abs=1e-5)


def test_dpo_sigmoid_ipo_and_conservative():
    # h = (-1 - -2) - (-3 - -2) = 2; beta = 0.5 so beta h = 1
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss, chosen_reward, rejected_reward = dpo_loss(*args, beta=0.5)
    assert float(loss) == pytest.approx(0.313262, abs=1e-5)
    assert float(chosen_reward[0]) == pytest.approx(0.5)
    assert float(rejected_reward[0]) == pytest.approx(-0.5)
    ipo, _, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")  # (2 - 1 / (2 * 0.5))^2 = 1
    assert float(ipo) == pytest.approx(1.0)
    cdpo, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)  # 0.9 * 0.313262 + 0.1 * 1.313262
    assert float(cdpo) == pytest.approx(0.413262, abs=1e-5)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(*args, beta=0.5, loss_type="hinge")


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = (
        torch.tensor([-1.0], requires_grad=True),
        torch.tensor([-3.0], requires_grad=True),
    )
    loss, _, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    loss.backward()
    # d/dh of -log sigmoid(beta h) = -beta (1 - sigmoid(beta h)) = -0.5 * 0.268941 = -0.134471
    assert float(chosen.grad[0]) == pytest.approx(-0.134471, abs=1e-5)
    assert float(rejected.grad[0]) == pytest.approx(0.134471, abs=1e-5)
