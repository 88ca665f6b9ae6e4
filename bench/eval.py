"""Benchmark tasks: in-house scores against lm-evaluation-harness, and speed against its hf model.

For each task, on the same checkpoint and the same examples (the first --limit of each file):
1. the in-house task (scratchlm eval), timed end to end;
2. the harness running the scratchlm_<task> files through ScratchLM (the checkpoint as it is):
   the parity check, score by score and example by example;
3. the harness's own `hf` model on the Hugging Face export of the checkpoint: the external check,
   and the speed reference (same batch size, same CPU threads, timed end to end, and also the
   time spent inside its model calls alone and the process CPU time, steadier than the wall
   clock on a shared machine).

Prints a table; with --json the last line is one JSON object with, among others,
max_abs_diff_points (largest score gap to the harness over all tasks, in points) and
speedup_vs_harness (harness hf time / in-house time, all tasks together).

    PYTHONPATH=. python bench/eval.py runs/tiny [--tasks all] [--limit 100] [--data-dir D] [--json]
    PYTHONPATH=. python bench/eval.py --quick [PATH] [--json]

--quick checks the script in seconds: one task of each kind (multiple choice scored by acc and
acc_norm, last word with perplexity, rolling perplexity, generation, a group of subtasks), 2
examples each (of each subtask), at most 16 generated tokens, on PATH or, without one, on a random
model of the demo's shape made in a temporary folder.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from scratchlm.checkpoint import model_tensors, save_checkpoint
from scratchlm.evaluate.generation import generation_budget
from scratchlm.evaluate.harness import ScratchLM, run_harness
from scratchlm.evaluate.tasks import EvalOptions, get_task, task_names
from scratchlm.export.hf import export_run
from scratchlm.loading import load
from scratchlm.model import ModelConfig, Transformer
from scratchlm.paths import PROJECT_ROOT
from scratchlm.tokenizer import train_tokenizer

POINT_METRICS = ("acc", "acc_norm", "exact_match", "exact_match_flexible")
RATIO_METRICS = ("perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity")
QUICK = dict(tasks="copa,hellaswag,lambada,perplexity,gsm8k,blimp", limit=2, max_gen_toks=16)


class Timed:
    """Wraps a harness LM and adds up the seconds spent in its request methods."""

    def __init__(self, lm: Any) -> None:
        self.lm, self.seconds = lm, 0.0
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, name, self._timed(getattr(lm, name)))

    def _timed(self, method):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return call


def gaps(ours: dict, theirs: dict) -> tuple[float, float]:
    """(largest gap in points over accuracy-like metrics, largest relative gap over the rest)."""
    points = [abs(ours[m] - theirs[m]) * 100 for m in POINT_METRICS if m in ours and m in theirs]
    ratios = [
        abs(ours[m] - theirs[m]) / abs(theirs[m])
        for m in RATIO_METRICS
        if m in ours and m in theirs and theirs[m]
    ]
    return max(points, default=0.0), max(ratios, default=0.0)


def same_choices(ours: dict, samples: dict) -> float | None:
    """Share of examples where both pick the same choice (multiple-choice tasks)."""
    if "examples" not in ours:
        return None
    harness = {}
    for name, rows in samples.items():
        for row in rows:
            harness[(name, row["doc_id"])] = [r[0][0] for r in row["resps"]]
    # Group tasks list their subtasks in name order, as the in-house subsets are.
    theirs = [harness[k] for k in sorted(harness)]
    if len(theirs) != len(ours["examples"]) or not theirs or len(theirs[0]) < 2:
        return None
    agree = sum(
        max(range(len(t)), key=t.__getitem__) == max(range(len(o)), key=lambda i: o[i][0])
        for t, o in zip(theirs, ours["examples"], strict=True)
    )
    return agree / len(theirs)


def random_run(folder: Path) -> Path:
    """folder/tokenizer.json and folder/pretrain/step-000000: an untrained model of the demo's
    shape over a tokenizer of its vocabulary size (what --quick scores when given no run)."""
    with gzip.open(PROJECT_ROOT / "data/tinyshakespeare/input.txt.gz", "rt") as f:
        text = f.read(200_000)
    tokenizer = train_tokenizer(text.split("\n\n"), 2048, folder / "tokenizer.json")
    config = ModelConfig(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(config)
    save_checkpoint(folder / "pretrain", 0, model_tensors(model), config.to_dict(), {"step": 0})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", help="run folder or checkpoint (default: runs/tiny)")
    parser.add_argument("--tasks", default="all", help="comma-separated, or all")
    parser.add_argument("--limit", type=int, default=100, help="examples per (sub)task")
    parser.add_argument("--data-dir", default="data/eval")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-gen-toks", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.path is None:
            args.path = str(random_run(Path(folder))) if args.quick else "runs/tiny"
        compare(args)


def compare(args: argparse.Namespace) -> None:
    """The table, and with --json the summary line, of every task on args.path."""
    names = (
        [n for n in task_names() if get_task(n).harness_name]
        if args.tasks == "all"
        else args.tasks.split(",")
    )
    model, tokenizer = load(args.path)
    options = EvalOptions(
        limit=args.limit,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        max_gen_toks=args.max_gen_toks,
        examples=True,
    )
    budget = generation_budget(model.config.max_seq_len, args.max_gen_toks)
    from lm_eval.models.huggingface import HFLM

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        export_run(Path(args.path), Path(folder))
        hf = Timed(
            HFLM(pretrained=folder, batch_size=args.batch_size, dtype="float32", device="cpu")
        )
        # One small task first on each side: imports and first-call costs stay out of the timing.
        warm = EvalOptions(limit=2, batch_size=args.batch_size, data_dir=args.data_dir)
        get_task("copa").run(model, tokenizer, warm)
        run_harness(hf.lm, ["copa"], warm)
        hf.seconds = 0.0
        for name in names:
            start, cpu = time.perf_counter(), time.process_time()
            ours = get_task(name).run(model, tokenizer, options)
            ours_s, ours_cpu = time.perf_counter() - start, time.process_time() - cpu
            scores, samples = run_harness(
                ScratchLM(model, tokenizer, options), [name], options, log_samples=True
            )
            before = hf.seconds
            start, cpu = time.perf_counter(), time.process_time()
            hf_scores, _ = run_harness(hf.lm, [name], options, gen_kwargs={"max_gen_toks": budget})
            hf_s, hf_cpu = time.perf_counter() - start, time.process_time() - cpu
            points, ratio = gaps(ours, scores[name])
            hf_points, hf_ratio = gaps(ours, hf_scores[name])
            rows.append(
                {
                    "task": name,
                    "n": ours["n"],
                    "scores": {k: v for k, v in ours.items() if k in POINT_METRICS + RATIO_METRICS},
                    "harness": {
                        k: v for k, v in scores[name].items() if k in POINT_METRICS + RATIO_METRICS
                    },
                    "harness_hf": {
                        k: v
                        for k, v in hf_scores[name].items()
                        if k in POINT_METRICS + RATIO_METRICS
                    },
                    "chance": ours.get("chance"),
                    "diff_points": points,
                    "diff_relative": ratio,
                    "hf_diff_points": hf_points,
                    "hf_diff_relative": hf_ratio,
                    "same_choice": same_choices(ours, samples.get(name, {})),
                    "seconds": ours_s,
                    "hf_seconds": hf_s,
                    "cpu_seconds": ours_cpu,
                    "hf_cpu_seconds": hf_cpu,
                    "hf_model_seconds": hf.seconds - before,
                }
            )
            print_row(rows[-1])

    total, hf_total = sum(r["seconds"] for r in rows), sum(r["hf_seconds"] for r in rows)
    hf_model = sum(r["hf_model_seconds"] for r in rows)
    cpu, hf_cpu = sum(r["cpu_seconds"] for r in rows), sum(r["hf_cpu_seconds"] for r in rows)
    # Generation (GSM8K) runs one prompt at a time here and batched in the harness: apart.
    scored = [r for r in rows if get_task(r["task"]).harness_name != "scratchlm_gsm8k"]
    scoring = sum(r["hf_seconds"] for r in scored) / max(1e-9, sum(r["seconds"] for r in scored))
    print(
        f"\nall tasks: in-house {total:.1f} s, harness hf {hf_total:.1f} s "
        f"({hf_model:.1f} s inside its model calls): {hf_total / total:.2f}x "
        f"({hf_model / total:.2f}x on model time alone); CPU time {cpu:.1f} s vs "
        f"{hf_cpu:.1f} s: {hf_cpu / cpu:.2f}x; log-likelihood tasks alone: {scoring:.2f}x"
    )
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    summary = {
        "path": args.path,
        "limit": args.limit,
        "data_dir": args.data_dir,
        "machine": machine,
        "max_abs_diff_points": max(r["diff_points"] for r in rows),
        "max_relative_diff": max(r["diff_relative"] for r in rows),
        "max_abs_diff_points_hf": max(r["hf_diff_points"] for r in rows),
        "speedup_vs_harness": hf_total / total,
        "speedup_vs_harness_model_time": hf_model / total,
        "speedup_vs_harness_cpu_time": hf_cpu / cpu,
        "speedup_vs_harness_scoring": scoring,
        "seconds": total,
        "harness_hf_seconds": hf_total,
        "tasks": rows,
    }
    if args.json:
        print(json.dumps(summary))


def print_row(row: dict) -> None:
    if not hasattr(print_row, "header"):
        print_row.header = True  # type: ignore[attr-defined]
        print(
            f"{'task':<15} {'n':>5} {'metric':<14} {'scratchlm':>10} {'lm-eval':>10} "
            f"{'lm-eval hf':>10} {'chance':>7} {'same':>6} {'ours s':>7} {'hf s':>7} {'x':>5}"
        )
    for metric, value in row["scores"].items():
        same = row["same_choice"]
        print(
            f"{row['task']:<15} {row['n']:>5} {metric:<14} {value:>10.4f} "
            f"{row['harness'].get(metric, float('nan')):>10.4f} "
            f"{row['harness_hf'].get(metric, float('nan')):>10.4f} "
            f"{row['chance'] if row['chance'] is not None else float('nan'):>7.3f} "
            f"{'' if same is None else f'{same:.3f}':>6} {row['seconds']:>7.2f} "
            f"{row['hf_seconds']:>7.2f} {row['hf_seconds'] / row['seconds']:>5.1f}"
        )


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
