"""How often a model prefers the chosen response of held-out preference pairs.

A reward model scores each response (its scalar head at the response's <|end|>). A policy (an
SFT, DPO or PPO model) scores it with DPO's implicit reward, log pi(y|x) - log ref(y|x), against
the reference its stage started from (recorded in its checkpoints). The pair counts as right when
the chosen response scores higher (a tie counts half); the 95% interval is Wilson's.

    scratchlm eval RUN_OR_CHECKPOINT --tasks preference --data FILE.jsonl [--json]

`PreferenceTask` is a task of the evaluation registry (scratchlm.evaluate.tasks): it reads
options.data, options.batch_size, options.runtime and options.checkpoint (where the model came
from, to find a policy's reference).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from scratchlm.align.batches import EncodedPair, encode_all, fit_pair, pair_batch
from scratchlm.align.data import read_preferences
from scratchlm.align.dpo import all_logprobs
from scratchlm.align.reward import score
from scratchlm.align.stage import language_model, origin_of
from scratchlm.checkpoint import Checkpoint, list_checkpoints, load_checkpoint
from scratchlm.device import Runtime
from scratchlm.errors import UserError
from scratchlm.evaluate.tasks import EvalOptions, Task
from scratchlm.loading import latest_checkpoint_dir
from scratchlm.model import Transformer
from scratchlm.tokenizer import Tokenizer


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (95% for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """accuracy (ties count half), n, ci95 and the mean margin of scores of chosen vs rejected."""
    right = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    n = len(right)
    accuracy = float(right.mean()) if n else 0.0
    low, high = wilson_interval(float(right.sum()), n)
    return {
        "accuracy": round(accuracy, 4),
        "n": n,
        "ci95": [round(low, 4), round(high, 4)],
        "mean_margin": round(float((chosen - rejected).mean()), 4) if n else 0.0,
    }


def read_pairs(data: str | Path, tokenizer: Tokenizer, max_len: int) -> tuple[list, int]:
    """The file's pairs as tokens within max_len (oldest turns dropped as in training), and how
    many were set aside; a file with no usable pair is a UserError."""
    dataset = read_preferences([data])
    fit = lambda r: fit_pair(tokenizer, r, max_len, "drop_oldest_turns")  # noqa: E731
    pairs, too_long = encode_all(dataset, fit)
    if not pairs:
        raise UserError(
            f"no usable preference pairs in {data} ({dataset.describe()}, {len(too_long)} longer "
            f"than the model's {max_len} tokens)"
        )
    return pairs, len(dataset.rejects) + len(too_long)


@torch.no_grad()
def reward_scores(
    model: Transformer, pairs: list[EncodedPair], pad_id: int, rows: int, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = [], []
    for start in range(0, len(pairs), rows):
        batch = pair_batch(pairs[start : start + rows], pad_id)
        with runtime.autocast():
            rewards = score(model, batch["tokens"].to(runtime.device), batch["lengths"])
        c, r = rewards.float().cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def reference_of(checkpoint: Checkpoint | None) -> Transformer:
    """The model a policy's stage started from: its reference for the implicit reward."""
    origin = origin_of(checkpoint) if checkpoint is not None else None
    if origin is None:
        where = checkpoint.path if checkpoint is not None else "this model"
        raise UserError(
            f"{where} records no starting checkpoint, so it has no reference for the implicit "
            "reward: evaluate a reward model, or a model from sft, dpo or ppo"
        )
    return language_model(load_checkpoint(origin), "eval")


class PreferenceTask(Task):
    """The `preference` evaluation task: a reward model's (or a policy's implicit reward's)
    accuracy on the preference pairs of options.data."""

    name = "preference"

    def run(self, model: Transformer, tokenizer: Tokenizer, options: EvalOptions) -> dict:
        if not options.data:
            raise UserError("--tasks preference needs --data FILE (preference pairs)")
        pairs, set_aside = read_pairs(options.data, tokenizer, model.config.max_seq_len)
        usable = len(pairs)
        if 0 < options.limit < usable:
            pairs = pairs[: options.limit]
            print(
                f"eval: preference: the first {options.limit:,} of the {usable:,} usable pairs in "
                f"{options.data} (eval.limit or --limit; --limit 0 scores them all)"
            )
        rows, runtime = options.batch_size, options.runtime
        checkpoint = load_checkpoint(Path(options.checkpoint)) if options.checkpoint else None
        if model.config.head == "scalar":
            chosen, rejected = reward_scores(model, pairs, tokenizer.pad_id, rows, runtime)
            scorer = "reward model"
        else:
            reference = reference_of(checkpoint).to(runtime.device)
            pc, pr = all_logprobs(model, pairs, tokenizer.pad_id, rows, runtime, False)
            rc, rr = all_logprobs(reference, pairs, tokenizer.pad_id, rows, runtime, False)
            chosen, rejected = pc - rc, pr - rr
            scorer = f"implicit reward against {origin_of(checkpoint)}"
        figures = accuracy_figures(chosen, rejected)
        n, accuracy = figures["n"], figures["accuracy"]
        return {
            **figures,
            "accuracy_stderr": math.sqrt(accuracy * (1 - accuracy) / max(n - 1, 1)),
            "chance": 0.5,
            "scorer": scorer,
            "data": str(options.data),
            "usable_pairs": usable,
            "set_aside": set_aside,
        }


def preference_target(run_dir: Path) -> Path:
    """What `scratchlm eval RUN --tasks preference` scores: the run's reward model if it has
    one, else its newest policy."""
    if list_checkpoints(run_dir / "reward"):
        return run_dir / "reward"
    return latest_checkpoint_dir(run_dir)
