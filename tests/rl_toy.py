"""Tiny policies for the PPO and GRPO tests: a tokenizer and a model fine-tuned on made-up chats
whose answers are known, saved as a run folder's sft/ (and reward/) checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from scratchlm.align.tasks import arithmetic_problems
from scratchlm.checkpoint import model_tensors, save_checkpoint
from scratchlm.model import ModelConfig, Transformer
from scratchlm.tokenizer import Tokenizer, render_chat, train_tokenizer

COLORS = ["red", "blue", "green", "pink", "gray"]
THINGS = [
    "car", "hat", "door", "kite", "ball", "cup", "bike", "lamp", "shoe", "boat",
    "bag", "bed", "box", "coat", "fish", "bird", "cake", "desk", "sock", "tent",
    "vase", "wall", "ring", "rug", "pen", "mug", "fan", "kettle", "bench", "chair",
    "clock", "drum", "flag", "glove", "house", "jar", "key", "leaf", "mask", "nest",
]  # fmt: skip
TINY = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48, tie_embeddings=True)


def color_chats(seed: int = 0, copies: int = 2) -> list[dict]:
    """'What color is the car?' answered `copies` times with each colour, so one answer in five
    for every thing is blue."""
    rng = random.Random(seed)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What color is the {thing}?"},
                {"role": "assistant", "content": f"The {thing} is {color}."},
            ]
        }
        for thing in THINGS
        for color in COLORS * copies
    ]
    rng.shuffle(chats)
    return chats


def likes_blue(prompt: list[dict], response: str, reference: str) -> float:
    """The rule PPO learns: 1 for an answer that says blue, else 0."""
    return float("blue" in response.split(" ")[-1])


NAN_CALLS = 0
"""nan_at_first returns NaN for this many more calls."""


def nan_at_first(prompt: list[dict], response: str, reference: str) -> float:
    """likes_blue, but NaN for the first NAN_CALLS calls: a broken rollout batch."""
    global NAN_CALLS
    if NAN_CALLS > 0:
        NAN_CALLS -= 1
        return float("nan")
    return likes_blue(prompt, response, reference)


def raises(prompt: list[dict], response: str, reference: str) -> float:
    raise ValueError("no reward today")


def noisy_arithmetic(max_operand: int, correct_share: float, seed: int = 0) -> list[dict]:
    """Every problem a few times; an answer is right with probability correct_share, else one
    too high: a policy that can answer right but has a habit of answering wrong."""
    rng = random.Random(seed)
    chats = []
    for record in arithmetic_problems(max_operand, seed) * 6:
        question, answer = (m["content"] for m in record["messages"])
        value = int(answer)
        if rng.random() > correct_share:
            value += 1
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": str(value)},
                ]
            }
        )
    return chats


def make_tokenizer(path: Path, chats: list[dict]) -> Tokenizer:
    texts = [render_chat(c["messages"]) for c in chats] * 3
    return train_tokenizer(texts, vocab_size=320, out_path=path, min_frequency=2)


def fine_tune(
    tokenizer: Tokenizer, chats: list[dict], steps: int, seed: int = 0, lr: float = 3e-3
) -> Transformer:
    """A fresh tiny model trained on the assistant tokens of the chats (cross-entropy)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **TINY))
    encoded = [tokenizer.encode_chat(c["messages"]) for c in chats]
    width = max(len(ids) for ids, _ in encoded)
    tokens = torch.zeros(len(encoded), width, dtype=torch.long)
    targets = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(encoded):
        tokens[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(ids) - 1] = torch.tensor(
            [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(encoded), (32,), generator=generator)
        logits = model(tokens[rows, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[rows, :-1].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def save_model(model: Transformer, stage_dir: Path) -> Path:
    return save_checkpoint(
        stage_dir, 1, model_tensors(model), model.config.to_dict(), {"step": 1}, keep=1
    )


def train_reward_model(
    tokenizer: Tokenizer, policy: Transformer, steps: int, seed: int = 0
) -> Transformer:
    """A reward model that learnt "blue is better" from pairs (Bradley-Terry on the score at the
    <|end|> closing the answer), starting from the policy's weights."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**policy.config.to_dict(), "head": "scalar"}))
    trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("output.")}
    model.load_state_dict(trunk, strict=False)
    rng = random.Random(seed)
    pairs = []
    for thing in THINGS:
        prompt = [{"role": "user", "content": f"What color is the {thing}?"}]
        for other in COLORS[:1] + COLORS[2:]:
            answers = [f"The {thing} is {c}." for c in ("blue", other)]
            pairs.append(
                [
                    tokenizer.encode_chat([*prompt, {"role": "assistant", "content": a}])[0]
                    for a in answers
                ]
            )
    rng.shuffle(pairs)
    width = max(len(ids) for pair in pairs for ids in pair)
    tokens = torch.zeros(len(pairs), 2, width, dtype=torch.long)
    last = torch.zeros(len(pairs), 2, dtype=torch.long)
    for i, pair in enumerate(pairs):
        for j, ids in enumerate(pair):
            tokens[i, j, : len(ids)] = torch.tensor(ids)
            last[i, j] = len(ids) - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(pairs), (16,), generator=generator)
        values = model(tokens[rows].flatten(0, 1)).view(16, 2, width)
        scores = values.gather(2, last[rows].unsqueeze(2)).squeeze(2)
        loss = -torch.nn.functional.logsigmoid(scores[:, 0] - scores[:, 1]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
