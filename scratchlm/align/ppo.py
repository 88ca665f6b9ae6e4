"""PPO, the seed's path: the SFT policy learns to write answers the reward model scores high,
held near the SFT model by a per-token KL penalty (Ouyang et al., 2022; as OpenRLHF and TRL).

One step of the training loop is one rollout batch:
1. rollout: a response to each of `rollout_batch` prompts, sampled from the policy;
2. scoring: the policy's and the frozen reference's log-probability of each response token, the
   value model's value before it, and the reward of the whole answer: the reward model's score
   at its closing <|end|> (or a rule's, `reward_fn`), less `missing_end_penalty` when the
   response never ended;
3. credit: per-token rewards -kl_coef * KL_t with the reward added at the last token; GAE
   advantages, whitened over the batch, and returns;
4. update: `epochs` passes over the batch in shuffled minibatches; each minibatch is one
   optimizer step of the policy (clipped ratio) and one of the value model (clipped values).

The value model starts as a copy of the reward model: it reads the same conversations and its
head already scores answers on the reward's scale, so its first values are close to the returns
(InstructGPT and OpenRLHF do the same). With a reward function there is no reward model, and it
starts from the SFT policy's weights with a new scalar head at zero. Policy and value model are
two trainers of one session: saved in one checkpoint (model.* and critic.*) and resumed together.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from scratchlm import parallel
from scratchlm.align.losses import (
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
)
from scratchlm.align.reward import scalar_model
from scratchlm.align.rl import (
    PromptOrder,
    SkippedRollouts,
    check_layout,
    finite,
    frozen,
    function_rewards,
    model_of,
    rank_slice,
    read_prompts,
    response_text,
    reward_checkpoint,
    reward_model_scores,
    run_rollout_stage,
    sample_answers,
    sample_rollout,
    start_policy,
    step_seed,
    trim_padding,
)
from scratchlm.align.rollout import (
    NonFiniteLogits,
    build_rows,
    score_rows,
    token_entropy,
)
from scratchlm.align.stage import StartedFrom
from scratchlm.align.tasks import load_reward_fn
from scratchlm.config import PPOConfig, Recipe
from scratchlm.errors import UserError
from scratchlm.train.loop import Session


class KLController:
    """The KL coefficient: fixed, or moved toward kl_target nats per response (Ziegler et al.,
    2019): by a factor 1 + clip(KL / target - 1, -0.2, 0.2) * responses / horizon."""

    def __init__(self, cfg: PPOConfig) -> None:
        self.cfg, self.value = cfg, cfg.kl_coef

    def update(self, kl: float, responses: int) -> None:
        if self.cfg.kl_target > 0:
            error = max(-0.2, min(0.2, kl / self.cfg.kl_target - 1.0))
            self.value *= 1.0 + error * responses / self.cfg.kl_horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over response tokens: 1 is a perfect critic."""
    var = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
    residual = returns - values
    var_res = masked_mean((residual - masked_mean(residual, mask)).square(), mask)
    return float(1.0 - var_res / var.clamp(min=1e-8))


