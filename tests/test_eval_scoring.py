"""The in-house scorer: tree-packed requests give the log-likelihoods of one row per request."""

import gzip
import random

import pytest
import torch
import torch.nn.functional as F

from scratchlm.device import pick_runtime
from scratchlm.evaluate import scoring
from scratchlm.evaluate.gsm8k import FLEXIBLE, STRICT, exact_match, extract
from scratchlm.evaluate.scoring import (
    TextEncoder,
    _tries,
    encode_pairs,
    rolling_windows,
    score_requests,
)
from scratchlm.evaluate.tasks import combine
from scratchlm.model import ModelConfig, Transformer
from scratchlm.paths import PROJECT_ROOT
from scratchlm.tokenizer import train_tokenizer

RUNTIME = pick_runtime("cpu", "fp32")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24, vocab_size=97)
    return Transformer(cfg).eval()


def one_row_each(model, context, continuation):
    """The harness's way: the request alone in a row, left-truncated to max_len + 1 tokens."""
    full = (context + continuation)[-(model.config.max_seq_len + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([full[:-1]]))[0, -len(continuation) :]
    logprobs = F.log_softmax(logits.float(), -1)
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool(
        (logprobs.argmax(-1) == target).all()
    )


@pytest.mark.parametrize("chunk", [2048, 7])
def test_tree_packed_scores_equal_one_row_per_request(model, monkeypatch, chunk):
    monkeypatch.setattr(scoring, "EXAMPLES_PER_CHUNK", chunk)
    rng = random.Random(0)
    examples = []
    for _ in range(30):
        context = [rng.randrange(97) for _ in range(rng.randrange(1, 30))]  # some truncated
        shared = [rng.randrange(97) for _ in range(rng.randrange(0, 3))]
        examples.append(
            [
                (context, shared + [rng.randrange(97) for _ in range(rng.randrange(1, 6))])
                for _ in range(rng.randrange(1, 5))
            ]
        )
    # Requests sharing their whole input (one-token continuations, as in MMLU) and a
    # continuation longer than the model's context.
    examples.append([([5, 6, 7], [1]), ([5, 6, 7], [2]), ([5, 6, 7], [3])])
    examples.append([([1, 2], list(range(30)))])
    got = score_requests(model, examples, batch_rows=3, runtime=RUNTIME)
    assert [len(g) for g in got] == [len(e) for e in examples]
    for requests, results in zip(examples, got, strict=True):
        for (context, continuation), (ll, greedy) in zip(requests, results, strict=True):
            want_ll, want_greedy = one_row_each(
                model, context, continuation[-model.config.max_seq_len :]
            )
            assert ll == pytest.approx(want_ll, abs=1e-4)
            assert greedy == want_greedy


def test_a_shared_prefix_is_computed_once():
    preamble = list(range(40, 60))  # a few-shot preamble every example starts with
    examples = [[(preamble + [e, 1], [c]) for c in (2, 3, 4)] for e in range(5)]
    inputs = [[(ctx, cont) for ctx, cont in requests] for requests in examples]
    (trie,) = _tries(inputs, capacity=64)
    # The preamble once, then per example its two own tokens; the choices share the input.
    assert len(trie.tokens) == 20 + 5 * 2
    tokens, positions, ends, paths = trie.layout()
    assert positions[:20] == list(range(20)) and max(positions) == 21
    for (example, request), path in zip(trie.owners, paths, strict=True):
        context, _ = examples[example][request]
        assert [tokens[k] for k in path] == context


def test_greedy_flag_is_true_when_the_continuation_is_the_argmax(model):
    context = [3, 1, 4, 1, 5]
    with torch.no_grad():
        best = int(model(torch.tensor([context]))[0, -1].argmax())
    ((_, greedy), (_, other)) = score_requests(
        model, [[(context, [best]), (context, [(best + 1) % 97])]], 4, RUNTIME
    )[0]
    assert greedy and not other


class CharEncoder:
    """One token per character, for checking how requests are split."""

    def many(self, texts):
        return [[ord(c) for c in text] for text in texts]


def test_requests_move_trailing_spaces_and_an_empty_context_becomes_bos():
    (answer, empty), (again,) = encode_pairs(
        CharEncoder(), 0, [[("Answer: ", "yes"), ("", " ok")], [("Answer:", " yes")]]
    )
    assert answer == (list(map(ord, "Answer:")), list(map(ord, " yes"))) == again
    assert empty == ([0], [32, 111, 107])


def test_rolling_windows_cover_the_document_once():
    tokens = list(range(10, 20))
    windows = rolling_windows(tokens, prefix_id=0, max_len=4)
    # Each window sees the max_len tokens before its last prediction, minus what it predicts.
    assert windows == [
        ([0], [10, 11, 12, 13]),
        ([13], [14, 15, 16, 17]),
        ([15, 16, 17], [18, 19]),
    ]
    assert [t for _, cont in windows for t in cont] == tokens
    assert rolling_windows([], 0, 4) == []


def test_group_scores_as_the_harness_combines_them():
    parts = {
        "a": {"n": 10, "acc": 0.5, "acc_stderr": 0.1, "chance": 0.25},
        "b": {"n": 30, "acc": 0.9, "acc_stderr": 0.05, "chance": 0.25},
    }
    weighted = combine(parts, weight_by_size=True)
    assert weighted["n"] == 40 and weighted["acc"] == pytest.approx(0.8)
    pooled = (9 * 0.01 * 10 + 29 * 0.0025 * 30) / (40 - 2)
    assert weighted["acc_stderr"] == pytest.approx((pooled / 40) ** 0.5)
    plain = combine(parts, weight_by_size=False)
    assert plain["acc"] == pytest.approx(0.7)
    assert plain["acc_stderr"] == pytest.approx((0.01 + 0.0025) ** 0.5 / 2)
    assert plain["chance"] == 0.25 and "chance_stderr" not in plain


def test_gsm8k_answers_are_read_like_the_harness():
    output = " She has 3 + 4 = 7 apples.\n#### 1,007."
    assert extract(output, STRICT) == "1,007."
    assert exact_match(extract(output, STRICT), "Work...\n#### 1007")
    assert extract(output, FLEXIBLE, last=True) == "1,007."
    assert extract("no number here", STRICT) == "[invalid]"
    assert not exact_match("[invalid]", "#### 5")
    assert exact_match("$12", "It costs\n#### 12")


def test_a_long_context_cut_at_a_line_start_keeps_the_tokens_that_are_read(tmp_path):
    with gzip.open(PROJECT_ROOT / "data" / "tinyshakespeare" / "input.txt.gz", "rt") as f:
        text = f.read(200_000)
    tokenizer = train_tokenizer(text.split("\n\n"), 600, tmp_path / "tokenizer.json")
    assert tokenizer.splits_at_line_starts
    encode = TextEncoder(tokenizer)
    rng = random.Random(0)
    lines = text.splitlines()
    examples = []
    for _ in range(20):  # few-shot-like prompts: many lines, then a question and its choices
        start = rng.randrange(len(lines) - 80)
        context = "\n".join(lines[start : start + rng.randrange(1, 80)]) + "\nAnswer:"
        examples.append([(context, f" {c}") for c in ("A", "B", "yes, my lord")])
    keep = 33
    whole = encode_pairs(encode, tokenizer.bos_id, examples)
    cut = encode_pairs(encode, tokenizer.bos_id, examples, keep_tokens=keep)
    shorter = 0
    for requests_whole, requests_cut in zip(whole, cut, strict=True):
        for (ctx, cont), (cut_ctx, cut_cont) in zip(requests_whole, requests_cut, strict=True):
            assert cut_cont == cont
            assert (cut_ctx + cut_cont)[-keep:] == (ctx + cont)[-keep:]
            shorter += len(cut_ctx) < len(ctx)
    assert shorter > 20  # most long contexts were cut
