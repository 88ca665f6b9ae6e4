"""GRPO on the arithmetic task: a tiny policy that answers one too high most of the time learns
to answer right; the verifiable tasks, the prompt reader and bad input."""

import gzip
import json

import pytest
from rl_toy import fine_tune, make_tokenizer, noisy_arithmetic, save_model

from scratchlm.align import grpo
from scratchlm.align.data import reason_kind
from scratchlm.align.prompts import load_prompts
from scratchlm.align.tasks import (
    answer_match,
    arithmetic_problems,
    call_reward,
    extract_answer,
    load_reward_fn,
)
from scratchlm.checkpoint import load_checkpoint
from scratchlm.cli import main
from scratchlm.config import load_recipe
from scratchlm.errors import UserError
from scratchlm.train.metrics import read_metrics


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    """tokenizer.json and sft/: every `a + b =` and `a - b =` up to 5, right 30% of the time."""
    run_dir = tmp_path_factory.mktemp("arithmetic")
    chats = noisy_arithmetic(max_operand=5, correct_share=0.3)
    tokenizer = make_tokenizer(run_dir / "tokenizer.json", chats)
    save_model(fine_tune(tokenizer, chats, steps=800), run_dir / "sft")
    return run_dir


def settings(*more):
    return [
        "grpo.data=['arithmetic:5']",
        "grpo.device='cpu'",
        "grpo.max_new_tokens=6",
        "grpo.minibatch_size=16",
        "grpo.micro_batch_size=16",
        "grpo.lr=1e-3",
        "grpo.min_lr=1e-3",
        "grpo.val_fraction=0.3",
        "grpo.eval_every=0",
        "grpo.save_every=0",
        *more,
    ]


