"""What PPO and GRPO share: the starting policy and its tokenizer, the prompt order, answering and
scoring prompts, and skipping rollouts whose rewards or logits are NaN."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scratchlm.align.batches import pad_rows
from scratchlm.align.data import write_rejects
from scratchlm.align.prompts import Prompt, Prompts, load_prompts
from scratchlm.align.reward import score
from scratchlm.align.rollout import Rows, Sample, build_rows, sample_batch
from scratchlm.align.stage import language_model, start_checkpoint, tokenizer_for, write_answers
from scratchlm.align.tasks import RewardFn, call_reward
from scratchlm.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, load_weights
from scratchlm.config import ParallelConfig, Recipe, RolloutConfig
from scratchlm.errors import UserError
from scratchlm.loading import is_run_dir
from scratchlm.model import ModelConfig, Transformer
from scratchlm.paths import resolve
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.loop import Session

ANSWER_ROWS = 64
"""Prompts answered together when evaluating."""


def check_layout(stage: str, parallel: ParallelConfig) -> None:
    """Rollouts run the whole model on each rank, and ranks decode for different numbers of
    steps: one process, or plain data parallelism (DDP), where a forward is no collective."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = parallel.dp_shard not in (1, -1) or (world > 1 and parallel.dp_replicate != world)
    if sharded or parallel.tp > 1 or parallel.pp > 1 or parallel.engine != "torch":
        raise UserError(
            f"{stage} runs on one process or data-parallel with whole models on every rank: set "
            f"parallel.dp_replicate={world}, dp_shard=1, tp=1, pp=1 and engine='torch'"
        )


@dataclass
class Start:
    """Where an RL stage starts: the SFT checkpoint (or init_from), its policy and tokenizer."""

    checkpoint: Checkpoint
    policy: Transformer
    tokenizer: Tokenizer


def start_policy(run_dir: Path, cfg: RolloutConfig, stage: str) -> Start:
    checkpoint = start_checkpoint(run_dir, cfg.init_from, "sft", stage)
    policy = language_model(checkpoint, stage)
    return Start(checkpoint, policy, tokenizer_for(checkpoint, policy))


def reward_checkpoint(run_dir: Path, value: str) -> Checkpoint:
    """The reward model ppo.reward_model names (a checkpoint, stage or run folder), else
    RUN/reward; it must have a scalar head."""
    path = resolve(value) if value else run_dir / "reward"
    if is_run_dir(path):
        path = path / "reward"
    if not (path / "config.json").is_file() and not list_checkpoints(path):
        raise UserError(
            f"ppo scores answers with the reward model, but {path} has no checkpoint: run "
            f"`scratchlm reward --run-dir {run_dir}` first, or set ppo.reward_model or "
            "ppo.reward_fn"
        )
    checkpoint = load_checkpoint(path)
    if checkpoint.model_config.get("head") != "scalar":
        raise UserError(
            f"ppo.reward_model: {checkpoint.path} is not a reward model (no scalar head)"
        )
    return checkpoint


def model_of(checkpoint: Checkpoint) -> Transformer:
    model = Transformer(ModelConfig.from_dict(checkpoint.model_config))
    load_weights(model, checkpoint.tensors)
    return model


def frozen(model: Transformer, device: torch.device) -> Transformer:
    """The model on `device`, in eval mode, with no gradients: the reference and reward models."""
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def read_prompts(
    cfg: RolloutConfig, stage: str, tokenizer: Tokenizer, context: int, rejects_to: Path | None
) -> Prompts:
    """The stage's prompts, each short enough for max_new_tokens to fit the context after it;
    the records set aside go to rejects_to/rejected.jsonl."""
    if cfg.max_new_tokens < 1 or cfg.max_new_tokens >= context:
        raise UserError(
            f"{stage}.max_new_tokens={cfg.max_new_tokens} must be between 1 and the context "
            f"({context}) less one"
        )
    prompts = load_prompts(cfg.data, tokenizer, context - cfg.max_new_tokens, cfg.val_fraction)
    if rejects_to is not None:
        write_rejects(prompts.rejects, rejects_to)
    return prompts


class PromptOrder:
    """The training prompts in a shuffled order, reshuffled at each pass; its position is saved
    with checkpoints. Every rank draws the same global batch and answers its own slice."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0
        self._order: list[int] | None = None

    def _current(self) -> list[int]:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.n, generator=generator).tolist()
        return self._order

    def take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            if self.position >= self.n:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            k = min(count - len(taken), self.n - self.position)
            taken += self._current()[self.position : self.position + k]
            self.position += k
        return taken

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n:
            raise UserError(
                f"the checkpoint was trained on {state['n']} prompts, the data now has {self.n}; "
                "resume with the same data or start afresh"
            )
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


def rank_slice(items: list, session: Session) -> list:
    """This data-parallel rank's share of a global batch."""
    share = len(items) // session.dist.dp_size
    return items[session.dist.dp_rank * share : (session.dist.dp_rank + 1) * share]


def step_seed(*parts: int) -> int:
    """A sampling seed fixed by the run's seed, the step, the rank and the attempt, so a resumed
    run samples what the uninterrupted one did."""
    return hash(parts) % 2**31


