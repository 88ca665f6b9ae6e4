"""Direct preference optimisation: the SFT model learns from preference pairs without a reward
model, against the frozen SFT model as its reference.

The reference's log-probabilities of every pair never change, so they are computed once, before
training, with the starting weights (the policy and the reference are the same model then) and
cached in RUN/dpo/reference_logps.safetensors; a resumed run reads them back. Only the policy is
in memory during training. The response is every token after the prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scratchlm.align.batches import EncodedPair, PairLoader, pair_batch, response_mask
from scratchlm.align.losses import dpo_loss, sequence_logprobs
from scratchlm.align.stage import (
    StartedFrom,
    language_model,
    prepare_pairs,
    row_length,
    start_checkpoint,
    tokenizer_for,
    write_answers,
    write_rejects,
)
from scratchlm.checkpoint import Checkpoint
from scratchlm.config import DPOConfig, Recipe
from scratchlm.device import Runtime
from scratchlm.train.loop import Session

CACHE_FILE = "reference_logps.safetensors"


def pair_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(response | prompt) of the chosen and the rejected rows of a pair batch, [B] each."""
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = response_mask(batch["lengths"], batch["prompt_lens"], inputs.shape[1])
    logps = sequence_logprobs(model(inputs), targets, mask.to(tokens.device), average)
    chosen, rejected = logps.chunk(2)
    return chosen, rejected


@torch.no_grad()
def all_logprobs(
    model: torch.nn.Module,
    pairs: list[EncodedPair],
    pad_id: int,
    rows: int,
    runtime: Runtime,
    average: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_logprobs of many pairs, `rows` pairs per forward pass, on the CPU."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), rows):
        batch = pair_batch(pairs[start : start + rows], pad_id)
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        with runtime.autocast():
            c, r = pair_logprobs(model, batch, average)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    model.train(was_training)
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def reference_logprobs(
    model: torch.nn.Module,
    start: Checkpoint,
    splits: dict[str, list[EncodedPair]],
    cfg: DPOConfig,
    pad_id: int,
    session: Session,
) -> dict[str, torch.Tensor]:
    """{split}_chosen and {split}_rejected log-probabilities under the starting model, read from
    the cache when it was made from the same checkpoint, pairs and loss type."""
    digest = hashlib.sha256(str(start.path.resolve()).encode())
    digest.update((start.path / "manifest.json").read_bytes())
    digest.update(cfg.loss_type.encode())
    for name, pairs in splits.items():
        digest.update(name.encode())
        digest.update(json.dumps([(p.chosen, p.rejected, p.prompt_len) for p in pairs]).encode())
    key = digest.hexdigest()
    cache = session.stage_dir / CACHE_FILE
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                session.say(f"dpo: reference log-probabilities read from {cache}")
                return load_file(str(cache))
    model.to(session.runtime.device)
    reference: dict[str, torch.Tensor] = {}
    for name, pairs in splits.items():
        chosen, rejected = all_logprobs(
            model, pairs, pad_id, cfg.micro_batch_size, session.runtime, cfg.loss_type == "ipo"
        )
        reference[f"{name}_chosen"], reference[f"{name}_rejected"] = chosen, rejected
    if session.dist.is_main:
        tmp = cache.with_name(cache.name + ".tmp")
        save_file(reference, str(tmp), metadata={"key": key})
        tmp.replace(cache)
    session.say(f"dpo: reference log-probabilities of {sum(map(len, splits.values()))} pairs")
    return reference


def run(recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """DPO from RUN/sft (or dpo.init_from), which is also the frozen reference."""
    cfg = recipe.dpo
    start = start_checkpoint(run_dir, cfg.init_from, "sft", "dpo")
    session = Session("dpo", run_dir, cfg, recipe.parallel, resume, progress, False)
    model = language_model(start, "dpo")
    tokenizer = tokenizer_for(start, model)
    max_len = row_length(cfg.max_seq_len, model)
    data = prepare_pairs(cfg.data, tokenizer, max_len, cfg.truncation, cfg.val_fraction, "dpo")
    if session.dist.is_main:
        write_rejects(data, session.stage_dir)
    session.say(f"dpo: from {start.path}; {data.describe('pairs')}")
    reference = reference_logprobs(
        model, start, {"train": data.train, "val": data.val}, cfg, tokenizer.pad_id, session
    )
    average = cfg.loss_type == "ipo"  # IPO compares mean per-token log-probabilities

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        chosen, rejected = pair_logprobs(model, batch, average)
        loss, chosen_reward, rejected_reward = dpo_loss(
            chosen,
            rejected,
            batch["ref_chosen"],
            batch["ref_rejected"],
            cfg.beta,
            cfg.loss_type,
            cfg.label_smoothing,
        )
        if cfg.sft_weight:
            response_tokens = (batch["lengths"] - batch["prompt_lens"]).chunk(2)[0]
            per_token = chosen if average else chosen / response_tokens.clamp(min=1)
            loss = loss - cfg.sft_weight * per_token.mean()
        return loss, {
            "accuracy": (chosen_reward > rejected_reward).float().mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "chosen_logps": chosen.detach().mean(),
            "rejected_logps": rejected.detach().mean(),
        }

    def batch_of(indices: list[int], split: str) -> dict[str, torch.Tensor]:
        pairs = data.train if split == "train" else data.val
        batch = pair_batch([pairs[i] for i in indices], tokenizer.pad_id)
        batch["ref_chosen"] = reference[f"{split}_chosen"][indices]
        batch["ref_rejected"] = reference[f"{split}_rejected"][indices]
        return batch

    micro, accum = batch = session.batch_layout(cfg.pairs_per_step, cfg.micro_batch_size, "pairs")
    loader = PairLoader(
        data.train, cfg.pairs_per_step, cfg.seed, session.dist.dp_rank, session.dist.dp_size
    )
    trainer = session.trainer(model, batch)

    def train_step() -> dict[str, Any]:
        indices = loader.next_indices()
        micro_batches = [
            batch_of(indices[i : i + micro], "train") for i in range(0, len(indices), micro)
        ]
        tokens = sum(int(b["lengths"].sum()) for b in micro_batches) * session.dist.dp_size
        return {**trainer.step(micro_batches, loss_fn), "tokens": tokens}

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if not data.val:
            return {}
        policy = trainer.eval_model(micro)
        policy.eval()
        totals: dict[str, float] = {}
        for i in range(0, len(data.val), micro):
            indices = list(range(i, min(i + micro, len(data.val))))
            batch = {k: v.to(session.runtime.device) for k, v in batch_of(indices, "val").items()}
            with session.runtime.autocast():
                loss, metrics = loss_fn(policy, batch)
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(indices)
        policy.train()
        return {f"val_{k}": v / len(data.val) for k, v in totals.items()}

    stateful = {"loader": loader, "started_from": StartedFrom(start, run_dir)}
    result = session.run(train_step, evaluate, stateful)
    answers = (
        write_answers(recipe, run_dir, "dpo", result["checkpoint"]) if session.dist.is_main else []
    )
    val = (
        f"held-out implicit-reward accuracy {result['val_accuracy']:.3f} on {len(data.val):,} "
        f"pairs, margin {result['val_margin']:.3f}, "
        if "val_accuracy" in result
        else ""
    )
    session.say(
        f"dpo: {result['step']} steps on {len(data.train):,} pairs, {val}"
        f"{result['seconds']:.0f} s -> {result['checkpoint']}"
    )
    return {**result, "data": data.summary(), "answers": answers, "started_from": str(start.path)}
