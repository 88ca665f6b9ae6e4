"""What the alignment stages share: where a stage starts from, its data, and its answers.

Each stage (sft, reward, dpo, and the RL stages) starts from the checkpoint of an earlier stage,
records which one in its own checkpoints (trainer_state["started_from"], so evaluation can find a
policy's reference), reads its data through align/data.py with rejects written to
RUN/<stage>/data/rejected.jsonl, and ends by answering the recipe's align.prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scratchlm.align.batches import EncodedPair, encode_all, fit_chat, fit_pair
from scratchlm.align.data import (
    Dataset,
    Reject,
    read_chat,
    read_preferences,
    reason_kind,
    split_validation,
)
from scratchlm.align.data import write_rejects as write_reject_file
from scratchlm.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, load_weights
from scratchlm.config import Recipe
from scratchlm.errors import UserError
from scratchlm.loading import find_tokenizer
from scratchlm.model import ModelConfig, Transformer
from scratchlm.paths import resolve
from scratchlm.tokenizer import Tokenizer


def start_checkpoint(run_dir: Path, init_from: str, previous: str, stage: str) -> Checkpoint:
    """The verified checkpoint `stage` starts from: init_from if given, else RUN/<previous>."""
    if init_from:
        path = resolve(init_from)
        if not path.exists():
            raise UserError(f"{stage}.init_from = {init_from!r}: not found")
        if (path / previous).is_dir():  # a run folder: its stage folder
            path = path / previous
        return load_checkpoint(path)
    folder = run_dir / previous
    if not list_checkpoints(folder):
        raise UserError(
            f"{stage} starts from the {previous} model, but {folder} has no checkpoint: "
            f"run `scratchlm {previous} --run-dir {run_dir}` first"
        )
    return load_checkpoint(folder)


def language_model(ckpt: Checkpoint, stage: str) -> Transformer:
    config = ModelConfig.from_dict(ckpt.model_config)
    if config.head != "lm":
        raise UserError(f"{stage} needs a language model, but {ckpt.path} is a {config.head} model")
    model = Transformer(config)
    load_weights(model, ckpt.tensors)
    return model


def tokenizer_for(ckpt: Checkpoint, model: Transformer) -> Tokenizer:
    tokenizer = Tokenizer.load(find_tokenizer(ckpt.path))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{find_tokenizer(ckpt.path)} has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocab_size {model.config.vocab_size}"
        )
    return tokenizer


def describe_origin(ckpt: Checkpoint, run_dir: Path) -> str:
    """The checkpoint's path relative to the run folder when inside it (so the run can move)."""
    try:
        return str(ckpt.path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(ckpt.path.resolve())


class StartedFrom:
    """The checkpoint a stage started from, kept in each of its checkpoints' trainer_state."""

    def __init__(self, ckpt: Checkpoint, run_dir: Path) -> None:
        self.path = describe_origin(ckpt, run_dir)

    def state_dict(self) -> dict[str, str]:
        return {"checkpoint": self.path}

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.path = state["checkpoint"]


def origin_of(ckpt: Checkpoint) -> Path | None:
    """The checkpoint the stage of `ckpt` started from (its reference), if it recorded one."""
    recorded = ckpt.trainer_state.get("started_from", {}).get("checkpoint")
    if recorded is None:
        return None
    path = Path(recorded)
    return path if path.is_absolute() else ckpt.path.parent.parent / path


def row_length(configured: int, model: Transformer) -> int:
    context = model.config.max_seq_len
    return min(configured, context) if configured > 0 else context


@dataclass
class StageData:
    """A stage's records, split, encoded, with the rejects of every step."""

    train: list[Any]
    val: list[Any]
    rejects: list[Reject] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for r in self.rejects:
            reasons[reason_kind(r.reason)] = reasons.get(reason_kind(r.reason), 0) + 1
        return {"train": len(self.train), "val": len(self.val), "rejected": reasons}

    def describe(self, unit: str) -> str:
        text = f"{len(self.train):,} {unit} for training, {len(self.val):,} held out"
        if self.rejects:
            reasons = ", ".join(f"{n} {why}" for why, n in self.summary()["rejected"].items())
            text += f", {len(self.rejects):,} set aside ({reasons})"
        return text


def _prepare(
    dataset: Dataset, fit: Any, val_fraction: float, stage: str, unit: str, paths: list[str]
) -> StageData:
    train_records, val_records = split_validation(dataset.records, val_fraction)
    train, train_rejects = encode_all(dataset, fit, train_records)
    val, val_rejects = encode_all(dataset, fit, val_records)
    data = StageData(train, val, dataset.rejects + train_rejects + val_rejects)
    if not data.train:
        raise UserError(
            f"{stage}: no usable {unit} for training in {', '.join(paths)} "
            f"({dataset.describe()}; {len(train_rejects) + len(val_rejects)} too long)"
        )
    return data


def prepare_chats(
    paths: list[str], tokenizer: Tokenizer, max_len: int, truncation: str, val_fraction: float
) -> StageData:
    """Chats as (ids, assistant mask), split into train and validation."""
    dataset = read_chat(paths)
    fit = lambda r: fit_chat(tokenizer, r["messages"], max_len, truncation)  # noqa: E731
    return _prepare(dataset, fit, val_fraction, "sft", "conversations", paths)


def prepare_pairs(
    paths: list[str],
    tokenizer: Tokenizer,
    max_len: int,
    truncation: str,
    val_fraction: float,
    stage: str,
) -> StageData:
    """Preference pairs as EncodedPair, split into train and validation."""
    dataset = read_preferences(paths)

    def fit(record: dict) -> EncodedPair:
        pair = fit_pair(tokenizer, record, max_len, truncation)
        pair.margin = record.get("margin")
        return pair

    return _prepare(dataset, fit, val_fraction, stage, "preference pairs", paths)


def write_rejects(data: StageData, stage_dir: Path) -> None:
    write_reject_file(data.rejects, stage_dir / "data")


@torch.no_grad()
def answer(
    model: Transformer, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers of a chat model to single-turn prompts, up to its <|end|>."""
    from scratchlm.infer.generate import generate

    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        ids, _ = tokenizer.encode_chat([{"role": "user", "content": prompt}], True)
        new = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=(tokenizer.end_id,))
        answers.append(tokenizer.decode(list(new), skip_special=True))
    model.train(was_training)
    return answers


def write_answers(
    recipe: Recipe, run_dir: Path, stage: str, checkpoint: str | Path
) -> list[dict[str, str]]:
    """Greedy answers of the stage's final checkpoint to align.prompts, kept in
    RUN/<stage>/answers.json for the report and the pipeline's closing print (rank 0 only: it
    reads the checkpoint from disk, whatever the layout it was trained in)."""
    from scratchlm.loading import load

    model, tokenizer = load(checkpoint)
    prompts = recipe.align.prompts
    answers = answer(model, tokenizer, prompts, recipe.align.max_new_tokens)
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    (run_dir / stage / "answers.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    return rows


def read_answers(run_dir: Path, stage: str) -> list[dict[str, str]]:
    path = run_dir / stage / "answers.json"
    return json.loads(path.read_text()) if path.is_file() else []
