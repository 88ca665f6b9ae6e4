import math

import pytest
import torch

from scratchlm.infer.generate import generate, sample_next, top_k_filter, top_p_filter
from scratchlm.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return Transformer(cfg).eval()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.equal(torch.isinf(out), torch.tensor([[True, False, False, True]]))
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = ~torch.isinf(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = ~torch.isinf(top_p_filter(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = ~torch.isinf(top_p_filter(logits[:, [3, 2, 1, 0]], 0.4))
    assert kept.tolist() == [[False, False, False, True]]  # the top token always stays


def test_sampling_respects_filters_and_seed():
    logits = torch.tensor([[0.0, 0.0, 10.0, 9.0]])
    assert sample_next(logits, 0.0, 0, 1.0, None).item() == 2
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 2, 1.0, g).item() for _ in range(200)}
    assert draws == {2, 3}
    p3 = math.exp(9) / (math.exp(10) + math.exp(9))
    assert 0.1 < p3 < 0.5


def test_greedy_generation_equals_argmax_of_full_forward(model):
    prompt = [1, 2, 3, 4]
    out = list(generate(model, prompt, max_new_tokens=10, temperature=0))
    seq = list(prompt)
    for _ in range(10):
        logits = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert out == seq[len(prompt) :]


def test_seed_makes_sampling_repeatable(model):
    a = list(generate(model, [5, 6], 15, temperature=1.0, top_k=20, seed=3))
    b = list(generate(model, [5, 6], 15, temperature=1.0, top_k=20, seed=3))
    c = list(generate(model, [5, 6], 15, temperature=1.0, top_k=20, seed=4))
    assert a == b and a != c


def test_stop_token_ends_generation_and_context_bounds_it(model):
    greedy = list(generate(model, [1, 2], 10, temperature=0))
    stop = greedy[3]
    first = greedy.index(stop)
    assert list(generate(model, [1, 2], 10, temperature=0, stop_ids=[stop])) == greedy[:first]
    assert len(list(generate(model, list(range(1, 41)) * 2, 100, temperature=0))) == 0
    assert len(list(generate(model, [1] * 60, 100, temperature=0))) == 4
