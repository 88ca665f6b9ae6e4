"""Supervised fine-tuning: the pretrained model learns to answer in the chat template.

The loss is the cross-entropy on the assistant's tokens only (each reply and its closing <|end|>;
Tokenizer.encode_chat gives the mask). Conversations are packed into rows of max_seq_len tokens
(first-fit), each a segment of its row: attention stays inside it and its positions restart, so a
packed row computes what each conversation would alone, with no padding spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scratchlm.align.batches import PackedChatLoader, pack_chats
from scratchlm.align.losses import IGNORE, masked_cross_entropy
from scratchlm.align.stage import (
    StartedFrom,
    language_model,
    prepare_chats,
    row_length,
    start_checkpoint,
    tokenizer_for,
    write_answers,
    write_rejects,
)
from scratchlm.config import Recipe
from scratchlm.device import Runtime
from scratchlm.train.loop import Session, to_device


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Mean cross-entropy over the assistant tokens of a batch of packed rows."""
    logits = model(batch["tokens"], segment_ids=batch["segments"])
    targets = batch["targets"]
    mask = targets != IGNORE
    return masked_cross_entropy(logits, targets, mask), {"assistant_tokens": mask.sum()}


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, rows: dict[str, torch.Tensor], micro: int, runtime: Runtime
) -> float:
    """Cross-entropy per assistant token over all held-out rows (each micro-batch weighted by
    its number of assistant tokens, so the figure does not depend on how rows are batched)."""
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(rows["tokens"]), micro):
        batch = to_device({k: v[start : start + micro] for k, v in rows.items()}, runtime.device)
        with runtime.autocast():
            loss, metrics = sft_loss(model, batch)
        n = int(metrics["assistant_tokens"])
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def run(recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune RUN/pretrain (or sft.init_from) on chat data; returns the final figures."""
    cfg = recipe.sft
    start = start_checkpoint(run_dir, cfg.init_from, "pretrain", "sft")
    session = Session("sft", run_dir, cfg, recipe.parallel, resume, progress, False)
    model = language_model(start, "sft")
    tokenizer = tokenizer_for(start, model)
    seq_len = row_length(cfg.max_seq_len, model)
    # A conversation of n tokens fills n - 1 input places: it may have seq_len + 1 tokens.
    data = prepare_chats(cfg.data, tokenizer, seq_len + 1, cfg.truncation, cfg.val_fraction)
    if session.dist.is_main:
        write_rejects(data, session.stage_dir)
    session.say(f"sft: from {start.path}; {data.describe('conversations')}")
    micro, accum = batch = session.batch_layout(cfg.rows_per_step, cfg.micro_batch_size)
    loader = PackedChatLoader(
        data.train,
        seq_len,
        tokenizer.pad_id,
        cfg.rows_per_step,
        cfg.seed,
        session.dist.dp_rank,
        session.dist.dp_size,
    )
    session.say(
        f"sft: {loader.rows_per_epoch()} rows of {seq_len} tokens per epoch, "
        f"{cfg.rows_per_step} rows per step ({micro} x {accum} per rank)"
    )
    val_rows = pack_chats(data.val, seq_len, tokenizer.pad_id) if data.val else None
    trainer = session.trainer(model, batch)

    def train_step() -> dict[str, Any]:
        metrics = trainer.step(loader.next_batch(), sft_loss)
        # The loop's "tokens" is the global batch: every place of every row is computed.
        return {**metrics, "tokens": cfg.rows_per_step * seq_len}

    def evaluate() -> dict[str, float]:
        if val_rows is None:
            return {}
        model = trainer.eval_model(micro)
        return {"val_loss": validation_loss(model, val_rows, micro, session.runtime)}

    stateful = {"loader": loader, "started_from": StartedFrom(start, run_dir)}
    result = session.run(train_step, evaluate, stateful)
    answers = (
        write_answers(recipe, run_dir, "sft", result["checkpoint"]) if session.dist.is_main else []
    )
    val = f"val_loss {result['val_loss']:.4f} on assistant tokens, " if "val_loss" in result else ""
    session.say(
        f"sft: {result['step']} steps on {len(data.train):,} conversations, {val}"
        f"{result['seconds']:.0f} s -> {result['checkpoint']}"
    )
    return {**result, "data": data.summary(), "answers": answers, "started_from": str(start.path)}
