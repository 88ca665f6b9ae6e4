"""Near-dedup quality and speed: scratchlm's numpy MinHash-LSH against datasketch, same settings.

Builds a set of real documents plus one edited copy of half of them (words replaced, inserted or
deleted at a random rate of 0-6%), measures the true word 5-gram Jaccard of every copy with its
original, and scores the candidate pairs each implementation finds:
precision = share of found pairs whose true Jaccard is >= 0.8;
recall = share of copies with true Jaccard >= 0.8 that were found.

    python bench/dedup.py [--docs 1500] [--verify 0.0] [--json]
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
    estimated_jaccard,
    lsh_edges,
    shingle_hashes,
    simple_words,
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


def run_ours(docs, bands, rows, verify):
    t0 = time.perf_counter()
    hasher = MinHasher(bands * rows, seed=1, ngram=5)
    sigs = np.stack([hasher.signature(d) for d in docs])
    edges = lsh_edges(sigs, bands, rows)
    if verify > 0:
        edges = edges[estimated_jaccard(sigs, edges) >= verify]
    return {tuple(map(int, e)) for e in edges}, time.perf_counter() - t0


def run_datasketch(docs, bands, rows):
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
    pairs = set()
    for i, d in enumerate(docs):
        w = simple_words(d)
        shingles = {" ".join(w[j : j + 5]).encode() for j in range(max(1, len(w) - 4))}
        m = MinHash(num_perm=bands * rows, seed=1)
        m.update_batch(list(shingles))
        pairs.update((int(j), i) for j in lsh.query(m))
        lsh.insert(i, m)
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
    ap.add_argument("--verify", type=float, default=0.0, help="also require estimated Jaccard")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(0)
    originals = real_documents(args.docs)
    docs = list(originals)
    truth = {}
    for i in range(0, len(originals), 2):
        docs.append(edit(originals[i], rng.uniform(0.0, 0.06), rng))
        truth[(i, len(docs) - 1)] = true_jaccard(originals[i], docs[-1])
    cache: dict = {}
    ours, t_ours = run_ours(docs, args.bands, args.rows, args.verify)
    theirs, t_theirs = run_datasketch(docs, args.bands, args.rows)
    p_ours, r_ours = score(ours, truth, cache, docs)
    p_theirs, r_theirs = score(theirs, truth, cache, docs)
    n_pos = sum(j >= THRESHOLD for j in truth.values())
    print(
        f"{len(docs)} documents, {len(truth)} edited copies ({n_pos} with Jaccard >= {THRESHOLD})"
    )
    print(f"{'':12} {'precision':>10} {'recall':>8} {'pairs':>7} {'docs/s':>9}")
    for name, p, r, pairs, t in (
        ("scratchlm", p_ours, r_ours, ours, t_ours),
        ("datasketch", p_theirs, r_theirs, theirs, t_theirs),
    ):
        print(f"{name:12} {p:10.3f} {r:8.3f} {len(pairs):7d} {len(docs) / t:9.0f}")
    result = {
        "docs": len(docs),
        "bands": args.bands,
        "rows": args.rows,
        "verify": args.verify,
        "positives": n_pos,
        "precision": round(p_ours, 4),
        "recall": round(r_ours, 4),
        "docs_per_s": round(len(docs) / t_ours, 1),
        "datasketch_precision": round(p_theirs, 4),
        "datasketch_recall": round(r_theirs, 4),
        "datasketch_docs_per_s": round(len(docs) / t_theirs, 1),
        "speedup_vs_datasketch": round(t_theirs / t_ours, 2),
    }
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
