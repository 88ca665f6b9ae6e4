"""The batching engine: continuous batching, paged cache, per-request sampling, logprobs."""

import pytest
import torch
from tiny_run import make_run

from scratchlm.errors import UserError
from scratchlm.infer import sampling
from scratchlm.infer.engine import Engine
from scratchlm.infer.generate import generate
from scratchlm.infer.sampling import SamplingParams
from scratchlm.loading import load
from scratchlm.model import ModelConfig, Transformer

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128
    )
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 90, (32,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def full_forward_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_alone_equals_greedy_in_a_batch_of_32(model, prompts):
    alone = [list(generate(model, p, 24, temperature=0)) for p in prompts]
    assert alone[0] == full_forward_greedy(model, prompts[0], 24)
    # A small step budget: long prompts are prefilled in chunks while others decode, and requests
    # join as others finish (max_tokens differ, so they leave at different steps).
    engine = Engine(model, max_batch=32, max_step_tokens=64, block_size=8)
    params = [SamplingParams(max_tokens=24 - i % 5, temperature=0) for i in range(32)]
    outs = engine.generate_batch(prompts, params)
    for i, (out, ref) in enumerate(zip(outs, alone, strict=True)):
        assert out.token_ids == ref[: 24 - i % 5], i
        assert out.finish_reason == "length"
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_requests_join_between_steps_and_prefill_in_chunks_while_others_decode(model, prompts):
    engine = Engine(model, max_batch=8, max_step_tokens=40, block_size=8)
    first = engine.add(prompts[0], SamplingParams(max_tokens=30, temperature=0))
    while len(first.token_ids) < 3:
        engine.step()
    long_prompt = (prompts[1] * 3)[:100]  # more tokens than a step's budget
    second = engine.add(long_prompt, SamplingParams(max_tokens=5, temperature=0))
    before = len(first.token_ids)
    steps_to_prefill = 0
    while second.cached < len(long_prompt):
        engine.step()
        steps_to_prefill += 1
        assert len(first.token_ids) == before + steps_to_prefill  # decoding went on meanwhile
    assert steps_to_prefill > 1
    while engine.has_work():
        engine.step()
    assert first.token_ids == list(generate(model, prompts[0], 30, temperature=0))
    assert second.token_ids == list(generate(model, long_prompt, 5, temperature=0))


def test_a_full_cache_makes_requests_wait_never_drops_them(model, prompts):
    # Room for a few requests at a time.
    engine = Engine(model, max_batch=32, cache_tokens=3 * 112, block_size=16)
    params = SamplingParams(max_tokens=20, temperature=0)
    requests = [engine.add(p, params) for p in prompts[:12]]
    most_running, ever_waited = 0, False
    while engine.has_work():
        engine.step()
        most_running = max(most_running, len(engine.running))
        ever_waited |= bool(engine.waiting)
    assert ever_waited and most_running < len(requests)
    for r, p in zip(requests, prompts, strict=False):
        assert r.finish_reason == "length"
        assert r.token_ids == list(generate(model, p, 20, temperature=0))


def test_seeded_sampling_does_not_depend_on_the_batch(model, prompts):
    params = [
        SamplingParams(max_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=i)
        for i in range(6)
    ]
    batched = Engine(model).generate_batch(prompts[:6], params)
    for out, p, s in zip(batched, prompts, params, strict=False):
        alone = Engine(model, max_batch=1).generate_batch([p], s)[0]
        assert out.token_ids == alone.token_ids
    assert len({tuple(o.token_ids) for o in batched}) == 6


def test_logprobs_match_the_full_forward(model, prompts):
    prompt = prompts[2]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=3, prompt_logprobs=2)
    out = Engine(model, max_step_tokens=40).generate_batch([prompt], params)[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    expected = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    n = len(prompt)
    assert out.prompt_logprobs[0] is None
    assert torch.allclose(torch.tensor(out.prompt_logprobs[1:]), expected[: n - 1], atol=1e-5)
    assert torch.allclose(torch.tensor(out.logprobs), expected[n - 1 :], atol=1e-5)
    top = out.top_logprobs[0]
    assert len(top) == 3 and [t for t, _ in top] == logp[n - 1].topk(3).indices.tolist()
    assert len(out.prompt_top_logprobs[1]) == 2


def test_scoring_only_with_max_tokens_zero(model):
    prompt = [i % VOCAB for i in range(128)]  # the whole context
    out = Engine(model).generate_batch([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.token_ids == [] and out.finish_reason == "length"
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt]))[0], -1)
    expected = logp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.prompt_logprobs[1:]), expected, atol=1e-5)