def test_grpo_raises_exact_match_by_20_points(arithmetic_run):
    recipe = load_recipe(None, settings("grpo.max_steps=20"))
    result = grpo.run(recipe, arithmetic_run, progress=False)
    start = next(r for r in read_metrics(arithmetic_run / "metrics.jsonl") if r["step"] == 0)
    # Greedy answers to 18 held-out problems: the habit (one too high) wins before GRPO.
    assert start["val_reward"] <= 0.4
    assert result["val_reward"] >= start["val_reward"] + 0.2
    rows = [r for r in read_metrics(arithmetic_run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 20 and rows[-1]["reward"] > rows[0]["reward"]
    logged = {"reward", "reward_std", "uniform_groups", "kl", "clip_fraction", "approx_kl"}
    logged |= {"entropy", "response_length", "end_rate", "generate_share", "train_tokens_per_s"}
    assert logged <= rows[-1].keys()
    assert load_checkpoint(arithmetic_run / "grpo").trainer_state["step"] == 20


def test_grpo_cli_runs_and_names_its_checkpoint(arithmetic_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").write_bytes((arithmetic_run / "tokenizer.json").read_bytes())
    init = f"grpo.init_from='{arithmetic_run / 'sft'}'"
    sets = settings("grpo.max_steps=2", "grpo.kl_coef=0.0", init)
    assert main(["grpo", "--run-dir", str(run_dir), *(x for s in sets for x in ("--set", s))]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("grpo: step 2, held-out reward") and "grpo/step-000002" in summary


def test_a_reward_function_that_fails_stops_the_run(arithmetic_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").write_bytes((arithmetic_run / "tokenizer.json").read_bytes())
    base = [*settings("grpo.max_steps=1"), f"grpo.init_from='{arithmetic_run / 'sft'}'"]
    for fn, message in [
        ("rl_toy:raises", "raised ValueError: no reward today"),
        ("scratchlm.align.nothing:fn", "cannot import scratchlm.align.nothing"),
        ("answer_match", "expected module:function"),
    ]:
        sets = [*base, f"grpo.reward_fn='{fn}'"]
        assert (
            main(["grpo", "--run-dir", str(run_dir), *(x for s in sets for x in ("--set", s))]) == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_nan_rewards_stop_grpo_after_the_limit(arithmetic_run, tmp_path):
    import rl_toy

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").write_bytes((arithmetic_run / "tokenizer.json").read_bytes())
    recipe = load_recipe(None, settings(f"grpo.init_from='{arithmetic_run / 'sft'}'"))
    recipe.grpo.reward_fn, recipe.grpo.val_fraction = "rl_toy:nan_at_first", 0.0
    recipe.grpo.max_skipped_rollouts = 1
    rl_toy.NAN_CALLS = 10**9
    try:
        with pytest.raises(UserError, match="2 rollouts had NaN rewards"):
            grpo.run(recipe, run_dir, progress=False)
    finally:
        rl_toy.NAN_CALLS = 0
    assert (run_dir / "grpo" / "step-000000" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "text, answer",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("Total: $1,200.\n#### 1,200", "1200"),
        ("so -5", "-5"),
        ("3 then 4.50", "4.5"),
        ("2.0", "2"),
        ("#### 12 and later 13", "12"),
        ("no number here", None),
    ],
)
def test_gsm8k_style_answer_extraction(text, answer):
    assert extract_answer(text) == answer


def test_answer_match_and_arithmetic_problems():
    assert answer_match([], "The answer is 72.", "Natalia sold ... #### 72") == 1.0
    assert answer_match([], "#### 71", "#### 72") == 0.0
    assert answer_match([], "I do not know", "#### 72") == 0.0
    problems = arithmetic_problems(3, seed=1)
    assert len(problems) == 2 * 4 * 4
    for record in problems:
        question, answer = (m["content"] for m in record["messages"])
        a, op, b, _ = question.split()
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert problems != arithmetic_problems(3, seed=2)


def test_reward_functions_are_checked():
    assert load_reward_fn("scratchlm.align.tasks:answer_match", "k") is answer_match
    with pytest.raises(UserError, match="k = 'nope': expected module:function"):
        load_reward_fn("nope", "k")
    with pytest.raises(UserError, match="returned 'yes'"):
        call_reward(lambda p, r, ref: "yes", "m:f", [], "r", "")
    assert call_reward(lambda p, r, ref: True, "m:f", [], "r", "") == 1.0
    assert call_reward(lambda p, r, ref: float("inf"), "m:f", [], "r", "") != 0.0  # NaN


def test_prompt_reader_layouts_rejects_and_held_out_split(arithmetic_run, tmp_path):
    from scratchlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(arithmetic_run / "tokenizer.json")
    chat = {
        "messages": [{"role": "user", "content": "1 + 1 ="}, {"role": "assistant", "content": "2"}]
    }
    lines = [
        json.dumps(chat),
        json.dumps({"question": "2 + 2 =", "answer": "#### 4"}),
        json.dumps({"prompt": "3 + 3 =", "chosen": "6", "rejected": "7"}),
        json.dumps({"prompt": [{"role": "user", "content": "4 + 4 ="}]}),
        json.dumps({"messages": [{"role": "user", "content": "5 + 5 ="}]}),
        "not json",
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": " "}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "alone"}]}),
        json.dumps({"text": "no layout"}),
        json.dumps(
            {"question": "1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10 + 11 + 12 =", "answer": "78"}
        ),
    ]
    path = tmp_path / "prompts.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines))
    prompts = load_prompts([str(path)], tokenizer, max_tokens=16, held_out_fraction=0.0)
    got = [(p.messages[-1]["content"], p.reference) for p in prompts.train]
    assert got == [
        ("1 + 1 =", "2"),
        ("2 + 2 =", "#### 4"),
        ("3 + 3 =", "6"),
        ("4 + 4 =", ""),
        ("5 + 5 =", ""),
    ]
    assert prompts.train[0].ids[-1] == tokenizer.special_ids["<|assistant|>"]
    reasons = [reason_kind(r.reason) for r in prompts.rejects]
    assert reasons == [
        "malformed JSON",
        "unknown role",
        "empty user turn",
        "no prompt before the assistant turn",
        "unrecognised chat layout",
        "too long",
    ]
    assert "5 prompts (0 held out), 6 set aside" in prompts.describe()

    split = load_prompts(["arithmetic:5"], tokenizer, 16, held_out_fraction=0.3)
    again = load_prompts(["arithmetic:5"], tokenizer, 16, held_out_fraction=0.3)
    assert len(split.train) + len(split.held_out) == 72 and 10 < len(split.held_out) < 32
    assert [p.messages for p in split.held_out] == [p.messages for p in again.held_out]
    with pytest.raises(UserError, match="no usable prompts"):
        load_prompts([str(path)], tokenizer, max_tokens=2, held_out_fraction=0.0)
