"""GRPO: group-relative policy optimisation against a verifiable reward (Shao et al., 2024).

No value model and no reward model: each prompt is answered `group_size` times, a Python reward
function (`grpo.reward_fn`, `module:function`) checks every answer, and each answer's advantage
is its reward against its group's (minus the group mean, over the group's standard deviation).
The policy takes the clipped-ratio step on those advantages, with an optional KL penalty
(kl_coef > 0, estimator k3 by default) to the frozen starting policy.

One step of the training loop is `prompts_per_step` prompts x `group_size` responses, then
`epochs` passes over them in minibatches of `minibatch_size` responses, one optimizer step each.
Evaluation answers held-out prompts greedily: with an exact-match reward, `val_reward` is the
exact-match accuracy.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from scratchlm import parallel
from scratchlm.align.losses import group_advantages, grpo_loss, masked_mean, token_logprobs
from scratchlm.align.rl import (
    PromptOrder,
    SkippedRollouts,
    check_layout,
    finite,
    frozen,
    function_rewards,
    rank_slice,
    read_prompts,
    response_text,
    run_rollout_stage,
    sample_answers,
    sample_rollout,
    start_policy,
    step_seed,
    trim_padding,
)
from scratchlm.align.rollout import (
    NonFiniteLogits,
    score_rows,
    token_entropy,
)
from scratchlm.align.stage import StartedFrom
from scratchlm.align.tasks import load_reward_fn
from scratchlm.config import Recipe
from scratchlm.errors import UserError
from scratchlm.train.loop import Session


def run(recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train the policy with GRPO; returns the final figures. Rank 0 writes all files."""
    cfg = recipe.grpo
    check_layout("grpo", recipe.parallel)
    responses_per_step = cfg.prompts_per_step * cfg.group_size
    if cfg.group_size < 2 or responses_per_step % cfg.minibatch_size or cfg.epochs < 1:
        raise UserError(
            f"grpo: group_size={cfg.group_size} must be at least 2, prompts_per_step x "
            f"group_size={responses_per_step} a multiple of minibatch_size={cfg.minibatch_size}, "
            "and epochs at least 1"
        )
    reward_fn = load_reward_fn(cfg.reward_fn, "grpo.reward_fn")
    start = start_policy(run_dir, cfg, "grpo")
    policy, tokenizer = start.policy, start.tokenizer
    session = Session("grpo", run_dir, cfg, recipe.parallel, resume, progress, False)
    rejects_to = session.stage_dir / "data" if session.dist.is_main else None
    prompts = read_prompts(cfg, "grpo", tokenizer, policy.config.max_seq_len, rejects_to)
    session.say(
        f"grpo: policy {start.checkpoint.path}, reward {cfg.reward_fn}; {prompts.describe()}"
    )
    device, dist = session.runtime.device, session.dist
    if cfg.prompts_per_step % dist.dp_size:
        raise UserError(
            f"grpo.prompts_per_step={cfg.prompts_per_step} does not split over {dist.dp_size} ranks"
        )
    reference = frozen(copy.deepcopy(policy), device) if cfg.kl_coef > 0 else None
    micro, accum = batch = session.batch_layout(cfg.minibatch_size, cfg.micro_batch_size, "rows")
    actor = session.trainer(policy, batch)
    order = PromptOrder(len(prompts.train), cfg.seed)
    stateful: dict[str, Any] = {
        "prompts": order,
        "started_from": StartedFrom(start.checkpoint, run_dir),
    }
    skipped = SkippedRollouts("grpo", cfg.max_skipped_rollouts)
    held_out = prompts.held_out[: cfg.eval_prompts]

    def loss_fn(model, mb):
        logits = model(mb["inputs"])
        loss, stats = grpo_loss(
            token_logprobs(logits, mb["targets"]),
            mb["old_logprobs"],
            mb["advantages"],
            mb["mask"],
            cfg.clip_range,
            mb.get("ref_logprobs"),
            cfg.kl_coef,
            cfg.kl_estimator,
        )
        with torch.no_grad():
            stats["entropy"] = masked_mean(token_entropy(logits), mb["mask"])
        return loss, stats

    def rollout() -> dict[str, Any] | str:
        """Sample and score one batch of groups; a string says why it must be skipped."""
        chosen = [prompts.train[i] for i in rank_slice(order.take(cfg.prompts_per_step), session)]
        grouped = [p for p in chosen for _ in range(cfg.group_size)]
        model = parallel.unwrap(actor.model)
        seed = step_seed(cfg.seed, session.step, dist.dp_rank, skipped.count)
        with torch.no_grad(), session.runtime.autocast():
            try:
                samples, rows, generated = sample_rollout(
                    model, grouped, cfg, tokenizer, seed, device
                )
            except NonFiniteLogits as e:
                return str(e)
            texts = [response_text(s, tokenizer) for s in samples]
            rewards = function_rewards(reward_fn, cfg.reward_fn, grouped, texts)
            if not finite(rewards):
                return "NaN reward"
            data = {
                "inputs": rows.inputs,
                "targets": rows.targets,
                "mask": rows.mask,
                "old_logprobs": score_rows(model, rows, micro) * rows.mask,
                "advantages": group_advantages(rewards, cfg.group_size, cfg.scale_rewards).to(
                    device
                ),
            }
            if reference is not None:
                data["ref_logprobs"] = score_rows(reference, rows, micro) * rows.mask
        if not finite(*(v for k, v in data.items() if k.endswith("logprobs"))):
            return "NaN or infinite log-probabilities"
        groups = rewards.view(-1, cfg.group_size)
        return {
            "batch": data,
            "stats": {
                "reward": float(rewards.mean()),
                "reward_std": float(groups.std(dim=1).mean()),
                "uniform_groups": float((groups.std(dim=1) == 0).float().mean()),
                "end_rate": sum(s.finish == "stop" for s in samples) / len(samples),
                "response_length": float(rows.mask.sum(1).mean()),
                "rollout_tokens_per_s": float(rows.mask.sum()) / generated,
            },
            "tokens": int(rows.mask.sum()) + sum(len(p.ids) for p in grouped),
            "generate_seconds": generated,
        }

    def train_step() -> dict[str, float]:
        step_start = time.time()
        while isinstance(result := rollout(), str):
            skipped.skip(session, stateful, result)
        data = result["batch"]
        rows = data["inputs"].shape[0]
        train_start = time.time()
        generator = torch.Generator().manual_seed(cfg.seed + session.step)
        stats, trained = [], 0
        for _ in range(cfg.epochs):
            shuffled = torch.randperm(rows, generator=generator).to(device)
            for first in range(0, rows, micro * accum):
                picked = shuffled[first : first + micro * accum]
                mb = trim_padding({k: v[picked] for k, v in data.items()})
                trained += mb["inputs"].numel()
                stats.append(actor.step(mb, loss_fn))
        local = {
            **result["stats"],
            "train_tokens_per_s": trained / (time.time() - train_start),
            "generate_share": result["generate_seconds"] / (time.time() - step_start),
            "tokens": result["tokens"],
        }
        means = dist.mean(torch.tensor(list(local.values()), device=device)).tolist()
        metrics = dict(zip(local, means, strict=True))
        for key in stats[0]:
            metrics[key] = sum(s[key] for s in stats) / len(stats)
        metrics["skipped_rollouts"] = skipped.count
        metrics["tokens"] *= dist.dp_size
        return metrics

    def evaluate() -> dict[str, float]:
        if not held_out:
            return {}
        model = parallel.unwrap(actor.model)
        with torch.no_grad(), session.runtime.autocast():
            samples = sample_answers(model, held_out, cfg, tokenizer, cfg.seed, temperature=0.0)
        texts = [response_text(s, tokenizer) for s in samples]
        rewards = function_rewards(reward_fn, cfg.reward_fn, held_out, texts)
        return {
            "val_reward": float(rewards.nanmean()),
            "val_end_rate": sum(s.finish == "stop" for s in samples) / len(samples),
            "val_response_length": sum(len(s.tokens) for s in samples) / len(samples),
        }

    return run_rollout_stage(
        session,
        train_step,
        evaluate,
        stateful,
        skipped,
        recipe,
        start.checkpoint.path,
        lambda r: f" on {len(held_out)} greedy answers, {r['val_end_rate']:.0%} ended",
    )