def test_stop_tokens_and_the_context_end_a_request(model, prompts):
    free = list(generate(model, prompts[3], 20, temperature=0))
    stop = free[5]
    params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop], logprobs=0)
    out = Engine(model).generate_batch([prompts[3]], params)[0]
    assert out.token_ids == free[: free.index(stop)] and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids)
    params.include_stop_token = True
    out = Engine(model).generate_batch([prompts[3]], params)[0]
    assert out.token_ids == free[: free.index(stop) + 1]
    long = Engine(model).generate_batch([[1] * 120], SamplingParams(max_tokens=50))[0]
    assert len(long.token_ids) == 8 and long.finish_reason == "length"


def test_stop_strings_cut_the_text(tmp_path_factory):
    model, tokenizer = load(make_run(tmp_path_factory.mktemp("run")))
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("First Citizen:", add_bos=True)
    free = engine.generate_batch([prompt], SamplingParams(max_tokens=30, temperature=0))[0]
    assert free.text == tokenizer.decode(free.token_ids, skip_special=True)
    stop = free.text.strip()[3:6]
    assert stop
    cut = engine.generate_batch([prompt], SamplingParams(30, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]


def test_incremental_text_equals_a_decode_of_every_token(tmp_path_factory):
    model, tokenizer = load(make_run(tmp_path_factory.mktemp("run")))
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("First Citizen:", add_bos=True)
    checked, broken = [0], [0]

    def check(request):
        # Sampled hot, a random model writes stray bytes (characters split across tokens, bytes
        # that are no character) and special tokens.
        whole = tokenizer.decode(request.token_ids, skip_special=True)
        assert request.text == whole
        checked[0] += 1
        broken[0] += whole.endswith("\ufffd")

    for seed in range(8):
        params = SamplingParams(max_tokens=150, temperature=3.0, seed=seed)
        request = engine.add(prompt, params, on_update=check)
        while not request.finished:
            engine.step()
    assert checked[0] == 8 * 150 and broken[0] > 0


def test_abort_gives_the_blocks_back(model, prompts):
    engine = Engine(model, max_batch=4)
    requests = [engine.add(p, SamplingParams(max_tokens=50, temperature=0)) for p in prompts[:6]]
    engine.step()
    assert engine.cache.free_blocks < engine.cache.num_blocks and engine.waiting
    for r in requests:
        engine.abort(r)
    assert engine.cache.free_blocks == engine.cache.num_blocks
    assert not engine.has_work() and all(r.finish_reason == "abort" for r in requests)


@pytest.mark.parametrize(
    "prompt, params, fragment",
    [
        ([], SamplingParams(), "at least one token"),
        ([1] * 128, SamplingParams(max_tokens=1), "context"),
        ([VOCAB], SamplingParams(), "token ids"),
        ([1], SamplingParams(temperature=-1), "temperature"),
        ([1], SamplingParams(top_p=0), "top_p"),
        ([1], SamplingParams(max_tokens=-1), "max_tokens"),
        ([1], SamplingParams(logprobs=50), "logprobs"),
    ],
)
def test_bad_requests_are_user_errors(model, prompt, params, fragment):
    with pytest.raises(UserError, match=fragment):
        Engine(model).add(prompt, params)


def test_scalar_heads_are_refused():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head="scalar")
    with pytest.raises(UserError, match="scalar head"):
        Engine(Transformer(cfg))


