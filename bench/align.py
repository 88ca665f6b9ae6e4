"""Alignment figures of a run of recipes/align.toml (made first if needed; finished stages are
skipped): SFT end-of-turn rate and validation loss, reward-model accuracy on held-out HH-RLHF
pairs beside two baselines on the same pairs, and with ppo in align.stages the PPO figures of
bench/align_rl.py (win rate over SFT by the reward model, mean rewards, KL, speed).

    PYTHONPATH=. python bench/align.py [--run-dir runs/align] [--recipe recipes/align.toml] [--json]
    PYTHONPATH=. python bench/align.py --quick [--run-dir RUN] [--json]

--quick checks the script in seconds: the recipe at the toy sizes of bench/align_rl.py's
QUICK_RECIPE, in RUN or, without one, in a temporary folder, and 4 instructions and prompts.

Each figure is one function of the run folder, so later stages add theirs beside these. Prints a
table, and with --json a last line that is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.align_rl import QUICK_PROMPTS, QUICK_RECIPE  # noqa: E402
from bench.align_rl import figures as ppo_figures  # noqa: E402
from scratchlm.align.batches import (  # noqa: E402
    EncodedPair,
    encode_all,
    fit_chat,
    fit_pair,
    pack_chats,
)
from scratchlm.align.data import read_chat, read_preferences, split_validation  # noqa: E402
from scratchlm.align.evaluate import accuracy_figures, reward_scores, wilson_interval  # noqa: E402
from scratchlm.align.sft import validation_loss  # noqa: E402
from scratchlm.config import Recipe, load_recipe, save_recipe  # noqa: E402
from scratchlm.device import pick_runtime  # noqa: E402
from scratchlm.infer.generate import generate  # noqa: E402
from scratchlm.loading import load  # noqa: E402
from scratchlm.pipeline import run_pipeline  # noqa: E402

CPU = pick_runtime("cpu", "fp32")


def held_out_chats(recipe: Recipe, tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """The SFT validation conversations, as the stage encoded them."""
    cfg = recipe.sft
    dataset = read_chat(cfg.data)
    _, val = split_validation(dataset.records, cfg.val_fraction)
    fit = lambda r: fit_chat(tokenizer, r["messages"], max_len, cfg.truncation)  # noqa: E731
    return encode_all(dataset, fit, val)[0]


def held_out_pairs(recipe: Recipe, tokenizer, max_len: int) -> list[EncodedPair]:
    """The reward stage's validation pairs, as the stage encoded them."""
    cfg = recipe.reward
    dataset = read_preferences(cfg.data)
    _, val = split_validation(dataset.records, cfg.val_fraction)
    fit = lambda r: fit_pair(tokenizer, r, max_len, cfg.truncation)  # noqa: E731
    return encode_all(dataset, fit, val)[0]


@torch.no_grad()
def sft_figures(run_dir: Path, recipe: Recipe, n: int = 200, max_new_tokens: int = 128) -> dict:
    """Share of greedy answers to n held-out instructions that end with <|end|> within
    max_new_tokens, and the validation loss on the assistant tokens of all held-out chats."""
    model, tokenizer = load(run_dir / "sft")
    seq = model.config.max_seq_len
    chats = held_out_chats(recipe, tokenizer, seq + 1)
    ended = 0
    lengths = []
    for ids, mask in chats[:n]:
        prompt = ids[: mask.index(1)]  # up to the assistant's first token
        stop = (tokenizer.end_id,)
        new = list(generate(model, prompt, max_new_tokens, temperature=0.0, stop_ids=stop))
        # Generation ends at <|end|> (not yielded), after max_new_tokens, or at a full context.
        ended += len(new) < max_new_tokens and len(prompt) + len(new) < seq
        lengths.append(len(new))
    rows = pack_chats(chats, seq, tokenizer.pad_id)
    loss = validation_loss(model, rows, 16, CPU)
    low, high = wilson_interval(ended, len(lengths))
    return {
        "sft_eot_rate": round(ended / len(lengths), 4),
        "sft_eot_ci95": [round(low, 4), round(high, 4)],
        "sft_instructions": len(lengths),
        "sft_mean_answer_tokens": round(sum(lengths) / len(lengths), 1),
        "sft_val_loss": round(loss, 4),
        "sft_val_chats": len(chats),
    }


def length_baseline(pairs: list[EncodedPair]) -> dict:
    """'The longer answer wins': the response with more tokens scores higher."""
    chosen = torch.tensor([len(p.chosen) - p.prompt_len for p in pairs], dtype=torch.float32)
    rejected = torch.tensor([len(p.rejected) - p.prompt_len for p in pairs], dtype=torch.float32)
    return accuracy_figures(chosen, rejected)


