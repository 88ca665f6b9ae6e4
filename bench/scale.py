"""Scale-out throughput: tokens/s per rank and the share of step time spent communicating, for
each parallel layout this machine can run, on the tiny and the ~124M recipe.

Every layout runs the real `parallel.init` / `parallel.apply` under torchrun (one process for the
baseline), on random tokens, with the recipe's optimizer and gradient clipping. The communication
share is the union of the time intervals of collective and point-to-point ops (gloo or NCCL,
including waits for pipeline peers) in one profiled step, over that step's time. With --gpu it
measures instead FSDP2 + torch.compile + bf16 on one GPU for the ~124M and ~1B recipes, with MFU.

    PYTHONPATH=. python bench/scale.py [--sizes tiny,124m] [--steps 3] [--json]
    PYTHONPATH=. python bench/scale.py --gpu [--sizes 124m,1b] [--json]
    PYTHONPATH=. python bench/scale.py --quick [--json]   # every layout, tiny recipe, 1 small step

--quick checks the script: the tiny recipe at 2,048 tokens a step (4 micro-batches), 1 timed step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "tiny": "recipes/tiny.toml",
    "124m": "recipes/gpt124m.toml",
    "1b": "recipes/llama1b.toml",
}
# CPU runs keep the big recipe's model but shorten its sequences and batch to fit the machine.
CPU_SHAPES = {
    "tiny": ["pretrain.micro_batch_size=16", "pretrain.tokens_per_step=8192"],
    "124m": [
        "model.max_seq_len=256",
        "pretrain.micro_batch_size=2",
        "pretrain.tokens_per_step=1024",
    ],
}
# --quick: a small step that still accumulates (and gives the pipeline several micro-batches).
QUICK_SHAPE = ["pretrain.micro_batch_size=2", "pretrain.tokens_per_step=2048"]
LAYOUTS = {
    "1 process": (1, []),  # one thread, like each rank of the others
    "DDP 2": (2, ["parallel.dp_replicate=2"]),
    "FSDP2 2": (2, ["parallel.dp_shard=2"]),
    "TP 2": (2, ["parallel.tp=2"]),
    "PP 2 (1F1B)": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
}
# Two micro-batches per step: enough to time accumulation without hour-long steps.
GPU_BATCH = {
    "124m": ["pretrain.micro_batch_size=16", "pretrain.tokens_per_step=32768"],
    "1b": ["pretrain.micro_batch_size=4", "pretrain.tokens_per_step=16384"],
}
# Dense bf16 peak FLOP/s, for MFU.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
COMM_OPS = re.compile(
    r"nccl|gloo|c10d::|all_?reduce|all_?gather|reduce_scatter|broadcast|send|recv", re.I
)


def comm_seconds(prof: torch.profiler.profile) -> float:
    """Wall time during which any communication op (CPU side or GPU kernel) was running."""
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if COMM_OPS.search(e.name)
    )
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e6


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (Linux), else what platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def worker(args: argparse.Namespace) -> None:
    """One rank: build, parallelise and time the model; rank 0 prints a RESULT line."""
    from scratchlm import parallel
    from scratchlm.config import load_recipe
    from scratchlm.device import pick_runtime
    from scratchlm.model import Transformer, cross_entropy_loss
    from scratchlm.train.optim import build_optimizer
    from scratchlm.train.pretrain import model_config_from

    recipe = load_recipe(ROOT / RECIPES[args.size], args.set)
    cfg = recipe.pretrain
    runtime = pick_runtime(cfg.device, cfg.precision)
    dist = parallel.init(recipe.parallel, runtime.device)
    torch.manual_seed(cfg.seed)
    model_cfg = model_config_from(recipe)
    with runtime.device:
        model = Transformer(model_cfg)
    flops_per_token = model.flops_per_token(model_cfg.max_seq_len)
    n_params = model.num_params()
    accum = cfg.tokens_per_step // model_cfg.max_seq_len // dist.dp_size // cfg.micro_batch_size
    if args.one_device_fsdp:  # FSDP2 on a one-device mesh: the layout a cluster run uses per rank
        from torch.distributed.device_mesh import init_device_mesh

        device_type = runtime.device.type
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")
        mesh = init_device_mesh(device_type, (1, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
        parallel.apply_fsdp(model, mesh, runtime)
    else:
        model = parallel.apply(model, dist, recipe.parallel, runtime, accum, cross_entropy_loss)
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg, dist.tied_copies)
    rows = cfg.tokens_per_step // model_cfg.max_seq_len // dist.dp_size
    generator = torch.Generator().manual_seed(dist.dp_rank)
    tokens = torch.randint(
        0, model_cfg.vocab_size, (rows, model_cfg.max_seq_len + 1), generator=generator
    )
    x, y = tokens[:, :-1].to(runtime.device), tokens[:, 1:].to(runtime.device)

    def step() -> None:
        if dist.pipeline is not None:
            dist.pipeline.step(x, y)
        else:
            for i, (mx, my) in enumerate(zip(x.chunk(accum), y.chunk(accum), strict=True)):
                with parallel.gradient_sync(model, i == accum - 1), runtime.autocast():
                    loss = cross_entropy_loss(train_model(mx), my) / accum
                loss.backward()
        parallel.clip_grad_norm_(model, cfg.grad_clip, dist)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(args.warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runtime.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        profiled_start = time.perf_counter()
        step()
        synchronize()
        profiled_s = time.perf_counter() - profiled_start
    tokens_per_s = cfg.tokens_per_step / step_s
    result = {
        "params": n_params,
        "world_size": dist.world_size,
        "step_s": round(step_s, 4),
        "tokens_per_s_per_rank": round(tokens_per_s / dist.world_size, 1),
        "comm_share": round(comm_seconds(prof) / profiled_s, 3),
    }
    if runtime.device.type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
        peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
        result["gpu"] = name
        result["mfu"] = round(flops_per_token * tokens_per_s / peak, 4) if peak else None
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    if dist.is_main:
        print("RESULT " + json.dumps(result), flush=True)
    parallel.shutdown(dist)


def launch(size: str, nproc: int, overrides: list[str], steps: int, extra: list[str]) -> dict:
    """Run the worker for one layout (under torchrun when it needs ranks) and parse its result."""
    script = [str(Path(__file__).resolve()), "--worker", "--size", size, "--steps", str(steps)]
    script += [f"--set={o}" for o in overrides] + extra
    if nproc == 1 and "--one-device-fsdp" not in extra:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *script]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if "--one-device-fsdp" not in extra:  # CPU: one thread per rank, so per-rank figures compare
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    errors = [line for line in proc.stderr.splitlines() if re.search(r"Error|error:", line)]
    return {"error": (errors or ["no result"])[-1].strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated: tiny, 124m, 1b")
    p.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="FSDP2 + compile + bf16 on one GPU")
    p.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one-device-fsdp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        p.set_defaults(sizes="tiny", steps=1)
        args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU")
        for size in (args.sizes or "124m,1b").split(","):
            sets = [*GPU_BATCH.get(size, []), "pretrain.compile=true", "pretrain.precision=bf16"]
            extra = ["--one-device-fsdp", f"--warmup={max(args.warmup, 3)}"]
            rows.append(
                {
                    "size": size,
                    "layout": "FSDP2+compile+bf16, 1 GPU",
                    **launch(size, 1, sets, args.steps, extra),
                }
            )
    else:
        for size in (args.sizes or "tiny,124m").split(","):
            base = [*CPU_SHAPES.get(size, []), *(QUICK_SHAPE if args.quick else [])]
            base.append("pretrain.device=cpu")
            for layout, (nproc, overrides) in LAYOUTS.items():
                extra = [f"--warmup={args.warmup}"]
                rows.append(
                    {
                        "size": size,
                        "layout": layout,
                        **launch(size, nproc, base + overrides, args.steps, extra),
                    }
                )
                print(rows[-1], file=sys.stderr, flush=True)
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"{'size':6} {'layout':28} {'params':>10} {'tok/s/rank':>11} {'comm':>6} {'MFU':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['size']:6} {r['layout']:28} error: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(
            f"{r['size']:6} {r['layout']:28} {r['params'] / 1e6:9.1f}M "
            f"{r['tokens_per_s_per_rank']:11,.0f} {r['comm_share']:6.1%} {mfu:>6}"
        )
    print(f"machine: {machine}, torch {torch.__version__}")
    if args.json:
        print(json.dumps({"machine": machine, "torch": torch.__version__, "results": rows}))


if __name__ == "__main__":
    main()
