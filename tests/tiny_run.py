"""A run folder with a trained tokenizer and a randomly initialised model, made in about a second:
what the inference, serving and export tests load."""

from __future__ import annotations

import gzip
from pathlib import Path

import torch

from scratchlm.checkpoint import model_tensors, save_checkpoint
from scratchlm.model import ModelConfig, Transformer
from scratchlm.paths import PROJECT_ROOT
from scratchlm.tokenizer import Tokenizer, train_tokenizer


def corpus(n_chars: int = 60_000) -> str:
    path = PROJECT_ROOT / "data" / "tinyshakespeare" / "input.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read(n_chars)


def make_tokenizer(folder: Path, vocab_size: int = 320) -> Tokenizer:
    text = corpus()
    return train_tokenizer(text.split("\n\n"), vocab_size, folder / "tokenizer.json")


def make_run(folder: Path, seed: int = 0, **model) -> Path:
    """folder/tokenizer.json and folder/pretrain/step-000000 (a random model over it)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    # Untied: a random tied model mostly repeats its last token, which makes dull test output.
    settings = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, tie_embeddings=False
    )
    settings |= model
    cfg = ModelConfig(vocab_size=tok.vocab_size, **settings)
    torch.manual_seed(seed)
    net = Transformer(cfg)
    save_checkpoint(folder / "pretrain", 0, model_tensors(net), cfg.to_dict(), {"step": 0})
    return folder
