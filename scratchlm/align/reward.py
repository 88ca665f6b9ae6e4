"""The reward model: the SFT model with a scalar head, trained on preference pairs.

The reward of a (prompt, response) is the scalar head's value at the last token of
`tokenizer.encode_chat(prompt + [{"role": "assistant", "content": response}])`: the <|end|> that
closes the response, after the model has read all of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scratchlm.align.batches import EncodedPair, PairLoader, pair_batch
from scratchlm.align.losses import bradley_terry_loss
from scratchlm.align.stage import (
    StartedFrom,
    prepare_pairs,
    row_length,
    start_checkpoint,
    tokenizer_for,
    write_rejects,
)
from scratchlm.checkpoint import Checkpoint
from scratchlm.config import Recipe
from scratchlm.errors import UserError
from scratchlm.model import ModelConfig, Transformer
from scratchlm.train.loop import Session


def score(
    reward_model: torch.nn.Module, token_rows: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Rewards [B] of right-padded token rows [B, T] (each starting with <|bos|> at position 0,
    ending with the response's <|end|> at lengths - 1): the scalar head read at lengths - 1.
    Padding after a row's end does not change its reward (attention is causal)."""
    values = reward_model(token_rows)  # [B, T]
    return values.gather(1, (lengths.to(values.device) - 1).unsqueeze(1)).squeeze(1)


def scalar_model(ckpt: Checkpoint, stage: str) -> Transformer:
    """The checkpoint's model with a new scalar head: every weight but the output layer."""
    config = ModelConfig.from_dict({**ckpt.model_config, "head": "scalar"})
    model = Transformer(config)
    tensors = {k: v for k, v in ckpt.tensors.items() if k != "output.weight"}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) != {"output.weight"}:
        raise UserError(
            f"{stage}: the weights of {ckpt.path} do not fit its config "
            f"(missing {sorted(set(missing) - {'output.weight'})}, unexpected {sorted(unexpected)})"
        )
    return model


def pair_tensors(pairs: list[EncodedPair], pad_id: int, margin: float) -> dict[str, torch.Tensor]:
    batch = pair_batch(pairs, pad_id)
    batch["margin"] = torch.tensor(
        [margin if p.margin is None else p.margin for p in pairs], dtype=torch.float32
    )
    return batch


def reward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Bradley-Terry on the rewards of the chosen (first half) and rejected (second half) rows."""
    rewards = score(model, batch["tokens"], batch["lengths"]).float()
    chosen, rejected = rewards.chunk(2)
    loss = bradley_terry_loss(chosen, rejected, batch["margin"])
    return loss, {
        "accuracy": (chosen > rejected).float().mean(),
        "margin": (chosen - rejected).mean(),
    }


@torch.no_grad()
def evaluate_pairs(
    model: torch.nn.Module, pairs: list[EncodedPair], pad_id: int, micro: int, session: Session
) -> dict[str, float]:
    """val_loss, val_accuracy (ties count half) and val_margin over all held-out pairs."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), micro):
        batch = pair_batch(pairs[start : start + micro], pad_id)
        with session.runtime.autocast():
            rewards = score(model, batch["tokens"].to(session.runtime.device), batch["lengths"])
        c, r = rewards.float().cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train()
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {
        "val_loss": float(bradley_terry_loss(c, r)),
        "val_accuracy": float(((c > r).float() + 0.5 * (c == r).float()).mean()),
        "val_margin": float((c - r).mean()),
    }


def run(recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train the reward model from RUN/sft (or reward.init_from); returns the final figures."""
    cfg = recipe.reward
    start = start_checkpoint(run_dir, cfg.init_from, "sft", "reward")
    session = Session("reward", run_dir, cfg, recipe.parallel, resume, progress, False)
    model = scalar_model(start, "reward")
    tokenizer = tokenizer_for(start, model)
    max_len = row_length(cfg.max_seq_len, model)
    data = prepare_pairs(cfg.data, tokenizer, max_len, cfg.truncation, cfg.val_fraction, "reward")
    if session.dist.is_main:
        write_rejects(data, session.stage_dir)
    session.say(f"reward: from {start.path}; {data.describe('pairs')}")
    micro, accum = batch = session.batch_layout(cfg.pairs_per_step, cfg.micro_batch_size, "pairs")
    loader = PairLoader(
        data.train, cfg.pairs_per_step, cfg.seed, session.dist.dp_rank, session.dist.dp_size
    )
    trainer = session.trainer(model, batch)

    def train_step() -> dict[str, Any]:
        pairs = [data.train[i] for i in loader.next_indices()]
        # Each micro-batch is padded to its own longest row.
        micro_batches = [
            pair_tensors(pairs[i : i + micro], tokenizer.pad_id, cfg.margin)
            for i in range(0, len(pairs), micro)
        ]
        tokens = sum(int(b["lengths"].sum()) for b in micro_batches) * session.dist.dp_size
        return {**trainer.step(micro_batches, reward_loss), "tokens": tokens}

    def evaluate() -> dict[str, float]:
        if not data.val:
            return {}
        return evaluate_pairs(trainer.eval_model(micro), data.val, tokenizer.pad_id, micro, session)

    stateful = {"loader": loader, "started_from": StartedFrom(start, run_dir)}
    result = session.run(train_step, evaluate, stateful)
    val = (
        f"held-out accuracy {result['val_accuracy']:.3f} on {len(data.val):,} pairs, "
        f"mean margin {result['val_margin']:.3f}, "
        if "val_accuracy" in result
        else ""
    )
    session.say(
        f"reward: {result['step']} steps on {len(data.train):,} pairs, {val}"
        f"{result['seconds']:.0f} s -> {result['checkpoint']}"
    )
    return {**result, "data": data.summary(), "started_from": str(start.path)}
