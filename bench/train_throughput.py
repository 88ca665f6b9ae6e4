"""Training throughput: scratchlm's Transformer against transformers' LlamaForCausalLM.

Both models get the same shapes, batch, optimizer (AdamW, fused where supported) and precision
(fp32 on CPU, bf16 autocast on CUDA), and each computes its loss its own way (transformers: the
`labels=` path). Steps alternate between the two models so that machine noise hits both alike; the
figure is each model's median step, and the best step is shown too.

Model FLOP utilisation: the training FLOPs per token (model.flops_per_token: 6 N plus attention) x
tokens/s, as a share of the device's peak: on CUDA the dense bf16 peak of its datasheet, on CPU the
fp32 matmul rate measured in the same run (1024^3 matmuls, in turns with the training steps).
--compile adds scratchlm under torch.compile (compile time not counted). Prints a table, and with
--json a last line that is one JSON object.

    PYTHONPATH=. python bench/train_throughput.py [--preset default|tiny] [--steps 10] [--json]
    PYTHONPATH=. python bench/train_throughput.py --quick [--json]   # the quick preset, 2 steps

--quick checks the script in seconds (preset quick, 1 warm-up and 2 timed steps): its figures say
nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from scratchlm.model import ModelConfig, Transformer, cross_entropy_loss

PRESETS = {
    # The shape of the PLATFORM measurement: 4M parameters (tied), 4096 tokens per step.
    "default": dict(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, seq=256, batch=16
    ),
    # The demo recipe's model.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, seq=256, batch=32),
    # What --quick runs here and in bench/compiled_kernels.py: every layer kind, at a toy size.
    "quick": dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, seq=64, batch=4),
}
QUICK = dict(preset="quick", warmup=1, steps=2)

# Dense bf16 peak FLOP/s of common GPUs, for MFU.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def build_hf(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_cfg)


def make_step(
    model: torch.nn.Module, loss_of: Callable[[], torch.Tensor], device: torch.device, amp: bool
) -> Callable[[], float]:
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line for line in f if line.startswith("model name"))
        return f"{model.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def gpu_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def matmul_step(device: torch.device, repeats: int = 4) -> Callable[[], float]:
    """Seconds per 1024^3 fp32 matmul (the mean of `repeats` back to back)."""
    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)
    out = torch.empty(1024, 1024, device=device)

    def step() -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also scratchlm compiled")
    parser.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()

    shape = dict(PRESETS[args.preset])
    seq, batch = shape.pop("seq"), args.batch or shape.pop("batch")
    shape.pop("batch", None)
    device = torch.device(args.device)
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=seq, **shape)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    ours = Transformer(cfg).to(device)
    hf = build_hf(cfg).to(device)
    steps = {
        "scratchlm": make_step(ours, lambda: cross_entropy_loss(ours(x), y), device, amp),
        # transformers shifts labels itself; shift_labels hands it the same targets as ours.
        "transformers": make_step(
            hf, lambda: hf(input_ids=x, labels=y, shift_labels=y).loss, device, amp
        ),
    }
    params = {
        "scratchlm": ours.num_params(),
        "transformers": sum(p.numel() for p in hf.parameters()),
    }
    if args.compile:
        compiled = Transformer(cfg).to(device)
        compiled.load_state_dict(ours.state_dict())
        loss_of = torch.compile(lambda: cross_entropy_loss(compiled(x), y), fullgraph=True)
        steps["scratchlm compiled"] = make_step(compiled, loss_of, device, amp)
        params["scratchlm compiled"] = params["scratchlm"]
    matmul = matmul_step(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    matmul_times: list[float] = []
    for i in range(args.warmup + args.steps):
        for name, step in steps.items() if i % 2 == 0 else reversed(steps.items()):
            elapsed = step()
            if i >= args.warmup:
                times[name].append(elapsed)
        if i >= args.warmup:
            matmul_times.append(matmul())

    flops = ours.flops_per_token(seq)
    matmul_flops = 2 * 1024**3 / statistics.median(matmul_times)
    peak = gpu_peak(device) if device.type == "cuda" else matmul_flops
    rows = {}
    for name, ts in times.items():
        tok_s = batch * seq / statistics.median(ts)
        rows[name] = {
            "params": params[name],
            "tokens_per_s": round(tok_s, 1),
            "best_step_tokens_per_s": round(batch * seq / min(ts), 1),
            "tflops": round(tok_s * flops / 1e12, 4),
            "mfu": round(tok_s * flops / peak, 4) if peak else None,
        }
    hf_rate = rows["transformers"]["tokens_per_s"]
    ratio = rows["scratchlm"]["tokens_per_s"] / hf_rate
    ratio_best = (
        rows["scratchlm"]["best_step_tokens_per_s"] / rows["transformers"]["best_step_tokens_per_s"]
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    precision = "bf16 autocast" if amp else "fp32"
    print(
        f"preset {args.preset}: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"{cfg.n_kv_heads} kv heads, vocab {cfg.vocab_size}, batch {batch} x {seq}, {precision}, "
        f"{device.type} ({torch.get_num_threads()} threads), {args.steps} timed steps each, "
        f"load average {load:.1f}"
    )
    peak_name = "its bf16 peak" if device.type == "cuda" else "the fp32 matmul rate"
    print(
        f"{'model':<20}{'params':>10}{'tokens/s':>12}{'best step':>12}{'TFLOP/s':>10}{'MFU':>8}"
        f"{'vs hf':>8}"
    )
    for name, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{name:<20}{r['params']:>10,}{r['tokens_per_s']:>12,.0f}"
            f"{r['best_step_tokens_per_s']:>12,.0f}{r['tflops']:>10.3f}{mfu:>8}"
            f"{r['tokens_per_s'] / hf_rate:>7.2f}x"
        )
    print(
        f"1024^3 fp32 matmul: {matmul_flops / 1e12:.3f} TFLOP/s in the same run; MFU is against "
        f"{peak_name}"
    )
    print(f"scratchlm / transformers: {ratio:.2f}x (median steps), {ratio_best:.2f}x (best steps)")
    if load is not None and device.type == "cpu" and load > (os.cpu_count() or 1):
        print(
            f"warning: load average {load:.1f} exceeds the {os.cpu_count()} cores; other "
            "processes share the CPU and the figures are noisy"
        )
    if args.json:
        result = {
            "preset": args.preset,
            "device": device_name(device),
            "threads": torch.get_num_threads(),
            "precision": precision,
            "batch": batch,
            "seq_len": seq,
            "steps": args.steps,
            "load_average": load,
            "matmul_tflops": round(matmul_flops / 1e12, 4),
            "models": rows,
            "ratio_vs_transformers": round(ratio, 3),
            "ratio_best_steps": round(ratio_best, 3),
            "mfu": rows["scratchlm"]["mfu"],
        }
        if args.compile:
            result["compiled_ratio_vs_transformers"] = round(
                rows["scratchlm compiled"]["tokens_per_s"] / hf_rate, 3
            )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
