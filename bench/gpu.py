"""One-GPU training throughput of the ~124M and ~1B recipes: tokens/s, MFU and peak memory, beside
transformers' LlamaForCausalLM of the same shape and batch.

Each size runs in its own process. scratchlm runs as a cluster rank would: FSDP2 on a one-device
mesh, torch.compile, bf16 autocast with SDPA (flash kernels on GPU), and fused AdamW or Muon
(--optimizer), for --warmup then --steps timed optimizer steps on random tokens at the recipe's
sequence length. transformers gets the same shape, batch, precision, compile and optimizer (AdamW,
fused), with its own loss. MFU counts 6 N + 12 L d T FLOPs per token (model.flops_per_token)
against the device's dense bf16 peak (989 TFLOP/s on H100 and H200).

The whole run (two sizes, two models, compile included) is meant to stay under 8 minutes on one
H100, so that it can be repeated after a fix. `--device cpu` checks the script on a CPU: the tiny
recipe, fp32, no compile unless --compile.

    python bench/gpu.py [--sizes 124m,1b] [--steps 10] [--optimizer adamw|muon] [--json]
    python bench/gpu.py --device cpu --steps 2 [--sizes tiny]
    python bench/gpu.py --quick [--json]   # tiny recipe, 1 + 2 steps; on a GPU where there is one
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
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
# Sequences per step on one 80 GB GPU, without gradient accumulation.
GPU_BATCH = {"tiny": 64, "124m": 16, "1b": 4}
CPU_BATCH = {"tiny": 8, "124m": 1, "1b": 1}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory; on CPU, the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_steps(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the warm-up steps, compile included; median seconds per timed step)."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return warmup_s, sorted(times)[len(times) // 2]


def worker(args: argparse.Namespace) -> dict:
    """One size, one model ("scratchlm" or "transformers") in this process."""
    from torch.distributed.device_mesh import init_device_mesh

    from scratchlm import parallel
    from scratchlm.config import load_recipe
    from scratchlm.device import pick_runtime
    from scratchlm.model import Transformer, cross_entropy_loss
    from scratchlm.train.optim import build_optimizer
    from scratchlm.train.pretrain import model_config_from

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    overrides = [f"pretrain.optimizer={args.optimizer}", f"pretrain.device={args.device}"]
    recipe = load_recipe(ROOT / RECIPES[args.size], overrides)
    if not on_gpu:  # a check of the script, not a measurement: short sequences
        recipe.model.max_seq_len = min(recipe.model.max_seq_len, 128)
    runtime = pick_runtime(recipe.pretrain.device, recipe.pretrain.precision)
    model_cfg = model_config_from(recipe)
    seq = model_cfg.max_seq_len
    batch = (GPU_BATCH if on_gpu else CPU_BATCH)[args.size]
    torch.manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    with device:
        ours = Transformer(model_cfg)
    flops_per_token = ours.flops_per_token(seq)
    if args.model == "scratchlm":
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
        mesh = init_device_mesh(device.type, (1, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
        parallel.apply_fsdp(ours, mesh, runtime)
        model, params = ours, ours.num_params()
        optimizer = build_optimizer(model, recipe.pretrain)
        forward = torch.compile(model) if args.compile else model

        def loss_of() -> torch.Tensor:
            return cross_entropy_loss(forward(x), y)
    else:
        from train_throughput import build_hf

        del ours
        with device:
            model = build_hf(model_cfg)
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.pretrain.lr, betas=(0.9, 0.95), fused=True
        )
        forward = torch.compile(model) if args.compile else model

        def loss_of() -> torch.Tensor:
            return forward(input_ids=x, labels=y, shift_labels=y).loss

    def step() -> None:
        with runtime.autocast():
            loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.pretrain.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup_s, step_s = timed_steps(step, device, args.warmup, args.steps)
    tokens_per_s = batch * seq / step_s
    peak = peak_flops(device)
    result = {
        "size": args.size,
        "model": args.model,
        "params": params,
        "batch": batch,
        "seq_len": seq,
        "precision": runtime.precision_name,
        "step_s": round(step_s, 4),
        "warmup_s": round(warmup_s, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "tflops": round(tokens_per_s * flops_per_token / 1e12, 3),
        "mfu": round(tokens_per_s * flops_per_token / peak, 4) if peak else None,
        "peak_memory_gib": round(peak_memory_gib(device), 2),
    }
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


def launch(size: str, model: str, args: argparse.Namespace) -> dict:
    """The worker for one size and model in a fresh process (its own memory peak and caches)."""
    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--size", size]
    cmd += ["--model", model, "--device", args.device, "--optimizer", args.optimizer]
    cmd += [f"--steps={args.steps}", f"--warmup={args.warmup}"]
    cmd += ["--compile"] if args.compile else ["--no-compile"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"size": size, "model": model, "error": (lines or ["no result"])[-1].strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", help="comma-separated: tiny, 124m, 1b")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compile)")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on GPU"
    )
    parser.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        device = "cuda" if torch.cuda.is_available() else "cpu"
        parser.set_defaults(sizes="tiny", steps=2, warmup=1, device=device)
        args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    if args.compile is None:
        args.compile = on_gpu
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if on_gpu and not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible; check the script on a CPU with --device cpu --steps 2")
    sizes = (args.sizes or ("124m,1b" if on_gpu else "tiny")).split(",")
    unknown = sorted(set(sizes) - set(RECIPES))
    if unknown:
        sys.exit(f"unknown sizes {unknown}; choose from {', '.join(RECIPES)}")
    start = time.time()
    rows = [launch(size, model, args) for size in sizes for model in ("scratchlm", "transformers")]
    name = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    print(
        f"{name}, torch {torch.__version__}, optimizer {args.optimizer} (transformers: AdamW), "
        f"compile {'on' if args.compile else 'off'}, {args.steps} timed steps"
    )
    print(
        f"{'size':<6}{'model':<14}{'params':>9}{'batch':>9}{'tokens/s':>12}{'TFLOP/s':>9}"
        f"{'MFU':>7}{'peak GiB':>10}{'warm-up s':>11}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['size']:<6}{r['model']:<14} error: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{r['size']:<6}{r['model']:<14}{r['params'] / 1e6:>8.0f}M"
            f"{r['batch']:>4} x{r['seq_len']:>4}{r['tokens_per_s']:>12,.0f}{r['tflops']:>9.1f}"
            f"{mfu:>7}{r['peak_memory_gib']:>10.1f}{r['warmup_s']:>11.0f}"
        )
    ratios = {}
    for size in sizes:
        got = {r["model"]: r for r in rows if r["size"] == size and "error" not in r}
        if len(got) == 2:
            ratios[size] = round(
                got["scratchlm"]["tokens_per_s"] / got["transformers"]["tokens_per_s"], 3
            )
            print(f"{size}: scratchlm / transformers tokens/s = {ratios[size]:.2f}x")
    print(f"whole run: {time.time() - start:.0f} s")
    if args.json:
        print(
            json.dumps(
                {"device": name, "optimizer": args.optimizer, "results": rows, "ratios": ratios}
            )
        )
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