def sample_answers(
    model: Transformer,
    prompts: list[Prompt],
    cfg: RolloutConfig,
    tokenizer: Tokenizer,
    seed: int,
    temperature: float | None = None,
) -> list[Sample]:
    """Responses to the prompts, ANSWER_ROWS at a time, sampled as the stage samples."""
    samples: list[Sample] = []
    for start in range(0, len(prompts), ANSWER_ROWS):
        chunk = [p.ids for p in prompts[start : start + ANSWER_ROWS]]
        samples += sample_batch(
            model,
            chunk,
            cfg.max_new_tokens,
            cfg.temperature if temperature is None else temperature,
            cfg.top_k,
            cfg.top_p,
            seed=seed + start,
            stop_ids=[tokenizer.end_id],
        )
    return samples


def sample_rollout(
    model: Transformer,
    prompts: list[Prompt],
    cfg: RolloutConfig,
    tokenizer: Tokenizer,
    seed: int,
    device: torch.device,
) -> tuple[list[Sample], Rows, float]:
    """A response to each prompt sampled with the stage's settings (NonFiniteLogits when the
    policy's logits are not finite), the prompt + response rows on the device, and the seconds
    spent generating."""
    began = time.time()
    ids = [p.ids for p in prompts]
    samples = sample_batch(
        model,
        ids,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        seed,
        [tokenizer.end_id],
    )
    generated = time.time() - began
    rows = build_rows(ids, [s.tokens for s in samples], device, tokenizer.pad_id)
    return samples, rows, generated


def response_text(sample: Sample, tokenizer: Tokenizer) -> str:
    """The response as text, without the <|end|> that closes it."""
    tokens = sample.tokens[:-1] if sample.finish == "stop" else sample.tokens
    return tokenizer.decode(tokens)


def function_rewards(
    fn: RewardFn, spec: str, prompts: list[Prompt], texts: list[str]
) -> torch.Tensor:
    """The reward function's score of each response, [B] on the CPU."""
    pairs = zip(prompts, texts, strict=True)
    return torch.tensor([call_reward(fn, spec, p.messages, t, p.reference) for p, t in pairs])


@torch.no_grad()
def reward_model_scores(
    reward_model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[Prompt],
    texts: list[str],
    ended: list[bool],
    micro_batch: int,
) -> torch.Tensor:
    """The reward model's score of each answer, [B] on the CPU: read at the last token of
    encode_chat(prompt + the response), the <|end|> closing it; a response that did not end is
    read at its own last token (the reward contract of scratchlm.align.reward)."""
    device = next(reward_model.parameters()).device
    context = reward_model.config.max_seq_len
    rows = []
    for prompt, text, end in zip(prompts, texts, ended, strict=True):
        ids, _ = tokenizer.encode_chat([*prompt.messages, {"role": "assistant", "content": text}])
        rows.append((ids if end else ids[:-1])[-context:])
    scores = []
    for start in range(0, len(rows), micro_batch):
        tokens, lengths = pad_rows(rows[start : start + micro_batch], tokenizer.pad_id)
        scores.append(score(reward_model, tokens.to(device), lengths).float().cpu())
    return torch.cat(scores)


class SkippedRollouts:
    """Counts rollouts skipped for NaN rewards or logits; past the limit the run stops with a
    checkpoint (UserError: one line, exit 2)."""

    def __init__(self, stage: str, limit: int) -> None:
        self.stage, self.limit, self.count = stage, limit, 0

    def skip(self, session: Session, stateful: dict[str, Any], why: str) -> None:
        self.count += 1
        print(
            f"warning: {self.stage} step {session.step + 1}: {why}; rollout skipped "
            f"({self.count} so far)",
            file=sys.stderr,
            flush=True,
        )
        if self.count > self.limit:
            saved = session.save(stateful)
            raise UserError(
                f"{self.stage}: {self.count} rollouts had NaN rewards or logits (limit "
                f"{self.limit}); stopped with a checkpoint at {saved}. Lower {self.stage}.lr, "
                "check the reward, then continue with --resume"
            )


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A minibatch of rows without the padding columns after its longest response."""
    width = int(batch["mask"].nonzero()[:, 1].max()) + 1
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}


def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def run_rollout_stage(
    session: Session,
    train_step: Callable[[], dict[str, float]],
    evaluate: Callable[[], dict[str, float]],
    stateful: dict[str, Any],
    skipped: SkippedRollouts,
    recipe: Recipe,
    started_from: Path,
    describe: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """What PPO and GRPO share around the loop: the held-out figures before the first step (on a
    fresh start), the run, one summary line (`describe` adds the stage's own figures), the greedy
    answers to align.prompts, and the stage's result."""
    stage = session.stage
    start_val = evaluate() if session.restored is None else {}
    if start_val:
        session.log.write(0, **start_val)
    result = session.run(train_step, evaluate, stateful)
    summary = f"{stage}: step {result['step']}"
    if "val_reward" in result:
        before = f" (from {start_val['val_reward']:.3f})" if start_val else ""
        summary += f", held-out reward {result['val_reward']:.3f}{before}{describe(result)}"
    session.say(
        f"{summary}, {skipped.count} rollouts skipped, {result['seconds']:.0f} s; "
        f"saved {result['checkpoint']}"
    )
    run_dir = session.stage_dir.parent
    is_main = session.dist.is_main
    answers = write_answers(recipe, run_dir, stage, result["checkpoint"]) if is_main else []
    return {
        **result,
        "start_val_reward": start_val.get("val_reward"),
        "skipped_rollouts": skipped.count,
        "answers": answers,
        "started_from": str(started_from),
    }
