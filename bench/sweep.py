"""Recipe sweep for the quality bench: val bits-per-byte of candidate recipes at equal compute.

Candidates are the bench recipe (bench/quality_per_time.py, one side) and one-at-a-time
variations of it (`--vary key=v1,v2`). Each candidate's speed is probed first, all of them in
turns, so that other load on a shared machine hits them alike; each candidate then trains for the
steps it would fit in the budget at that speed: the reference's steps in the budget (`--ref-steps`,
from a run of quality_per_time.py on a quiet machine) times its speed relative to the reference.
A fixed step count (the schedule over steps, not the clock) makes the result independent of how
busy the machine is while the sweep runs.

    python bench/sweep.py --side muon --ref-steps 450 --vary pretrain.muon_lr=0.01,0.04 \\
        --try "model.dim=256 model.n_heads=8 model.n_kv_heads=4" [--jobs 2] [--json]
    python bench/sweep.py --quick [--json]

--quick checks the script in seconds: the reference and (unless --vary or --try name others) one
variation that shares its speed probe and one with a probe of its own, 2 steps each, on the quick
text of bench/quality_per_time.py.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_per_time as bench  # noqa: E402

from scratchlm.config import load_recipe  # noqa: E402
from scratchlm.model import Transformer, cross_entropy_loss  # noqa: E402
from scratchlm.train.optim import build_optimizer  # noqa: E402
from scratchlm.train.pretrain import model_config_from  # noqa: E402

# --quick: one variation that shares the reference's speed probe, one with a probe of its own.
QUICK_CANDIDATES = dict(vary=["pretrain.muon_lr=0.01"], tries=["model.n_layers=2"])


def candidates(
    side: str, vary: list[str], tries: list[str], extra: list[str]
) -> dict[str, list[str]]:
    """name -> recipe overrides: the side's recipe, each variation of one key, then each --try
    (several keys changed together)."""
    base = bench.SIDE_RECIPES[side] + extra
    found = {"reference": base}
    for item in vary:
        key, _, values = item.partition("=")
        for value in values.split(","):
            found[f"{key}={value}"] = [*base, f"{key}={value}"]
    for item in tries:
        found[item] = [*base, *item.split()]
    return found


def probe(overrides: dict[str, list[str]], rounds: int) -> dict[str, float]:
    """Seconds per optimizer step of each candidate (random tokens, the real model, optimizer
    and clipping), measured in turns; the median of `rounds` steps after one warm-up step.
    Candidates that differ only in rates, decay or schedule share one measurement."""
    steps, same_work = {}, {}
    for name, sets in overrides.items():
        recipe = load_recipe(None, bench.RECIPE + sets)
        cfg, model_cfg = recipe.pretrain, model_config_from(recipe)
        work = (str(model_cfg), cfg.tokens_per_step, cfg.micro_batch_size, cfg.optimizer)
        if work in same_work.values():
            same_work[name] = work
            continue
        same_work[name] = work
        torch.manual_seed(0)
        model = Transformer(model_cfg)
        optimizer = build_optimizer(model, cfg)
        rows = cfg.tokens_per_step // model_cfg.max_seq_len
        accum = max(1, rows // cfg.micro_batch_size)
        tokens = torch.randint(0, model_cfg.vocab_size, (rows, model_cfg.max_seq_len + 1))

        def step(model=model, optimizer=optimizer, tokens=tokens, accum=accum, cfg=cfg) -> float:
            start = time.perf_counter()
            for chunk in tokens.chunk(accum):
                loss = cross_entropy_loss(model(chunk[:, :-1]), chunk[:, 1:]) / accum
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(rounds + 1):
        for name, step in steps.items():
            elapsed = step()
            if i:
                times[name].append(elapsed)
    measured = {same_work[name]: statistics.median(ts) for name, ts in times.items()}
    return {name: measured[work] for name, work in same_work.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=sorted(bench.SIDE_RECIPES), default="muon")
    parser.add_argument("--ref-steps", type=int, help="reference steps in budget (required)")
    parser.add_argument("--vary", action="append", default=[], help="key=v1,v2 (repeatable)")
    parser.add_argument(
        "--try", dest="tries", action="append", default=[], help="'key=v key=v' (repeatable)"
    )
    parser.add_argument("--set", action="append", default=[], help="overrides for every one")
    parser.add_argument("--rounds", type=int, default=5, help="timed probe steps per candidate")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time, 1 thread each")
    parser.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(ref_steps=2, rounds=1)
        args = parser.parse_args()
        if not (args.vary or args.tries):
            vars(args).update(QUICK_CANDIDATES)
    if args.ref_steps is None:
        parser.error("--ref-steps is required")
    source = next((p for p in bench.SOURCES if p.exists()), None)
    if source is None:
        sys.exit("tinyshakespeare not found in ../shared/data or data/")
    text = gzip.open(source, "rt", encoding="utf-8").read()
    if args.quick:
        text = text[: bench.QUICK_CHARS]
    cut = int(len(text) * 0.9)

    overrides = candidates(args.side, args.vary, args.tries, args.set)
    seconds_per_step = probe(overrides, args.rounds)
    reference = seconds_per_step["reference"]
    steps = {
        name: max(1, round(args.ref_steps * reference / seconds))
        for name, seconds in seconds_per_step.items()
    }
    # The trainings run a fixed number of steps, so they may share the machine: --jobs processes
    # of one thread each.
    # Fresh (spawned) processes: a forked child of a process that ran OpenMP threads may hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        args.jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        futures = {
            name: pool.submit(bench.scratchlm_side, text, cut, 0.0, sets, steps[name])
            for name, sets in overrides.items()
        }
        rows = []
        for name, future in futures.items():
            result = future.result()
            rows.append(
                {
                    "candidate": name,
                    "relative_speed": round(reference / seconds_per_step[name], 3),
                    "steps": steps[name],
                    "params": result["params"],
                    "val_bpb": round(result["val_bpb"], 4),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{'candidate':<36}{'speed':>7}{'steps':>7}{'params':>11}{'val bpb':>9}")
    for r in sorted(rows, key=lambda r: r["val_bpb"]):
        print(
            f"{r['candidate']:<36}{r['relative_speed']:>7.2f}{r['steps']:>7}"
            f"{r['params']:>11,}{r['val_bpb']:>9.3f}"
        )
    if args.json:
        print(json.dumps({"side": args.side, "ref_steps": args.ref_steps, "results": rows}))


if __name__ == "__main__":
    main()
