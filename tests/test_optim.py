import math

import torch

from scratchlm.config import PretrainConfig
from scratchlm.train.optim import build_optimizer, lr_factor


def lr_at(step, cfg, elapsed=0.0):
    return cfg.lr * lr_factor(step, cfg, elapsed)


def test_warmup_then_cosine_to_min_lr():
    cfg = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == 0.1
    assert lr_at(9, cfg) == 1.0
    assert lr_at(10, cfg) == 1.0
    # halfway through the decay the cosine is at its midpoint
    assert math.isclose(lr_at(60, cfg), 0.1 + 0.5 * 0.9)
    assert math.isclose(lr_at(110, cfg), 0.1)
    assert math.isclose(lr_at(500, cfg), 0.1)


def test_no_weight_decay_on_norms_and_embeddings():
    model = torch.nn.ModuleDict(
        {
            "tok_embeddings": torch.nn.Embedding(10, 4),
            "proj": torch.nn.Linear(4, 4, bias=False),
            "norm": torch.nn.LayerNorm(4),
        }
    )
    opt = build_optimizer(model, PretrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3  # embedding, norm weight and bias
    assert opt.defaults["fused"]
    assert decay["base_lr"] == no_decay["base_lr"] == PretrainConfig().lr


def test_wall_clock_budget_ends_the_decay():
    cfg = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=1000, max_seconds=100.0)
    assert math.isclose(lr_at(10, cfg, elapsed=50.0), 0.55)
    assert math.isclose(lr_at(10, cfg, elapsed=100.0), 0.1)
    assert lr_at(10, cfg, elapsed=0.0) > 0.99


def test_factor_scales_each_group_from_its_own_peak():
    cfg = PretrainConfig(lr=2.0, min_lr=0.5, warmup_steps=0, max_steps=10)
    assert lr_factor(0, cfg) == 1.0
    assert math.isclose(lr_factor(10, cfg), 0.25)
