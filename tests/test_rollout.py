"""The rollout sampler (on the batching engine) and the rows PPO and GRPO train on."""

import pytest
import torch

from scratchlm.align.losses import token_logprobs
from scratchlm.align.rollout import (
    NonFiniteLogits,
    build_rows,
    sample_batch,
    score_rows,
)
from scratchlm.infer.generate import generate
from scratchlm.model import ModelConfig, Transformer

CFG = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CFG)).eval()


def test_a_batch_decodes_each_prompt_as_alone(model):
    samples = sample_batch(model, PROMPTS, max_new_tokens=8, temperature=0)
    for prompt, sample in zip(PROMPTS, samples, strict=True):
        alone = list(generate(model, prompt, 8, temperature=0))
        assert sample.tokens == alone and sample.finish == "length"


def test_a_stop_token_ends_its_row_and_is_kept(model):
    greedy = sample_batch(model, PROMPTS, max_new_tokens=8, temperature=0)
    stop = greedy[1].tokens[2]
    samples = sample_batch(model, PROMPTS, max_new_tokens=8, temperature=0, stop_ids=[stop])
    first = greedy[1].tokens.index(stop)
    assert samples[1].tokens == greedy[1].tokens[: first + 1] and samples[1].finish == "stop"
    for got, full in zip(samples, greedy, strict=True):
        cut = full.tokens.index(stop) + 1 if stop in full.tokens else len(full.tokens)
        assert got.tokens == full.tokens[:cut]


def test_sampling_is_seeded_and_the_context_bounds_it(model):
    a = sample_batch(model, PROMPTS, 6, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    b = sample_batch(model, PROMPTS, 6, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    # Prompt i is sampled with seed + i, whatever else is in the batch.
    alone = sample_batch(model, PROMPTS[1:2], 6, temperature=1.0, top_k=10, top_p=0.9, seed=4)
    assert alone[0].tokens == a[1].tokens
    long = sample_batch(model, [list(range(1, 21))], max_new_tokens=50, temperature=0)
    assert len(long[0].tokens) == 24 - 20 and long[0].finish == "length"


def test_nan_logits_are_reported(model):
    broken = Transformer(ModelConfig(**CFG))
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogits):
        sample_batch(broken, PROMPTS, 4)


def test_rows_mark_the_response_targets(model):
    rows = build_rows([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], torch.device("cpu"))
    assert rows.inputs.tolist() == [[1, 2, 3, 7], [4, 9, 10, 11]]
    assert rows.targets.tolist() == [[2, 3, 7, 8], [9, 10, 11, 0]]
    assert rows.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert rows.last.tolist() == [3, 2]
    logp = score_rows(model, rows, micro_batch=1)
    alone = token_logprobs(model(torch.tensor([[4, 9, 10]])), torch.tensor([[9, 10, 11]]))
    torch.testing.assert_close(logp[1, :3], alone[0])
