"""Bits-per-byte in a fixed wall-clock budget on tinyshakespeare, beside nanoGPT's CPU recipe.

Every side trains on the first 90% of the characters and is scored on all of the last 10%, within
the same budget (150 s by default) that counts everything: for scratchlm, tokenizer training,
tokenization, training and the final evaluation; for the anchor, its vocabulary, training and
evaluation. The sides run one after another in this process:

- anchor: nanoGPT's documented CPU recipe, rebuilt with transformers' GPT2LMHeadModel: characters
  as tokens, 4 layers, width 128, block 64, batch 12, no dropout, AdamW (lr 1e-3, betas 0.9/0.99,
  weight decay 0.1 on matrices) with 100 warmup iterations and a cosine to 1e-4 over the
  iterations that fit the budget;
- muon: scratchlm's bench recipe (RECIPE below) with Muon for the hidden matrices;
- adamw: the same recipe with AdamW alone (its own tuned learning rate).

Each side's CPU share (CPU seconds of this process and its children over wall seconds x threads)
and the load average are printed beside its result: a share well under 1 means other processes
took the cores, and the figures of that side are pessimistic.

    python bench/quality_per_time.py [--seconds 150] [--sides anchor,muon,adamw] [--json]
    python bench/quality_per_time.py --quick [--json]   # all sides, 6 s each, on 100k characters

--quick checks the script, not the recipe: its figures say nothing about quality.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratchlm.config import load_recipe  # noqa: E402
from scratchlm.documents import write_documents  # noqa: E402
from scratchlm.pipeline import run_tokenize, run_tokenizer  # noqa: E402
from scratchlm.train.metrics import read_metrics  # noqa: E402
from scratchlm.train.pretrain import pretrain  # noqa: E402

SOURCES = [
    ROOT.parent / "shared/data/tinyshakespeare/input.txt.gz",
    ROOT / "data/tinyshakespeare/input.txt.gz",
]
# The final evaluation over the validation split takes about 2 s; it is kept inside the budget.
EVAL_SECONDS = 3.0

# Chosen by the sweep in docs/pretrain.md.
RECIPE = [
    "model.dim=192",
    "model.n_layers=4",
    "model.n_heads=6",
    "model.n_kv_heads=3",
    "model.max_seq_len=128",
    "model.vocab_size=512",
    "pretrain.tokens_per_step=4096",
    "pretrain.micro_batch_size=32",
    "pretrain.warmup_steps=30",
    "pretrain.max_steps=100000",
    "pretrain.eval_every=0",
    "pretrain.save_every=0",
    "pretrain.eval_tokens=1000000",
    "pretrain.device=cpu",
    "pretrain.weight_decay=0.1",
    "tokens.workers=2",
]
SIDE_RECIPES = {
    "muon": [
        "pretrain.optimizer=muon",
        "pretrain.lr=4e-3",
        "pretrain.min_lr=4e-4",
        "pretrain.muon_lr=0.02",
    ],
    "adamw": ["pretrain.optimizer=adamw", "pretrain.lr=4e-3", "pretrain.min_lr=4e-4"],
}
# --quick: the first characters of the text, and a budget that leaves each side a few steps.
QUICK_CHARS = 100_000
QUICK_SECONDS = 6.0
SIDE_NAMES = {
    "anchor": "nanoGPT CPU recipe (GPT2LMHeadModel)",
    "muon": "scratchlm, Muon + AdamW",
    "adamw": "scratchlm, AdamW",
}


def chunks(text: str, split: str) -> list[dict]:
    """Documents of ~2,000 characters cut at line ends, so little is spent on separators."""
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n", start + 2000)
        end = len(text) if end < 0 else end + 1
        docs.append({"id": f"{split}-{start}", "text": text[start:end], "meta": {"split": split}})
        start = end
    return docs


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the tokenizer's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measured(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """run()'s result with its wall seconds, CPU share and the load average before and after."""
    load_before = os.getloadavg()[0]
    start, cpu_start = time.time(), cpu_seconds()
    result = run()
    wall = time.time() - start
    share = (cpu_seconds() - cpu_start) / (wall * torch.get_num_threads())
    load = (load_before + os.getloadavg()[0]) / 2
    return {**result, "seconds": round(wall, 1), "cpu_share": round(share, 2), "load": load}