def run(recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train the policy with PPO; returns the final figures. Rank 0 writes all files."""
    cfg = recipe.ppo
    check_layout("ppo", recipe.parallel)
    if cfg.rollout_batch % cfg.minibatch_size or cfg.epochs < 1:
        raise UserError(
            f"ppo.rollout_batch={cfg.rollout_batch} must be a multiple of ppo.minibatch_size="
            f"{cfg.minibatch_size}, and ppo.epochs at least 1"
        )
    start = start_policy(run_dir, cfg, "ppo")
    policy, tokenizer = start.policy, start.tokenizer
    reward_fn = load_reward_fn(cfg.reward_fn, "ppo.reward_fn") if cfg.reward_fn else None
    if reward_fn is None:
        reward_ckpt = reward_checkpoint(run_dir, cfg.reward_model)
        reward_model, reward_source = model_of(reward_ckpt), str(reward_ckpt.path)
        critic = model_of(reward_ckpt)
    else:
        reward_model, reward_source = None, cfg.reward_fn
        critic = scalar_model(start.checkpoint, "ppo")
        torch.nn.init.zeros_(critic.output.weight)
    session = Session("ppo", run_dir, cfg, recipe.parallel, resume, progress, False)
    rejects_to = session.stage_dir / "data" if session.dist.is_main else None
    prompts = read_prompts(cfg, "ppo", tokenizer, policy.config.max_seq_len, rejects_to)
    session.say(
        f"ppo: policy {start.checkpoint.path}, reward {reward_source}; {prompts.describe()}"
    )
    device, dist = session.runtime.device, session.dist
    reference = frozen(copy.deepcopy(policy), device)
    if reward_model is not None:
        reward_model = frozen(reward_model, device)
    micro, accum = batch = session.batch_layout(cfg.minibatch_size, cfg.micro_batch_size, "rows")
    actor = session.trainer(policy, batch)
    value_trainer = session.trainer(critic, batch, name="critic")
    if cfg.critic_lr > 0:
        for group in value_trainer.optimizer.param_groups:
            group["base_lr"] = cfg.critic_lr
    order = PromptOrder(len(prompts.train), cfg.seed)
    kl_ctl = KLController(cfg)
    stateful: dict[str, Any] = {
        "prompts": order,
        "kl_controller": kl_ctl,
        "started_from": StartedFrom(start.checkpoint, run_dir),
    }
    skipped = SkippedRollouts("ppo", cfg.max_skipped_rollouts)
    held_out = prompts.held_out[: cfg.eval_prompts]

    def rewards_of(chosen, samples) -> torch.Tensor:
        texts = [response_text(s, tokenizer) for s in samples]
        if reward_fn is not None:
            return function_rewards(reward_fn, cfg.reward_fn, chosen, texts)
        ended = [s.finish == "stop" for s in samples]
        return reward_model_scores(reward_model, tokenizer, chosen, texts, ended, micro)

    def policy_loss(model, mb):
        logits = model(mb["inputs"])
        logp = token_logprobs(logits, mb["targets"])
        loss, stats = ppo_policy_loss(
            logp, mb["old_logprobs"], mb["advantages"], mb["mask"], cfg.clip_range
        )
        with torch.no_grad():
            stats["entropy"] = masked_mean(token_entropy(logits), mb["mask"])
        return loss, stats

    def value_loss(model, mb):
        return ppo_value_loss(
            model(mb["inputs"]), mb["old_values"], mb["returns"], mb["mask"], cfg.value_clip_range
        )

    def rollout() -> dict[str, Any] | str:
        """Sample and score one batch; a string says why it must be skipped."""
        chosen = [prompts.train[i] for i in rank_slice(order.take(cfg.rollout_batch), session)]
        model = parallel.unwrap(actor.model)
        seed = step_seed(cfg.seed, session.step, dist.dp_rank, skipped.count)
        with torch.no_grad(), session.runtime.autocast():
            try:
                samples, rows, generated = sample_rollout(
                    model, chosen, cfg, tokenizer, seed, device
                )
            except NonFiniteLogits as e:
                return str(e)
            logprobs = score_rows(model, rows, micro) * rows.mask
            ref_logprobs = score_rows(reference, rows, micro) * rows.mask
            values = score_rows(parallel.unwrap(value_trainer.model), rows, micro, True)
            values = values * rows.mask
            scores = rewards_of(chosen, samples)
        if not finite(logprobs, ref_logprobs, values):
            return "NaN or infinite log-probabilities or values"
        if not finite(scores):
            return "NaN reward"
        ended = torch.tensor([s.finish == "stop" for s in samples], device=device)
        penalised = scores.to(device) - cfg.missing_end_penalty * (~ended).float()
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * rows.mask
        token_rewards = -kl_ctl.value * kl
        token_rewards[torch.arange(len(samples), device=device), rows.last] += penalised
        advantages, returns = gae(token_rewards, values, rows.mask, cfg.gamma, cfg.lam)
        lengths = rows.mask.sum(1)
        return {
            "batch": {
                "inputs": rows.inputs,
                "targets": rows.targets,
                "mask": rows.mask,
                "old_logprobs": logprobs,
                "old_values": values,
                "advantages": masked_whiten(advantages, rows.mask),
                "returns": returns,
            },
            "stats": {
                "reward": float(scores.mean()),
                "kl": float((logprobs - ref_logprobs).sum(1).mean()),
                "end_rate": float(ended.float().mean()),
                "response_length": float(lengths.mean()),
                "explained_variance": explained_variance(values, returns, rows.mask),
            },
            "generated_tokens": int(lengths.sum()),
            "tokens": int(rows.mask.sum()) + sum(len(p.ids) for p in chosen),
            "generate_seconds": generated,
        }

    def train_step() -> dict[str, float]:
        step_start = time.time()
        while isinstance(result := rollout(), str):
            skipped.skip(session, stateful, result)
        data, rows = result["batch"], result["batch"]["inputs"].shape[0]
        kl_ctl.update(result["stats"]["kl"], rows * dist.dp_size)
        train_start = time.time()
        generator = torch.Generator().manual_seed(cfg.seed + session.step)
        policy_stats, value_stats, trained = [], [], 0
        for _ in range(cfg.epochs):
            shuffled = torch.randperm(rows, generator=generator).to(device)
            for first in range(0, rows, micro * accum):
                picked = shuffled[first : first + micro * accum]
                mb = trim_padding({k: v[picked] for k, v in data.items()})
                trained += mb["inputs"].numel()
                policy_stats.append(actor.step(mb, policy_loss))
                value_stats.append(value_trainer.step(mb, value_loss))
        train_seconds = time.time() - train_start
        step_seconds = time.time() - step_start
        local = {
            **result["stats"],
            "rollout_tokens_per_s": result["generated_tokens"] / result["generate_seconds"],
            "train_tokens_per_s": trained / train_seconds,
            "generate_share": result["generate_seconds"] / step_seconds,
            "tokens": result["tokens"],
        }
        means = dist.mean(torch.tensor(list(local.values()), device=device)).tolist()
        metrics = dict(zip(local, means, strict=True))
        for key in ("loss", "clip_fraction", "approx_kl", "entropy", "grad_norm"):
            metrics[key] = sum(s[key] for s in policy_stats) / len(policy_stats)
        for key, name in (("loss", "value_loss"), ("value_clip_fraction", "value_clip_fraction")):
            metrics[name] = sum(s[key] for s in value_stats) / len(value_stats)
        metrics["kl_coef"] = kl_ctl.value
        metrics["skipped_rollouts"] = skipped.count
        metrics["tokens"] *= dist.dp_size
        return metrics

    def evaluate() -> dict[str, float]:
        if not held_out:
            return {}
        model = parallel.unwrap(actor.model)
        with torch.no_grad(), session.runtime.autocast():
            samples = sample_answers(model, held_out, cfg, tokenizer, seed=cfg.seed)
            scores = rewards_of(held_out, samples)
            responses = [s.tokens for s in samples]
            rows = build_rows([p.ids for p in held_out], responses, device, tokenizer.pad_id)
            kl = (score_rows(model, rows, micro) - score_rows(reference, rows, micro)) * rows.mask
        return {
            "val_reward": float(scores.nanmean()),
            "val_kl": float(kl.sum(1).mean()),
            "val_end_rate": sum(s.finish == "stop" for s in samples) / len(samples),
            "val_response_length": float(rows.mask.sum(1).mean()),
        }

    return run_rollout_stage(
        session,
        train_step,
        evaluate,
        stateful,
        skipped,
        recipe,
        start.checkpoint.path,
        lambda r: f", KL {r['val_kl']:.2f} nats, {r['val_end_rate']:.0%} ended",
    )
