"""PPO on the real reward model: the PPO policy against the SFT policy it started from.

On the run's held-out prompts (those every stage holds out: the reward model never trained on
them), each policy answers once, sampled as PPO samples, and the reward model scores both answers.
Printed side by side: the mean reward of each policy, the share of answers that end, the reward
model's win rate of the PPO answer over the SFT answer on the same prompt (ties count half) with
its 95% Wilson interval, and the KL from SFT to PPO on PPO's answers (nats per answer). Then the
speed of the PPO run as OpenRLHF reports it, read from the run's metrics.jsonl: rollout tokens/s,
training tokens/s and the share of each step spent generating.

    scratchlm pipeline RECIPE --run-dir runs/align   # with align.stages = ["sft", "reward", "ppo"]
    python bench/align_rl.py --run-dir runs/align [--prompts 200] [--json]
    python bench/align_rl.py --quick [--run-dir RUN] [--json]

--quick checks the script in seconds: 4 prompts, on RUN or, without one, on a run of
recipes/align.toml at toy sizes (QUICK_RECIPE) made in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratchlm.align.evaluate import accuracy_figures  # noqa: E402
from scratchlm.align.rl import (  # noqa: E402
    frozen,
    model_of,
    read_prompts,
    response_text,
    reward_checkpoint,
    reward_model_scores,
    sample_answers,
)
from scratchlm.align.rollout import build_rows, score_rows  # noqa: E402
from scratchlm.align.stage import language_model, tokenizer_for  # noqa: E402
from scratchlm.checkpoint import load_checkpoint  # noqa: E402
from scratchlm.config import load_recipe, save_recipe  # noqa: E402
from scratchlm.pipeline import run_pipeline  # noqa: E402
from scratchlm.train.metrics import read_metrics  # noqa: E402

# --quick: recipes/align.toml at toy sizes, every stage for a step or two (here and bench/align.py).
QUICK_RECIPE = [
    "data.inputs=['data/web/c4_demo.jsonl.gz']",
    "model.dim=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.vocab_size=512",
    *[f"{stage}.{key}" for stage in ("pretrain", "sft", "reward", "ppo") for key in (
        "max_steps=2", "warmup_steps=1", "eval_every=2", "save_every=2", "micro_batch_size=4"
    )],
    "pretrain.tokens_per_step=1024",
    "pretrain.eval_tokens=1024",
    "sft.rows_per_step=4",
    "reward.pairs_per_step=4",
    "ppo.rollout_batch=4",
    "ppo.minibatch_size=4",
    "ppo.max_new_tokens=8",
    "ppo.eval_prompts=4",
    "align.max_new_tokens=8",
    "sample.max_new_tokens=8",
]  # fmt: skip
QUICK_PROMPTS = 4


def quick_run(run_dir: Path) -> Path:
    """recipes/align.toml with QUICK_RECIPE, through PPO, in run_dir."""
    recipe = load_recipe(ROOT / "recipes/align.toml", QUICK_RECIPE)
    save_recipe(recipe, run_dir / "recipe.toml")
    run_pipeline(recipe, run_dir, until="ppo")
    return run_dir


def figures(run_dir: Path, n_prompts: int, seed: int) -> dict:
    recipe = load_recipe(run_dir / "recipe.toml")
    cfg = recipe.ppo
    ppo_ckpt = load_checkpoint(run_dir / "ppo")
    started = ppo_ckpt.trainer_state.get("started_from", {}).get("checkpoint", "sft")
    sft_path = Path(started) if Path(started).is_absolute() else run_dir / started
    sft_ckpt = load_checkpoint(sft_path)
    device = torch.device("cpu")
    policies = {
        "sft": frozen(language_model(sft_ckpt, "bench"), device),
        "ppo": frozen(language_model(ppo_ckpt, "bench"), device),
    }
    tokenizer = tokenizer_for(ppo_ckpt, policies["ppo"])
    reward_model = frozen(model_of(reward_checkpoint(run_dir, cfg.reward_model)), device)
    context = policies["ppo"].config.max_seq_len
    prompts = read_prompts(cfg, "ppo", tokenizer, context, None).held_out[:n_prompts]
    if not prompts:
        raise SystemExit(f"no held-out prompts in {cfg.data} (ppo.val_fraction={cfg.val_fraction})")
    rows: dict[str, dict] = {}
    with torch.no_grad():
        for name, policy in policies.items():
            samples = sample_answers(policy, prompts, cfg, tokenizer, seed)
            texts = [response_text(s, tokenizer) for s in samples]
            ended = [s.finish == "stop" for s in samples]
            scores = reward_model_scores(reward_model, tokenizer, prompts, texts, ended, 16)
            rows[name] = {"samples": samples, "scores": scores, "ended": ended}
        ppo_rows = build_rows(
            [p.ids for p in prompts],
            [s.tokens for s in rows["ppo"]["samples"]],
            device,
            tokenizer.pad_id,
        )
        log_ratio = score_rows(policies["ppo"], ppo_rows, 16) - score_rows(
            policies["sft"], ppo_rows, 16
        )
        kl = float((log_ratio * ppo_rows.mask).sum(1).mean())
    wins = accuracy_figures(rows["ppo"]["scores"], rows["sft"]["scores"])
    speed = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("stage") == "ppo"]
    speed = [r for r in speed if "rollout_tokens_per_s" in r]

    def mean(key: str) -> float:
        return round(sum(r[key] for r in speed) / len(speed), 3) if speed else float("nan")

    return {
        "ppo_prompts": wins["n"],
        "sft_mean_reward": round(float(rows["sft"]["scores"].mean()), 4),
        "ppo_mean_reward": round(float(rows["ppo"]["scores"].mean()), 4),
        "sft_end_rate": round(sum(rows["sft"]["ended"]) / len(prompts), 4),
        "ppo_end_rate": round(sum(rows["ppo"]["ended"]) / len(prompts), 4),
        "ppo_win_rate": wins["accuracy"],
        "ppo_win_rate_ci95": wins["ci95"],
        "ppo_kl": round(kl, 4),
        "ppo_steps": ppo_ckpt.trainer_state["step"],
        "ppo_rollout_tokens_per_s": mean("rollout_tokens_per_s"),
        "ppo_train_tokens_per_s": mean("train_tokens_per_s"),
        "ppo_generate_share": mean("generate_share"),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a run with sft, reward, ppo (required)")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts to answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(prompts=QUICK_PROMPTS)
        args = parser.parse_args()
    if args.run_dir is None and not args.quick:
        parser.error("--run-dir is required")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or quick_run(Path(tmp))
        f = figures(run_dir, args.prompts, args.seed)
    low, high = f["ppo_win_rate_ci95"]
    n = f["ppo_prompts"]
    print(f"PPO vs SFT on {n} held-out prompts of {run_dir} (the reward model's scores)")
    print(f"{'':28}{'SFT':>10}{'PPO':>10}")
    print(f"{'mean reward':28}{f['sft_mean_reward']:>10.3f}{f['ppo_mean_reward']:>10.3f}")
    print(f"{'answers that end':28}{f['sft_end_rate']:>10.1%}{f['ppo_end_rate']:>10.1%}")
    print(f"win rate of PPO over SFT: {f['ppo_win_rate']:.3f} (95% CI {low:.3f}-{high:.3f})")
    print(f"KL(PPO || SFT) on PPO's answers: {f['ppo_kl']:.3f} nats per answer")
    print(
        f"PPO speed over {f['ppo_steps']} steps: rollout {f['ppo_rollout_tokens_per_s']:,.0f} "
        f"tokens/s, training {f['ppo_train_tokens_per_s']:,.0f} tokens/s, "
        f"{f['ppo_generate_share']:.1%} of each step generating"
    )
    if args.json:
        print(json.dumps(f))


if __name__ == "__main__":
    main()
