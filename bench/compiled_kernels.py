"""The fused kernels under torch.compile: custom op, or the code inductor makes from plain ops?

Times one training step (forward, backward, fused AdamW) of the model compiled with
fullgraph=True (so a graph break would be an error), with every kernel as its custom op, then with
one kernel at a time replaced by plain torch ops that inductor fuses itself, then with all of them
plain; eager is shown for scale. Steps of all variants alternate, so that machine noise hits them
alike. A kernel stays a custom op under compile on CPU (scratchlm.kernels.COMPILED_USES_CUSTOM)
where the step is faster with it. Compiling each variant takes 30-60 s on a 2-core CPU.

    PYTHONPATH=. python bench/compiled_kernels.py [--preset default|tiny] [--steps 6] [--json]
    PYTHONPATH=. python bench/compiled_kernels.py --quick [--json]   # preset quick, 1 step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from train_throughput import PRESETS

from scratchlm import kernels
from scratchlm.model import ModelConfig, Transformer, cross_entropy_loss

KERNELS = ["split_qkv_rope", "swiglu", "rms_norm", "cross_entropy"]


def variants() -> dict[str, dict[str, bool] | None]:
    """name -> the COMPILED_USES_CUSTOM flags it compiles with (None: eager)."""
    found: dict[str, dict[str, bool] | None] = {"eager": None}
    found["compiled, all custom ops"] = dict.fromkeys(KERNELS, True)
    for name in KERNELS:
        found[f"compiled, {name} plain"] = {k: k != name for k in KERNELS}
    found["compiled, all plain ops"] = dict.fromkeys(KERNELS, False)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--quick", action="store_true", help="a check of the script: preset quick")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(preset="quick", steps=1)
        args = parser.parse_args()
    shape = dict(PRESETS[args.preset])
    seq, batch = shape.pop("seq"), shape.pop("batch")
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=seq, **shape)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    # Each variant is another compiled entry of the same code, told apart by its flags' guards.
    torch._dynamo.config.cache_size_limit = 64

    def loss_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cross_entropy_loss(model(a), b)

    steps: dict[str, Callable[[], float]] = {}
    compile_seconds: dict[str, float] = {}
    for name, flags in variants().items():
        fn = loss_of if flags is None else torch.compile(loss_of, fullgraph=True)

        def step(fn=fn, flags=flags) -> float:
            if flags is not None:
                kernels.COMPILED_USES_CUSTOM["cpu"] = flags
            start = time.perf_counter()
            fn(x, y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        compile_seconds[name] = step()  # the first step compiles
        steps[name] = step
        print(f"{name}: first step {compile_seconds[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps + 1):
        for name, step in steps.items() if i % 2 else reversed(steps.items()):
            elapsed = step()
            if i:
                times[name].append(elapsed)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    base = median["compiled, all custom ops"]
    print(
        f"\npreset {args.preset}: dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
        f"batch {batch} x {seq}, fp32, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'variant':<40}{'ms/step':>9}{'tokens/s':>10}{'vs all custom':>15}")
    for name, seconds in median.items():
        print(
            f"{name:<40}{seconds * 1e3:>9.0f}{batch * seq / seconds:>10,.0f}"
            f"{base / seconds:>14.2f}x"
        )
    # A kernel earns its place under compile when making it plain slows the step down.
    keep = {k: median[f"compiled, {k} plain"] > base for k in KERNELS}
    print("custom op faster under compile: " + ", ".join(f"{k} {v}" for k, v in keep.items()))
    if args.json:
        result = {
            "preset": args.preset,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0],
            "ms_per_step": {k: round(v * 1e3, 1) for k, v in median.items()},
            "compile_seconds": {k: round(v, 1) for k, v in compile_seconds.items()},
            "custom_op_faster_under_compile": keep,
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
