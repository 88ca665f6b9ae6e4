"""Tiny runs for the alignment tests: a tokenizer and a small model saved as RUN/pretrain."""

import json
import random
from pathlib import Path

import torch

from scratchlm.checkpoint import model_tensors, save_checkpoint
from scratchlm.config import Recipe, load_recipe
from scratchlm.model import ModelConfig, Transformer
from scratchlm.tokenizer import train_tokenizer

WORDS = "the cat dog sat ran on a mat big red sun hat box fox blue sky tree car".split()


def tiny_run(tmp_path: Path, texts: list[str], dim: int = 32, n_layers: int = 2, seq: int = 64):
    """A run folder with a tokenizer trained on `texts` and an untrained model as its pretrain
    checkpoint (step 0), initialised from a fixed seed so that a test's figures repeat."""
    run = tmp_path / "run"
    tokenizer = train_tokenizer(texts, 300, run / "tokenizer.json")
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, dim=dim, n_layers=n_layers, n_heads=2, n_kv_heads=1,
        max_seq_len=seq,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(config)
    save_checkpoint(run / "pretrain", 0, model_tensors(model), config.to_dict(), {"step": 0})
    return run


def recipe(*sets: str) -> Recipe:
    """The default recipe on the CPU, quiet about evaluation and saving, with overrides."""
    base = [f"{s}.device='cpu'" for s in ("sft", "reward", "dpo")]
    return load_recipe(None, [*base, "align.prompts=['Pick a number.']", *sets])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))
