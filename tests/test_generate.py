import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.infer.generate import generate, sample_next, top_k_filter, top_p_filter
from scratchlm.infer.sampling import SamplingParams, sample_rows
from scratchlm.model import ModelConfig, Transformer

NEG = float("-inf")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40)
    return Transformer(cfg).eval()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert top_k_filter(logits, 2).tolist() == [NEG, 5.0, NEG, 4.0, NEG]
    assert top_k_filter(logits, 0).tolist() == logits.tolist()
    assert top_k_filter(logits, 9).tolist() == logits.tolist()


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log()
    # 0.5 alone < 0.7; 0.5 + 0.3 reaches it: two tokens kept.
    assert torch.isinf(top_p_filter(logits, 0.7)).tolist() == [True, False, False, True]
    # 0.5 + 0.3 + 0.15 = 0.95 reaches 0.9 only with the third token.
    assert torch.isinf(top_p_filter(logits, 0.9)).tolist() == [True, False, False, False]
    # The top token is kept even when alone it exceeds p.
    assert torch.isinf(top_p_filter(logits, 0.1)).tolist() == [True, False, True, True]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampling_respects_filters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, 1.0, top_k=2, generator=gen) for _ in range(200)}
    assert seen == {1, 2}
    assert sample_next(logits, 0.0) == 1


def test_greedy_equals_argmax_of_full_forward(model):
    prompt = [3, 14, 15, 9, 2]
    out = list(generate(model, prompt, max_new_tokens=12, temperature=0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_cache_and_no_cache_give_the_same_greedy_output(model):
    prompt = [7, 1, 30]
    with_cache = list(generate(model, prompt, 20, temperature=0))
    without = list(generate(model, prompt, 20, temperature=0, use_cache=False))
    assert with_cache == without and len(with_cache) == 20


def test_stop_tokens_end_generation_unyielded(model):
    prompt = [5, 6]
    free = list(generate(model, prompt, 15, temperature=0))
    stop = free[4]
    first = free.index(stop)
    assert list(generate(model, prompt, 15, temperature=0, stop_ids=[stop])) == free[:first]


def test_seed_makes_sampling_deterministic(model):
    a = list(generate(model, [1, 2, 3], 15, temperature=1.0, top_k=20, top_p=0.9, seed=42))
    b = list(generate(model, [1, 2, 3], 15, temperature=1.0, top_k=20, top_p=0.9, seed=42))
    c = list(generate(model, [1, 2, 3], 15, temperature=1.0, top_k=20, top_p=0.9, seed=43))
    assert a == b and a != c


def test_context_limits(model):
    assert len(list(generate(model, [1] * 35, 100, temperature=0))) == 5
    with pytest.raises(UserError, match="context"):
        list(generate(model, [1] * 40, 5))
    with pytest.raises(UserError, match="prompt"):
        list(generate(model, [], 5))


def test_generation_does_not_leave_inference_mode_on(model):
    stream = generate(model, [1, 2], 3, temperature=0)
    next(stream)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("temperature", [1e-39, 1e-40, 1e-300, 5e-324, -0.0])
def test_tiny_temperatures_are_greedy_not_nan(temperature):
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    assert sample_next(logits, temperature, generator=torch.Generator().manual_seed(0)) == 1


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-46])
def test_a_top_p_that_is_zero_in_float32_keeps_the_top_token(top_p):
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    assert torch.isinf(top_p_filter(logits, top_p)).tolist() == [True, False, True, True]
    assert sample_next(logits, 1.0, top_p=top_p, generator=torch.Generator()) == 1


def test_a_row_that_cannot_be_sampled_gets_none_and_the_others_their_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan"), 1.0, 0.0], [5.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=1.0, top_k=1)] * 3
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    assert sample_rows(logits, params, generators) == [1, None, 0]