def reward_model_figures(reward_dir: Path, pairs: list[EncodedPair]) -> dict:
    model, tokenizer = load(reward_dir)
    chosen, rejected = reward_scores(model, pairs, tokenizer.pad_id, 16, CPU)
    return accuracy_figures(chosen, rejected)


def reward_from_pretrained(run_dir: Path, recipe: Recipe) -> Path:
    """The same reward stage, started from the pretrained model instead of SFT, in a run folder
    of its own (RUN/baselines/reward-from-pretrain); skipped when it is up to date."""
    from scratchlm.align import reward

    base = run_dir / "baselines" / "reward-from-pretrain"
    base.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "tokenizer.json", base / "tokenizer.json")  # its checkpoints load it
    pretrained = (run_dir / "pretrain" / "latest").resolve()
    baseline = load_recipe(run_dir / "recipe.toml", [f"reward.init_from='{pretrained}'"])
    made_from = json.dumps({"reward": dataclasses.asdict(baseline.reward)})
    marker = base / "made_from.json"
    if not (marker.is_file() and marker.read_text() == made_from):
        reward.run(baseline, base)
        marker.write_text(made_from)
    return base / "reward"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="default: runs/align")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/align.toml")
    parser.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run_dir is None:
            args.run_dir = Path(tmp) if args.quick else ROOT / "runs/align"
        report(args)


def report(args: argparse.Namespace) -> None:
    """Runs the recipe in args.run_dir (what is up to date is skipped), then prints the figures."""
    start = time.time()
    recipe = load_recipe(args.recipe, QUICK_RECIPE if args.quick else [])
    prompts, answer_tokens = (QUICK_PROMPTS, 16) if args.quick else (200, 128)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, args.run_dir / "recipe.toml")
    run_pipeline(recipe, args.run_dir)

    figures = sft_figures(args.run_dir, recipe, prompts, answer_tokens)
    tokenizer = load(args.run_dir / "reward")[1]
    context = load_recipe(args.run_dir / "recipe.toml").model.max_seq_len
    pairs = held_out_pairs(recipe, tokenizer, context)
    rm = reward_model_figures(args.run_dir / "reward", pairs)
    longer = length_baseline(pairs)
    from_pretrained = reward_model_figures(reward_from_pretrained(args.run_dir, recipe), pairs)
    figures.update(
        rm_accuracy=rm["accuracy"],
        rm_ci95=rm["ci95"],
        rm_pairs=rm["n"],
        length_baseline_accuracy=longer["accuracy"],
        length_baseline_ci95=longer["ci95"],
        rm_from_pretrained_accuracy=from_pretrained["accuracy"],
        rm_from_pretrained_ci95=from_pretrained["ci95"],
        seconds=round(time.time() - start, 1),
    )

    if "ppo" in recipe.align.stages:
        figures.update(ppo_figures(args.run_dir, n_prompts=prompts, seed=0))

    print(f"\nalignment figures of {args.run_dir} (fp32, torch {torch.__version__}, CPU)")
    print(f"{'figure':<52}{'value':>10}  95% interval")
    rows = [
        (f"SFT: answers ending with <|end|> in {answer_tokens} tokens "
         f"(n={figures['sft_instructions']})",
         figures["sft_eot_rate"], figures["sft_eot_ci95"]),
        (f"SFT: validation loss, assistant tokens ({figures['sft_val_chats']} chats)",
         figures["sft_val_loss"], None),
        (f"reward model from SFT: accuracy (n={rm['n']} pairs)", rm["accuracy"], rm["ci95"]),
        ("baseline: the longer answer wins", longer["accuracy"], longer["ci95"]),
        ("baseline: reward model from the pretrained model", from_pretrained["accuracy"],
         from_pretrained["ci95"]),
    ]  # fmt: skip
    if "ppo_win_rate" in figures:
        rows += [
            (f"PPO: reward model's win rate over SFT (n={figures['ppo_prompts']} prompts)",
             figures["ppo_win_rate"], figures["ppo_win_rate_ci95"]),
            (f"PPO: mean reward (SFT {figures['sft_mean_reward']:.3f})",
             figures["ppo_mean_reward"], None),
            ("PPO: KL to SFT, nats per answer", figures["ppo_kl"], None),
        ]  # fmt: skip
    for name, value, interval in rows:
        shown = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else ""
        print(f"{name:<52}{value:>10.3f}  {shown}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