def test_the_engine_runs_the_models_own_forward():
    """No second copy of the forward to fall out of step: a model whose forward changes
    generates what the changed forward says."""

    class FavoursSeven(Transformer):
        def forward(self, tokens, **kwargs):
            logits = super().forward(tokens, **kwargs)
            return logits + 100.0 * (torch.arange(logits.shape[-1]) == 7)

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
    model = FavoursSeven(cfg).eval()
    outs = Engine(model).generate_batch([[1, 2, 3], [4]], SamplingParams(max_tokens=5))
    assert [r.token_ids for r in outs] == [[7] * 5, [7] * 5]


def test_a_bf16_model_runs_on_the_engine():
    # The path GPU users take; on CPU only checked for correctness on a tiny model.
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32)
    model = Transformer(cfg).to(torch.bfloat16).eval()
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=0, logprobs=2)
    out = Engine(model, max_batch=4).generate_batch([[1, 2, 3], [4, 5]], params)
    assert all(len(r.token_ids) == 6 and len(r.logprobs) == 6 for r in out)
    assert out[0].token_ids == Engine(model).generate_batch([[1, 2, 3]], params)[0].token_ids


def test_scattered_blocks_give_what_consecutive_ones_give(model, prompts):
    engine = Engine(model, max_batch=8, block_size=8)
    params = SamplingParams(max_tokens=30, temperature=0)
    first, middle, last = (engine.add(p, params) for p in prompts[:3])
    engine.step()
    engine.abort(middle)  # a hole in the pool: the next request's blocks are not consecutive
    late = engine.add(prompts[4], SamplingParams(max_tokens=40, temperature=0))
    while engine.has_work():
        engine.step()
        if late.blocks:
            assert late.first_slot is None
    assert late.token_ids == list(generate(model, prompts[4], 40, temperature=0))
    assert first.token_ids == list(generate(model, prompts[0], 30, temperature=0))


def test_tiny_temperature_and_top_p_sample_beside_others(model, prompts):
    """1e-39 overflows float32 logits / temperature and 1e-300 is 0 in float32: both once made the
    whole step fail."""
    engine = Engine(model, max_batch=8)
    settings = [
        SamplingParams(max_tokens=6, temperature=1e-39),
        SamplingParams(max_tokens=6, temperature=1e-300),
        SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-300, seed=1),
        SamplingParams(max_tokens=6, temperature=1.0, seed=2),
    ]
    outs = engine.generate_batch([prompts[0]] * 4, settings)
    assert [r.finish_reason for r in outs] == ["length"] * 4
    greedy = full_forward_greedy(model, prompts[0], 6)
    assert outs[0].token_ids == greedy and outs[1].token_ids == greedy
    assert outs[2].token_ids == greedy  # top_p that small keeps only the most likely token


def test_a_request_whose_sampling_fails_ends_alone(model, prompts, monkeypatch):
    """A draw that raises (NaN logits, say) ends that request with "error"; the rest finish."""
    engine = Engine(model, max_batch=4)
    doomed = torch.Generator().manual_seed(99)
    real = sampling.sample_next

    def failing(logits, temperature, top_k=0, top_p=1.0, generator=None):
        if generator is doomed:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, temperature, top_k, top_p, generator)

    monkeypatch.setattr(sampling, "sample_next", failing)
    requests = [engine.add(p, SamplingParams(max_tokens=8, seed=1)) for p in prompts[:3]]
    requests[1].generator = doomed
    while engine.has_work():
        engine.step()
    assert [r.finish_reason for r in requests] == ["length", "error", "length"]
    assert [len(r.token_ids) for r in requests] == [8, 0, 8]
    assert engine.cache.free_blocks == engine.cache.num_blocks
