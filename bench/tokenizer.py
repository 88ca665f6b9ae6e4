"""Tokenizer training and tokenizing speed on the TinyStories excerpt (4.2 MB of text).

Trains the byte-level BPE tokenizer on every line of the corpus, then writes token shards with
1, 2, ... worker processes (each the best of --repeat runs, since a shared machine's timings
jitter). Prints a table, and with --json a last line that is one JSON object.

    PYTHONPATH=. python bench/tokenizer.py [--vocab-size 4096] [--copies 1] [--workers 1,2] [--json]
    PYTHONPATH=. python bench/tokenizer.py --quick [--json]   # a check of the script: one run each

--copies N tokenizes the corpus N times over (as N times as many documents), to show the speed
once the worker processes' start-up is paid for.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratchlm.documents import write_documents  # noqa: E402
from scratchlm.shards import write_token_shards  # noqa: E402
from scratchlm.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

SOURCES = [
    ROOT.parent / "shared/data/tinystories/tinystories_train_head_lowercase.txt.gz",
    ROOT / "data/tinystories/tinystories_train_head_lowercase.txt.gz",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run of each (--repeat 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(repeat=1)
        args = parser.parse_args()

    source = next(p for p in SOURCES if p.exists())
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    corpus_bytes = sum(len(line.encode()) for line in lines)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tok_path = tmp_path / "tokenizer.json"
        seconds = best_seconds(
            lambda: train_tokenizer(lines, args.vocab_size, tok_path), args.repeat
        )
        rows.append(
            {"task": "train BPE", "workers": "threads", "mb": corpus_bytes / 1e6, "s": seconds}
        )
        tok = Tokenizer.load(tok_path)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(lines))
        seconds = best_seconds(lambda: tok.encode_batch(lines), args.repeat)
        rows.append(
            {"task": "encode_batch", "workers": "threads", "mb": corpus_bytes / 1e6, "s": seconds}
        )

        docs = [
            {"id": f"{c}-{i}", "text": t, "meta": {}}
            for c in range(args.copies)
            for i, t in enumerate(lines)
        ]
        doc_file = tmp_path / "docs" / "part-00000.jsonl.zst"
        write_documents(doc_file, docs)
        out = tmp_path / "tokens"
        for workers in (int(w) for w in args.workers.split(",")):
            seconds = best_seconds(
                lambda w=workers: write_token_shards([doc_file], tok_path, out, 0.02, workers=w),
                args.repeat,
            )
            rows.append(
                {
                    "task": "write shards",
                    "workers": workers,
                    "mb": args.copies * corpus_bytes / 1e6,
                    "s": seconds,
                }
            )
    for row in rows:
        row["mb_per_s"] = row["mb"] / row["s"]
        row["tokens_per_s"] = (
            (args.copies if row["task"] == "write shards" else 1) * n_tokens / row["s"]
        )

    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    print(
        f"corpus {source.name}: {corpus_bytes / 1e6:.2f} MB, {len(lines)} lines, "
        f"{n_tokens} tokens at vocab {tok.vocab_size} ({corpus_bytes / n_tokens:.2f} bytes/token)"
    )
    print(f"machine: {machine}")
    print(f"{'task':<14}{'workers':>8}{'MB':>8}{'seconds':>9}{'MB/s':>8}{'Mtokens/s':>11}")
    for r in rows:
        print(
            f"{r['task']:<14}{r['workers']!s:>8}{r['mb']:>8.2f}{r['s']:>9.2f}"
            f"{r['mb_per_s']:>8.2f}{r['tokens_per_s'] / 1e6:>11.3f}"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "machine": machine,
                    "corpus_mb": corpus_bytes / 1e6,
                    "tokens": n_tokens,
                    "vocab_size": tok.vocab_size,
                    "rows": rows,
                }
            )
        )


if __name__ == "__main__":
    main()
