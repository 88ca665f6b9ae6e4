"""Bits-per-byte reached in a fixed wall-clock budget on tinyshakespeare.

Trains on the first 90% of the characters and validates on the last 10%. The budget counts
everything: tokenizer training, tokenization, training and the final evaluation's set-up.

Reference (nanoGPT's documented CPU recipe: 4 layers, width 128, block 64, batch 12, 2,000
iterations): val loss 1.886 nats/char = 2.72 bits per byte, in 154 s on a 2-core AMD EPYC.

    python bench/quality_per_time.py [--seconds 150] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

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
NANOGPT_BPB = 2.72
EVAL_SECONDS = 3.0

RECIPE = [
    "model.dim=192",
    "model.n_layers=4",
    "model.n_heads=6",
    "model.n_kv_heads=3",
    "model.max_seq_len=128",
    "model.vocab_size=512",
    "pretrain.tokens_per_step=4096",
    "pretrain.micro_batch_size=32",
    "pretrain.lr=4e-3",
    "pretrain.min_lr=4e-4",
    "pretrain.warmup_steps=30",
    "pretrain.max_steps=100000",
    "pretrain.eval_every=0",
    "pretrain.save_every=0",
    "pretrain.eval_tokens=1000000",
    "pretrain.device=cpu",
    "pretrain.weight_decay=0.1",
    "tokens.workers=2",
]


def chunks(text: str, split: str) -> list[dict]:
    """Documents of ~2,000 characters cut at line ends, so little is spent on separators."""
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n", start + 2000)
        end = len(text) if end < 0 else end + 1
        docs.append({"id": f"{split}-{start}", "text": text[start:end], "meta": {"split": split}})
        start = end
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--set", action="append", default=[], help="recipe overrides")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    source = next((p for p in SOURCES if p.exists()), None)
    if source is None:
        sys.exit("tinyshakespeare not found in ../shared/data or data/")

    start = time.time()
    text = gzip.open(source, "rt", encoding="utf-8").read()
    cut = int(len(text) * 0.9)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        write_documents(
            run / "curated" / "part-00000.jsonl.zst",
            chunks(text[:cut], "train") + chunks(text[cut:], "val"),
        )
        # Tokenizer and training see only the training characters.
        recipe = load_recipe(None, RECIPE + args.set)
        run_tokenizer(recipe, run, texts=[text[:cut]])
        run_tokenize(recipe, run)
        prep = time.time() - start
        # The final evaluation over the validation split takes about 2 s; keep it in the budget.
        recipe.pretrain.max_seconds = max(1.0, args.seconds - prep - EVAL_SECONDS)
        result = pretrain(recipe, run, progress=not args.json)
        seconds = time.time() - start
        curve = [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    print(f"\n{'system':<28}{'val bits/byte':>14}{'seconds':>10}")
    print(f"{'nanoGPT CPU recipe (ref.)':<28}{NANOGPT_BPB:>14.3f}{154:>10}")
    print(f"{'scratchlm':<28}{result['val_bpb']:>14.3f}{seconds:>10.1f}")
    print(f"ratio (nanoGPT bpb / scratchlm bpb): {NANOGPT_BPB / result['val_bpb']:.2f}")
    print(f"prep (tokenizer + tokenize): {prep:.1f} s, steps: {result['step']}")
    print(
        "curve (step: train loss): "
        + ", ".join(f"{s}: {loss:.3f}" for s, loss in curve[:: max(1, len(curve) // 12)])
    )
    if args.json:
        print(
            json.dumps(
                {
                    "val_bpb": round(result["val_bpb"], 4),
                    "val_loss": round(result["val_loss"], 4),
                    "seconds": round(seconds, 1),
                    "prep_seconds": round(prep, 1),
                    "steps": result["step"],
                    "params": result["params"],
                    "reference_bpb": NANOGPT_BPB,
                }
            )
        )


if __name__ == "__main__":
    main()
