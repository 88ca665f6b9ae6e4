"""Peak resident memory of pretraining on CPU: the demo recipe and the ~124M recipe for a few steps,
beside transformers' LlamaForCausalLM of the same shape and batch.

scratchlm runs as a user runs it, `python -m scratchlm pretrain RECIPE` in a child process, on
token shards of tinyshakespeare (tokenizer of the demo's size), with its evaluations and
checkpoints; the peak is the child's maximum resident set (getrusage). transformers trains the
same shape on random tokens with fused AdamW for the same steps and micro-batches, in a child
process of its own. The ~124M recipe runs at micro-batch 1 x 1024 tokens, 2 micro-batches a step
(its 0.5M-token batch would take hours a step here); its memory is mostly weights, gradients and
AdamW moments (16 bytes a parameter).

    PYTHONPATH=. python bench/memory.py [--sizes tiny,124m] [--json]
    PYTHONPATH=. python bench/memory.py --quick [--json]   # the demo recipe for 2 steps, both sides
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    ROOT.parent / "shared/data/tinyshakespeare/input.txt.gz",
    ROOT / "data/tinyshakespeare/input.txt.gz",
]
RECIPES = {"tiny": "recipes/tiny.toml", "124m": "recipes/gpt124m.toml"}
# Steps and the batch each size trains with here (the demo keeps its own batch).
SHAPES = {
    "tiny": ["pretrain.max_steps=10", "pretrain.eval_every=5", "pretrain.save_every=5"],
    "124m": [
        "pretrain.max_steps=3",
        "pretrain.micro_batch_size=1",
        "pretrain.tokens_per_step=2048",
        "pretrain.eval_tokens=2048",
        "pretrain.eval_every=0",
        "pretrain.save_every=0",
        "pretrain.compile=false",
    ],
}
# --quick: a check of the script, not a measurement (each side trains 2 steps, evaluates and saves).
QUICK = [
    "pretrain.max_steps=2",
    "pretrain.eval_every=1",
    "pretrain.save_every=1",
    "pretrain.eval_tokens=8192",
    "pretrain.eval_tasks_limit=4",
]


def shape(size: str, quick: bool) -> list[str]:
    return SHAPES[size] + (QUICK if quick else [])


def peak_rss_mib(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, int, float]:
    """Run cmd; (its peak resident memory in MiB, exit code, seconds)."""
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, proc.returncode, time.time() - start


def prepare_run(run: Path) -> None:
    """A run folder with tinyshakespeare documents, the demo's tokenizer size and token shards."""
    from scratchlm.config import load_recipe
    from scratchlm.documents import write_documents
    from scratchlm.pipeline import run_tokenize, run_tokenizer

    source = next((p for p in SOURCES if p.exists()), None)
    if source is None:
        sys.exit("tinyshakespeare not found in ../shared/data or data/")
    text = gzip.open(source, "rt", encoding="utf-8").read()
    docs = [
        {"id": str(i), "text": text[i : i + 4000], "meta": {}} for i in range(0, len(text), 4000)
    ]
    write_documents(run / "curated" / "part-00000.jsonl.zst", docs)
    recipe = load_recipe(ROOT / RECIPES["tiny"])
    run_tokenizer(recipe, run)
    run_tokenize(recipe, run)


def hf_worker(size: str, quick: bool) -> None:
    """transformers' LlamaForCausalLM of the recipe's shape, trained as scratchlm is here."""
    import torch
    from train_throughput import build_hf

    from scratchlm.config import load_recipe
    from scratchlm.train.pretrain import model_config_from

    recipe = load_recipe(ROOT / RECIPES[size], shape(size, quick))
    cfg, model_cfg = recipe.pretrain, model_config_from(recipe)
    seq = model_cfg.max_seq_len
    micro = min(cfg.micro_batch_size, cfg.tokens_per_step // seq)
    accum = cfg.tokens_per_step // (seq * micro)
    model = build_hf(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    for _ in range(cfg.max_steps):
        for _ in range(accum):
            tokens = torch.randint(0, model_cfg.vocab_size, (micro, seq + 1))
            x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            (model(input_ids=x, labels=y, shift_labels=y).loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,124m", help="comma-separated: tiny, 124m")
    parser.add_argument("--quick", action="store_true", help="the tiny recipe for 2 steps")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--hf-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(sizes="tiny")
        args = parser.parse_args()
    if args.hf_worker:
        hf_worker(args.hf_worker, args.quick)
        return
    sizes = args.sizes.split(",")
    unknown = sorted(set(sizes) - set(RECIPES))
    if unknown:
        sys.exit(f"unknown sizes {unknown}; choose from {', '.join(RECIPES)}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepare_run(Path(tmp) / "corpus")
        for size in sizes:
            run = Path(tmp) / size
            run.mkdir()
            for name in ("tokenizer.json", "tokens"):
                os.symlink(Path(tmp) / "corpus" / name, run / name)
            sets = [f"--set={s}" for s in [*shape(size, args.quick), "pretrain.device=cpu"]]
            ours = [sys.executable, "-m", "scratchlm", "pretrain", RECIPES[size]]
            ours += ["--run-dir", str(run), *sets]
            peer = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", size]
            peer += ["--quick"] if args.quick else []
            for model, cmd in (("scratchlm", ours), ("transformers", peer)):
                log = Path(tmp) / f"{size}-{model}.log"
                rss, code, seconds = peak_rss_mib(cmd, log, env)
                row = {"size": size, "model": model, "peak_rss_mib": round(rss), "seconds": seconds}
                if code != 0:
                    row["error"] = log.read_text().strip().splitlines()[-1:]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"{'recipe':<8}{'model':<14}{'peak RSS MiB':>14}{'seconds':>9}")
    for r in rows:
        status = f"  error: {r['error']}" if "error" in r else ""
        print(f"{r['size']:<8}{r['model']:<14}{r['peak_rss_mib']:>14,}{r['seconds']:>9.0f}{status}")
    for size in sizes:
        got = {r["model"]: r["peak_rss_mib"] for r in rows if r["size"] == size}
        ratio = got["scratchlm"] / got["transformers"]
        print(f"{size}: scratchlm / transformers peak memory = {ratio:.2f}")
    if args.json:
        print(json.dumps({"results": rows}))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