def scratchlm_side(
    text: str, cut: int, seconds: float, overrides: list[str], steps: int = 0
) -> dict[str, Any]:
    """Prepare, train and evaluate within `seconds`, or (steps > 0) for exactly that many steps
    with the schedule over the steps, whatever the clock says."""
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        write_documents(
            run / "curated" / "part-00000.jsonl.zst",
            chunks(text[:cut], "train") + chunks(text[cut:], "val"),
        )
        # Tokenizer and training see only the training characters.
        recipe = load_recipe(None, RECIPE + overrides)
        run_tokenizer(recipe, run, texts=[text[:cut]])
        run_tokenize(recipe, run)
        prep = time.time() - start
        if steps:
            recipe.pretrain.max_steps, recipe.pretrain.max_seconds = steps, 0.0
        else:
            recipe.pretrain.max_seconds = max(1.0, seconds - prep - EVAL_SECONDS)
        result = pretrain(recipe, run, progress=False)
        curve = [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    return {
        "val_bpb": result["val_bpb"],
        "steps": result["step"],
        "params": result["params"],
        "prep_seconds": round(prep, 1),
        "curve": curve,
    }


def anchor_side(text: str, cut: int, seconds: float) -> dict[str, Any]:
    """nanoGPT's shakespeare_char recipe at its CPU settings, as a GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel  # imported by main, outside the clock

    start = time.time()
    block, batch, warmup, lr, min_lr = 64, 12, 100, 1e-3, 1e-4
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    train, val = data[:cut], data[cut:]
    val_bytes = torch.tensor([len(c.encode()) for c in chars])[val[1:]].sum().item()
    torch.manual_seed(1337)
    config = GPT2Config(
        vocab_size=len(chars),
        n_positions=block,
        n_embd=128,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=True)
    budget = seconds - (time.time() - start) - EVAL_SECONDS
    train_start, step, curve = time.time(), 0, []
    model.train()
    while (elapsed := time.time() - train_start) < budget:
        if step < warmup:
            step_lr = lr * (step + 1) / (warmup + 1)
        else:
            progress = min(1.0, elapsed / budget)
            step_lr = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        starts = torch.randint(len(train) - block, (batch,))
        x = torch.stack([train[i : i + block] for i in starts])
        y = torch.stack([train[i + 1 : i + 1 + block] for i in starts])
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        curve.append((step, loss.item()))
    # Every validation character after the first, in windows of the block size.
    model.eval()
    nats = 0.0
    windows = [val[i : i + block + 1] for i in range(0, len(val) - 1, block)]
    with torch.no_grad():
        for first in range(0, len(windows), 256):
            group = windows[first : first + 256]
            full = [w for w in group if len(w) == block + 1]
            rest = [w for w in group if len(w) < block + 1]
            for part in ([torch.stack(full)] if full else []) + [w[None] for w in rest]:
                logits = model(input_ids=part[:, :-1]).logits
                nats += F.cross_entropy(
                    logits.flatten(0, 1), part[:, 1:].flatten(), reduction="sum"
                ).item()
    return {
        "val_bpb": nats / math.log(2) / val_bytes,
        "steps": step,
        "params": sum(p.numel() for p in params),
        "prep_seconds": 0.0,
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--sides", default="anchor,muon,adamw", help="which sides, in order")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides (ours)")
    parser.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(seconds=QUICK_SECONDS)
        args = parser.parse_args()
    source = next((p for p in SOURCES if p.exists()), None)
    if source is None:
        sys.exit("tinyshakespeare not found in ../shared/data or data/")
    sides = [s.strip() for s in args.sides.split(",")]
    unknown = sorted(set(sides) - set(SIDE_NAMES))
    if unknown:
        sys.exit(f"unknown sides {unknown}; choose from {', '.join(SIDE_NAMES)}")

    if "anchor" in sides:
        import transformers  # noqa: F401  (its import time is not the anchor's training time)
    text = gzip.open(source, "rt", encoding="utf-8").read()
    if args.quick:
        text = text[:QUICK_CHARS]
    cut = int(len(text) * 0.9)
    results: dict[str, dict[str, Any]] = {}
    for side in sides:
        if side == "anchor":
            run = lambda: anchor_side(text, cut, args.seconds)  # noqa: E731
        else:
            overrides = SIDE_RECIPES[side] + args.set
            run = lambda o=overrides: scratchlm_side(text, cut, args.seconds, o)  # noqa: E731
        results[side] = measured(run)
        if not args.json:
            print(f"{side}: {results[side]['val_bpb']:.3f} bpb", file=sys.stderr)

    print(
        f"\n{'side':<40}{'val bpb':>9}{'seconds':>9}{'steps':>7}{'params':>10}"
        f"{'cpu share':>11}{'load':>6}"
    )
    for side, r in results.items():
        print(
            f"{SIDE_NAMES[side]:<40}{r['val_bpb']:>9.3f}{r['seconds']:>9.1f}{r['steps']:>7}"
            f"{r['params']:>10,}{r['cpu_share']:>11.2f}{r['load']:>6.1f}"
        )
    anchor = results.get("anchor", {}).get("val_bpb")
    for side in ("muon", "adamw"):
        if side in results and anchor is not None:
            print(f"{side}: {anchor - results[side]['val_bpb']:.3f} bpb below the anchor")
    for side, r in results.items():
        curve = r["curve"][:: max(1, len(r["curve"]) // 10)]
        print(f"{side} train loss: " + ", ".join(f"{s}: {loss:.3f}" for s, loss in curve))
    if args.json:
        ours = results.get("muon") or results.get("adamw") or {}
        summary: dict[str, Any] = {
            "val_bpb": round(ours["val_bpb"], 4) if ours else None,
            "seconds": ours.get("seconds"),
            "anchor_val_bpb": round(anchor, 4) if anchor is not None else None,
            "budget_seconds": args.seconds,
        }
        for side, r in results.items():
            summary[side] = {k: v for k, v in r.items() if k != "curve"}
            summary[side]["val_bpb"] = round(r["val_bpb"], 4)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
