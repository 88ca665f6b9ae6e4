"""Near-dedup quality and speed: scratchlm's numpy MinHash-LSH against datasketch, same settings.

Builds a set of real documents plus one edited copy of half of them (words replaced, inserted or
deleted at a random rate of 0-6%), measures the true word 5-gram Jaccard of every copy with its
original, and scores the pairs each implementation reports as duplicates:
precision = share of reported pairs whose true Jaccard is >= 0.8;
recall = share of copies with true Jaccard >= 0.8 that were reported.

Rows: scratchlm with LSH alone and with exact verification of the candidates (the default,
`curate.near_dedup_threshold = 0.8`), datasketch's MinHash + MinHashLSH (no verification of its
own) and datasketch followed by the same exact verification on its Python shingle sets. Each is
timed --repeat times, interleaved, and the fastest run counts (the machine is shared).

    python bench/dedup.py [--docs 1500] [--threshold 0.8] [--repeat 3] [--quick] [--json]

--quick checks the script in seconds: 100 documents, one timed run of each.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratchlm.curate.minhash import (  # noqa: E402
    MinHasher,
    candidate_pairs,
    shingle_hashes,
    shingle_keys,
    simple_words,
    verify_pairs,
)

SHARED = ROOT.parent / "shared" / "data"
THRESHOLD = 0.8


def real_documents(limit: int) -> list[str]:
    """Web documents of at least 100 words (shared data when present, else the bundled sample)."""
    web = SHARED / "web" if (SHARED / "web").is_dir() else ROOT / "data" / "web"
    docs = []
    for name in ("dolma_cc_CC-MAIN-2019-30_text.jsonl.gz", "c4_demo.jsonl.gz"):
        with gzip.open(web / name, "rt") as f:
            docs += [json.loads(line)["text"] for line in f]
    books = SHARED / "books" / "war_and_peace.txt.gz"
    if books.is_file():  # cut a long book into 300-word documents to reach the wanted size
        words = gzip.open(books, "rt").read().split()
        docs += [" ".join(words[i : i + 300]) for i in range(0, len(words), 300)]
    docs = [d for d in dict.fromkeys(docs) if len(d.split()) >= 100]
    return docs[:limit]


def edit(text: str, rate: float, rng: random.Random) -> str:
    out = []
    for w in text.split(" "):
        r = rng.random()
        if r < rate / 3:
            continue  # delete
        if r < 2 * rate / 3:
            out.append("edited")  # replace
        elif r < rate:
            out += [w, "inserted"]
        else:
            out.append(w)
    return " ".join(out)


def true_jaccard(a: str, b: str) -> float:
    sa, sb = set(shingle_hashes(a, 5).tolist()), set(shingle_hashes(b, 5).tolist())
    return len(sa & sb) / max(1, len(sa | sb))


def run_ours(docs, bands, rows, threshold):
    """Signatures, LSH candidates and, with threshold > 0, exact verification on the shingle keys
    computed with the signatures (the pipeline writes them beside the signatures in pass 1)."""
    t0 = time.perf_counter()
    hasher = MinHasher(bands * rows, seed=1, ngram=5)
    sigs = np.empty((len(docs), bands * rows), np.uint32)
    keys = []
    for i, d in enumerate(docs):
        shingles = shingle_hashes(d, 5)
        sigs[i] = hasher.signature_of_hashes(shingles)
        keys.append(shingle_keys(shingles))
    edges = candidate_pairs(sigs, bands, rows, threshold)
    if threshold > 0:
        edges, _ = verify_pairs(edges, threshold, keys.__getitem__)
    return {tuple(map(int, e)) for e in edges}, time.perf_counter() - t0


def run_datasketch(docs, bands, rows, threshold):
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
    pairs = set()
    sets = []
    for i, d in enumerate(docs):
        w = simple_words(d)
        shingles = {" ".join(w[j : j + 5]).encode() for j in range(max(1, len(w) - 4))}
        m = MinHash(num_perm=bands * rows, seed=1)
        m.update_batch(list(shingles))
        pairs.update((int(j), i) for j in lsh.query(m))
        lsh.insert(i, m)
        sets.append(shingles)
    if threshold > 0:
        pairs = {
            (i, j) for i, j in pairs if len(sets[i] & sets[j]) >= threshold * len(sets[i] | sets[j])
        }
    return pairs, time.perf_counter() - t0


def score(pairs, truth, jaccard_cache, docs):
    positives = {p for p, j in truth.items() if j >= THRESHOLD}
    found_true = 0
    for p in pairs:
        if p not in jaccard_cache:
            jaccard_cache[p] = truth.get(p, true_jaccard(docs[p[0]], docs[p[1]]))
        found_true += jaccard_cache[p] >= THRESHOLD
    precision = found_true / max(1, len(pairs))
    recall = len(positives & pairs) / max(1, len(positives))
    return precision, recall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1500, help="original documents")
    ap.add_argument("--bands", type=int, default=14)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.8, help="exact Jaccard verification")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best counts")
    ap.add_argument("--quick", action="store_true", help="100 documents, one run of each")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        ap.set_defaults(docs=100, repeat=1)
        args = ap.parse_args()
    rng = random.Random(0)
    originals = real_documents(args.docs)
    docs = list(originals)
    truth = {}
    for i in range(0, len(originals), 2):
        docs.append(edit(originals[i], rng.uniform(0.0, 0.06), rng))
        truth[(i, len(docs) - 1)] = true_jaccard(originals[i], docs[-1])
    runs = {
        "scratchlm LSH only": (run_ours, 0.0),
        "scratchlm LSH + verification": (run_ours, args.threshold),
        "datasketch LSH": (run_datasketch, 0.0),
        "datasketch LSH + verification": (run_datasketch, args.threshold),
    }
    pairs: dict[str, set] = {}
    seconds: dict[str, float] = {name: float("inf") for name in runs}
    for _ in range(args.repeat):
        for name, (fn, threshold) in runs.items():
            pairs[name], t = fn(docs, args.bands, args.rows, threshold)
            seconds[name] = min(seconds[name], t)
    cache: dict = {}
    scores = {name: score(pairs[name], truth, cache, docs) for name in runs}
    n_pos = sum(j >= THRESHOLD for j in truth.values())
    print(
        f"{len(docs)} documents, {len(truth)} edited copies ({n_pos} with Jaccard >= {THRESHOLD})"
    )
    print(f"{'':30} {'precision':>10} {'recall':>8} {'pairs':>7} {'docs/s':>9}")
    for name in runs:
        p, r = scores[name]
        print(
            f"{name:30} {p:10.3f} {r:8.3f} {len(pairs[name]):7d} {len(docs) / seconds[name]:9.0f}"
        )
    ours, theirs = "scratchlm LSH + verification", "datasketch LSH"
    result = {
        "docs": len(docs),
        "bands": args.bands,
        "rows": args.rows,
        "threshold": args.threshold,
        "positives": n_pos,
        "precision": round(scores[ours][0], 4),
        "recall": round(scores[ours][1], 4),
        "docs_per_s": round(len(docs) / seconds[ours], 1),
        "speedup_vs_datasketch": round(seconds[theirs] / seconds[ours], 2),
        "lsh_only_precision": round(scores["scratchlm LSH only"][0], 4),
        "lsh_only_recall": round(scores["scratchlm LSH only"][1], 4),
        "lsh_only_docs_per_s": round(len(docs) / seconds["scratchlm LSH only"], 1),
        "datasketch_precision": round(scores[theirs][0], 4),
        "datasketch_recall": round(scores[theirs][1], 4),
        "datasketch_docs_per_s": round(len(docs) / seconds[theirs], 1),
        "speedup_vs_datasketch_verified": round(
            seconds["datasketch LSH + verification"] / seconds[ours], 2
        ),
    }
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
