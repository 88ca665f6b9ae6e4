"""Controlled tasks where the truth is known: a reward model learns a planted preference, and DPO
raises the success of a rule from its SFT baseline."""

import random

import torch
from align_helpers import random_words, recipe, tiny_run, write_jsonl

from scratchlm.align import dpo, reward, sft
from scratchlm.align.evaluate import PreferenceTask
from scratchlm.evaluate.tasks import EvalOptions
from scratchlm.loading import load


def test_reward_model_learns_a_planted_preference(tmp_path):
    """The chosen response says "thanks" somewhere; the rejected one, as long, does not."""
    rng = random.Random(0)
    pairs = []
    for i in range(600):
        words = random_words(rng, rng.randrange(4, 9)).split()
        polite = list(words)
        polite[rng.randrange(len(polite))] = "thanks"
        pairs.append(
            {"prompt": f"Reply {i}.", "chosen": " ".join(polite), "rejected": " ".join(words)}
        )
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run = tiny_run(tmp_path, [random_words(rng, 40) + " thanks reply" for _ in range(30)])
    result = reward.run(
        recipe(
            f'reward.data=["{data}"]',
            f"reward.init_from='{run / 'pretrain'}'",
            "reward.max_steps=60",
            "reward.eval_every=0",
            "reward.lr=3e-3",
            "reward.warmup_steps=5",
            "reward.val_fraction=0.2",
        ),  # fmt: skip
        run,
        progress=False,
    )
    assert result["val_accuracy"] >= 0.95, result
    # The evaluation task agrees on the held-out pairs it is given.
    model, tokenizer = load(run / "reward")
    held_out = write_jsonl(tmp_path / "held_out.jsonl", pairs[:200])
    options = EvalOptions(data=str(held_out), checkpoint=str(run / "reward"))
    figures = PreferenceTask().run(model, tokenizer, options)
    assert figures["scorer"] == "reward model" and figures["n"] == 200
    assert figures["accuracy"] >= 0.95 and figures["ci95"][0] > 0.9


def answer_shares(run, stage, prompts=60):
    """The model's probabilities, averaged over unseen "Pick a number" prompts, that its answer
    starts with an even digit (what the pairs prefer) and that it is one digit followed by the end
    of the turn (the answer kept whole).

    Exact probabilities rather than a rate over sampled answers: a sampled rate of one prompt moved
    by several points between CPUs' floating-point paths and sat on its threshold."""
    model, tokenizer = load(run / stage)
    digit_tokens = [
        t for t in range(tokenizer.vocab_size) if tokenizer.decode([t]).strip() in set("123456789")
    ]
    even_tokens = [t for t in digit_tokens if tokenizer.decode([t]).strip() in set("2468")]
    even = whole = 0.0
    with torch.no_grad():
        for i in range(prompts):
            question = [{"role": "user", "content": f"Pick a number ({1000 + i})."}]
            prompt, _ = tokenizer.encode_chat(question, add_generation_prompt=True)
            first = torch.softmax(model(torch.tensor([prompt]))[0, -1], -1)
            even += first[even_tokens].sum().item()
            answers = torch.tensor([[*prompt, t] for t in digit_tokens])
            ends = torch.softmax(model(answers)[:, -1], -1)[:, tokenizer.end_id]
            whole += (first[digit_tokens] * ends).sum().item()
    return even / prompts, whole / prompts


def test_dpo_raises_success_on_pairs_built_from_a_rule(tmp_path):
    """SFT answers "Pick a number (i)." with any digit 1-9; DPO pairs prefer an even one.

    Pure DPO on a model this small lowers the chosen answers' likelihood along with the rejected
    ones (it answers "4642" or nothing); the chosen responses' cross-entropy (sft_weight, RPO)
    keeps them whole."""
    rng = random.Random(1)
    digits = [str(d) for d in range(1, 10)]
    chats = [{"messages": [{"role": "user", "content": f"Pick a number ({i})."},
                           {"role": "assistant", "content": rng.choice(digits)}]}
             for i in range(300)]  # fmt: skip
    pairs = [
        {"prompt": f"Pick a number ({i}).", "chosen": rng.choice("2468"),
         "rejected": rng.choice("13579")}
        for i in range(300)
    ]  # fmt: skip
    chat_file = write_jsonl(tmp_path / "chat.jsonl", chats)
    pair_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run = tiny_run(tmp_path, ["Pick a number. " + " ".join(digits)] * 30, n_layers=1)
    sets = (f'sft.data=["{chat_file}"]', "sft.max_steps=80", "sft.eval_every=0",
            "sft.rows_per_step=8", "sft.lr=1e-2", f'dpo.data=["{pair_file}"]', "dpo.max_steps=40",
            "dpo.eval_every=0", "dpo.lr=3e-3", "dpo.beta=0.5", "dpo.pairs_per_step=16",
            "dpo.sft_weight=1.0",
            "dpo.warmup_steps=2", "align.max_new_tokens=4")  # fmt: skip
    sft.run(recipe(*sets), run, progress=False)
    baseline, whole = answer_shares(run, "sft")
    assert 0.25 < baseline < 0.7  # about 4/9 of the digits are even
    result = dpo.run(recipe(*sets), run, progress=False)
    assert result["val_accuracy"] >= 0.9
    assert whole > 0.95
    even, whole = answer_shares(run, "dpo")
    print(f"SFT even {baseline:.3f}; DPO even {even:.3f}, whole {whole:.3f}")
    # Six initial models on one CPU gave 0.93-0.97 even and 0.58-0.93 whole; another CPU's
    # floating-point path is another such draw, so the bounds sit below that spread. Without
    # sft_weight the answers drift to "4642" or nothing: whole 0.00 from one of those starts.
    assert even >= 0.85 > baseline + 0.3
    assert whole >= 0.5
