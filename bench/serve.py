"""Inference figures, each side by side with its peer in one run.

1. Batch-1 decode tokens/s of scratchlm's engine against transformers' `generate` on the same
   model exported with `scratchlm export --format hf` (greedy, same prompt, same number of new
   tokens; the tokens must match), at about 1M, 5M and 30M parameters. Each side runs several
   rounds in alternation and keeps its best, so that machine noise hits both alike.
2. Aggregate tokens/s of `scratchlm serve` with 1, 8 and 32 concurrent streaming clients, each on
   its own connection (the 5M model; every request makes the same number of tokens with
   `ignore_eos`), with time to first
   token (p50, p99) and inter-token latency (p50) under that load.
3. llama.cpp (llama-cpp-python, when installed: `pip install 'scratchlm[llamacpp]'`) decoding the
   f16 and q8_0 GGUF exports of the 5M model, beside scratchlm's batch-1 decode of the same model.

Models are randomly initialised: speed does not depend on what the weights say.

    PYTHONPATH=. python bench/serve.py [--tokens 128] [--rounds 3] [--threads N] [--quick] [--json]

On a busy machine, --threads 1 keeps both sides off each other's thread pools.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from scratchlm.checkpoint import model_tensors, save_checkpoint
from scratchlm.export.gguf import export_gguf
from scratchlm.export.hf import export_run
from scratchlm.infer.generate import generate
from scratchlm.loading import load
from scratchlm.model import ModelConfig, Transformer
from scratchlm.paths import PROJECT_ROOT
from scratchlm.tokenizer import train_tokenizer

SIZES = {
    "1M": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048),
    "5M": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096),
    "30M": dict(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, tie_embeddings=False
    ),
}
PROMPT = "First Citizen: Before we proceed any further, hear me speak."


def make_runs(folder: Path, sizes: list[str]) -> dict[str, Path]:
    import gzip

    with gzip.open(PROJECT_ROOT / "data" / "tinyshakespeare" / "input.txt.gz", "rt") as f:
        text = f.read(400_000)
    tokenizer = train_tokenizer(text.split("\n\n"), 2048, folder / "tokenizer.json")
    runs = {}
    for name in sizes:
        run = folder / name
        run.mkdir()
        (run / "tokenizer.json").write_bytes(tokenizer.path.read_bytes())
        cfg = ModelConfig(max_seq_len=1024, **SIZES[name])
        torch.manual_seed(0)
        model = Transformer(cfg)
        save_checkpoint(run / "pretrain", 0, model_tensors(model), cfg.to_dict(), {"step": 0})
        runs[name] = run
    return runs


def best_rate(fn, tokens: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return tokens / min(times)


def decode_vs_transformers(run: Path, tokens: int, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model, tokenizer = load(run)
    hf_dir = export_run(run, run / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf.generation_config.eos_token_id = None
    prompt = tokenizer.encode(PROMPT, add_bos=True)

    def ours():
        return list(generate(model, prompt, tokens, temperature=0))

    def theirs():
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_id,
            )
        return out[0, len(prompt) :].tolist()

    same = ours() == theirs()  # also the warm-up
    ours_rates, theirs_rates = [], []
    for _ in range(rounds):  # alternate, so that noise hits both
        ours_rates.append(best_rate(ours, tokens, 1))
        theirs_rates.append(best_rate(theirs, tokens, 1))
    return {
        "params": model.num_params(),
        "scratchlm_tok_s": max(ours_rates),
        "transformers_tok_s": max(theirs_rates),
        "ratio": max(ours_rates) / max(theirs_rates),
        "same_tokens": same,
    }


def engine_batching(run: Path, tokens: int, concurrency: list[int]) -> dict[int, float]:
    """Tokens/s of the engine alone (no HTTP) with n requests at once."""
    from scratchlm.infer.engine import Engine
    from scratchlm.infer.sampling import SamplingParams

    model, tokenizer = load(run)
    rates = {}
    for n in concurrency:
        engine = Engine(model, tokenizer, max_batch=max(concurrency))
        prompts = [tokenizer.encode(f"{PROMPT} ({i})", add_bos=True) for i in range(n)]
        start = time.perf_counter()
        engine.generate_batch(prompts, SamplingParams(max_tokens=tokens, temperature=0))
        rates[n] = n * tokens / (time.perf_counter() - start)
    return rates


async def _client(http, url: str, prompt: str, tokens: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    arrivals = []
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                if json.loads(line[6:])["choices"][0]["text"]:
                    arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals, "end": time.perf_counter()}


async def _clients(url: str, prompts: list[str], tokens: int) -> list[dict]:
    """Concurrent streaming requests, each on its own connection of one shared pool. (An httpx
    client apiece costs about 10 ms of CPU to build, on the cores the server runs on: 32 of them
    delayed the last request's arrival by about 0.4 s and charged that to the server.)"""
    import httpx

    limits = httpx.Limits(max_connections=max(64, len(prompts)))
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        return await asyncio.gather(*[_client(http, url, p, tokens) for p in prompts])


def serve_load(run: Path, tokens: int, concurrency: list[int]) -> dict:
    import httpx

    sys.path.insert(0, str(PROJECT_ROOT / "tests"))
    from serve_fixtures import Server

    server = Server(run, "--max-batch", str(max(concurrency)), "--model-name", "bench")
    results = {}
    try:
        asyncio.run(_clients(server.url, [PROMPT], 8))  # warm-up
        for n in concurrency:
            prompts = [f"{PROMPT} ({i})" for i in range(n)]
            start = time.perf_counter()
            clients = asyncio.run(_clients(server.url, prompts, tokens))
            wall = time.perf_counter() - start
            ttft = [c["arrivals"][0] - c["start"] for c in clients]
            itl = [
                (c["arrivals"][-1] - c["arrivals"][0]) / max(1, len(c["arrivals"]) - 1)
                for c in clients
            ]
            results[n] = {
                "tok_s": n * tokens / wall,
                "ttft_p50_ms": 1000 * statistics.median(ttft),
                "ttft_p99_ms": 1000 * _percentile(ttft, 0.99),
                "itl_p50_ms": 1000 * statistics.median(itl),
            }
        httpx.get(server.url + "/health")
    finally:
        server.stop()
    return results


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def llama_cpp_rates(run: Path, tokens: int, rounds: int) -> dict:
    try:
        import llama_cpp
    except ImportError:
        return {}
    low = llama_cpp.llama_cpp
    defaults = low.llama_model_default_params

    def no_repacking():
        # AMX-repacked q8_0 kernels crash on VMs that list AMX without enabling it.
        params = defaults()
        params.use_extra_bufts = False
        return params

    model, tokenizer = load(run)
    prompt = tokenizer.encode(PROMPT, add_bos=True)
    rates = {}
    for dtype in ("f16", "q8_0"):
        path = export_gguf(model, tokenizer, run / f"model-{dtype}.gguf", dtype)
        low.llama_model_default_params = no_repacking
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=1024,
                n_threads=torch.get_num_threads(),
                verbose=False,
            )
        finally:
            low.llama_model_default_params = defaults

        def decode(llm=llm):
            n = 0
            for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                n += 1
                if n == tokens:
                    break

        decode()
        rates[dtype] = best_rate(decode, tokens, rounds)
        llm.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1M and 5M only, 1 round, 32 tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:  # a check of the script in seconds; options given on the command line still win
        parser.set_defaults(tokens=32, rounds=1)
        args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process too
    sizes = ["1M", "5M"] if args.quick else list(SIZES)
    rounds = args.rounds
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(Path(tmp), sizes)
        print(f"\nbatch-1 greedy decode, {args.tokens} new tokens (best of {rounds} rounds)")
        print(
            f"{'model':>6} {'params':>8} {'scratchlm':>11} {'transformers':>13} {'ratio':>6} same"
        )
        decode = {}
        for name in sizes:
            d = decode[name] = decode_vs_transformers(runs[name], args.tokens, rounds)
            print(
                f"{name:>6} {d['params'] / 1e6:>7.1f}M {d['scratchlm_tok_s']:>7.0f} t/s "
                f"{d['transformers_tok_s']:>9.0f} t/s {d['ratio']:>5.2f}x "
                f"{'yes' if d['same_tokens'] else 'NO'}",
                flush=True,
            )
        print(f"\nscratchlm serve, 5M model, {args.tokens} tokens per streaming request")
        print(f"{'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8}")
        load_results = serve_load(runs["5M"], args.tokens, [1, 8, 32])
        for n, r in load_results.items():
            print(
                f"{n:>7} {r['tok_s']:>8.0f} {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms "
                f"{r['itl_p50_ms']:>6.1f}ms",
                flush=True,
            )
        speedup = load_results[32]["tok_s"] / load_results[1]["tok_s"]
        print(f"aggregate speedup 32 vs 1 clients: {speedup:.1f}x")
        engine_rates = engine_batching(runs["5M"], args.tokens, [1, 32])
        engine_speedup = engine_rates[32] / engine_rates[1]
        print(
            f"the engine alone, no HTTP: {engine_rates[1]:.0f} tokens/s with 1 request, "
            f"{engine_rates[32]:.0f} with 32: {engine_speedup:.1f}x"
        )
        gguf_rates = llama_cpp_rates(runs["5M"], args.tokens, rounds)
        print("\nbatch-1 decode of the 5M model: llama.cpp on the GGUF exports beside scratchlm")
        if gguf_rates:
            for dtype, rate in gguf_rates.items():
                print(f"  llama.cpp {dtype:>5}: {rate:>6.0f} t/s")
        else:
            print("  llama.cpp: not installed (pip install 'scratchlm[llamacpp]')")
        print(f"  scratchlm  fp32: {decode['5M']['scratchlm_tok_s']:>6.0f} t/s")
    if args.json:
        result = {
            "decode_ratio_vs_transformers": decode["5M"]["ratio"],
            "aggregate_speedup_32_vs_1": speedup,
            "engine_speedup_32_vs_1": engine_speedup,
            "decode": decode,
            "serve": {str(n): r for n, r in load_results.items()},
            "llama_cpp_tok_s": gguf_rates,
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
