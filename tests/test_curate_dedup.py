"""Dedup as map/reduce stages finds what the in-memory reference (minhash.py) finds."""

import functools
import operator
import random

import numpy as np
import pytest
from curate_samples import write_jsonl
from test_curate_pipeline import c4_docs, output, rejected

from scratchlm.curate import dedup, shuffle
from scratchlm.curate.config import CurateConfig
from scratchlm.curate.minhash import (
    MinHasher,
    candidate_pairs,
    connected_components,
    resolve_duplicates,
    shingle_hashes,
    shingle_keys,
)
from scratchlm.curate.pipeline import exact_key, run_curate


def edit(text: str, rate: float, rng: random.Random) -> str:
    return " ".join(w if rng.random() > rate else f"x{w}" for w in text.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three files: originals, exact and near copies, chains, one big cluster (buckets larger
    than the LSH window) and documents without words."""
    rng = random.Random(0)
    base = c4_docs(40)
    docs = list(base)
    docs += [base[i].upper().replace(" ", "  ") for i in range(0, 40, 5)]  # exact copies
    docs += [edit(base[i], 0.03, rng) for i in range(1, 40, 3)]  # near copies
    chain = base[2]
    for _ in range(4):  # each link close to the previous one, the ends further apart
        chain = edit(chain, 0.04, rng)
        docs.append(chain)
    docs += [edit(base[3], 0.01, rng) for _ in range(30)]
    docs += ["!!! ...", "?"]
    rng.shuffle(docs)
    root = tmp_path_factory.mktemp("dedup")
    thirds = [docs[i::3] for i in range(3)]
    for i, part in enumerate(thirds):
        write_jsonl(
            root / f"part{i}.jsonl", [{"id": f"f{i}-{j}", "text": t} for j, t in enumerate(part)]
        )
    ordered = [(f"f{i}-{j}", t) for i, part in enumerate(thirds) for j, t in enumerate(part)]
    return root, ordered


def reference(ordered, cfg):
    """The dedup of the run as one process computes it in memory."""
    texts = [t for _, t in ordered]
    n = len(texts)
    keys = [exact_key(t) for t in texts]
    first = {}
    kept_as = np.array([first.setdefault(k, i) for i, k in enumerate(keys)])
    removed = kept_as != np.arange(n)
    hasher = MinHasher(cfg.minhash_bands * cfg.minhash_rows, cfg.minhash_seed, cfg.minhash_ngram)
    shingles = [shingle_hashes(t, cfg.minhash_ngram) for t in texts]
    sigs = np.stack([hasher.signature_of_hashes(s) for s in shingles])
    skeys = [shingle_keys(s) for s in shingles]
    active = np.array([k.size > 0 for k in skeys]) & ~removed
    th = cfg.near_dedup_threshold
    edges = candidate_pairs(sigs, cfg.minhash_bands, cfg.minhash_rows, th, active)
    rep, score = resolve_duplicates(sigs, edges, th, lambda i: skeys[i])
    result = {}
    for i in np.flatnonzero(removed):
        result[ordered[i][0]] = ("exact duplicate", ordered[kept_as[i]][0], 1.0)
    for i in np.flatnonzero(rep != np.arange(n)):
        result[ordered[i][0]] = ("near duplicate", ordered[rep[i]][0], round(float(score[i]), 6))
    return result


def found(out):
    return {
        d["id"]: (d["reason"], d["duplicate_of"], d["score"])
        for step in ("exact_dedup", "near_dedup")
        for d in rejected(out, step)
    }


@pytest.mark.parametrize("threshold", [0.8, 0.0])
def test_stages_match_the_in_memory_reference_at_any_task_size(corpus, tmp_path, threshold):
    root, ordered = corpus
    results = []
    for per_task in (1_000_000, 9):
        cfg = CurateConfig(workers=1, dedup_docs_per_task=per_task, near_dedup_threshold=threshold)
        out = tmp_path / f"out{per_task}"
        stats = run_curate([str(root)], out, cfg, only=["dedup"], progress=False)
        results.append((found(out), output(out), stats["steps"]))
    expected = reference(ordered, CurateConfig(near_dedup_threshold=threshold))
    assert results[0][0] == expected
    assert len([r for r in expected.values() if r[0] == "near duplicate"]) > 25
    assert results[1][0] == expected and results[1][1] == results[0][1]
    strip = [[{**s, "seconds": 0} for s in r[2]] for r in results]
    assert strip[0] == strip[1]


def test_connected_components_by_star_rounds(tmp_path):
    rng = np.random.default_rng(0)
    n, n_edges, parts = 300, 260, 4
    edges = np.unique(np.sort(rng.integers(0, n, (n_edges, 2)), axis=1), axis=0)
    edges = edges[edges[:, 0] != edges[:, 1]]
    docs = np.arange(n, dtype=np.uint64) + (np.uint64(3) << np.uint64(dedup.DOC_BITS))
    cfg = CurateConfig()
    plan = dedup.make_plan(str(tmp_path), ["near_dedup"], [0, 0, 0, n], cfg, n // parts)
    assert plan.partitions == parts

    def run(stage, folder, source):
        metas = []
        for p in range(parts):
            out = str(tmp_path / "dedup" / folder / f"{p:05d}")
            dedup.STAGES[stage](plan, p, out, source)
            metas.append(shuffle.read_meta(out))
        return metas

    pairs = dedup._pairs(docs[edges[:, 0]], docs[edges[:, 1]])
    for p, chunk in enumerate(np.array_split(pairs, parts)):
        dedup._write_for_large_star(
            plan, chunk, str(tmp_path / "dedup" / "cc-000-large" / f"{p:05d}")
        )
    previous = None
    for r in range(50):
        run("large_star", f"cc-{r:03d}-small", f"cc-{r:03d}-large")
        metas = run("small_star", f"cc-{r + 1:03d}-large", f"cc-{r:03d}-small")
        state = (
            sum(m["edges"] for m in metas),
            functools.reduce(operator.xor, [m["digest"] for m in metas]),
        )
        if state == previous:
            break
        previous = state
    final = np.concatenate(
        [
            shuffle.read_partition(str(tmp_path / "dedup" / f"cc-{r:03d}-small" / f"{p:05d}"), q)
            for p in range(parts)
            for q in range(parts)
        ]
    )
    rep = np.arange(n)
    rep[(final["a"] - docs[0]).astype(int)] = (final["b"] - docs[0]).astype(int)
    assert np.array_equal(rep, connected_components(n, edges))
    assert r >= 1


def test_nothing_left_for_dedup(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "too short"}, {"text": "also short"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "short"}])
    stats = run_curate([str(tmp_path)], tmp_path / "out", CurateConfig(workers=1), progress=False)
    steps = {s["step"]: s for s in stats["steps"]}
    assert steps["gopher_quality"]["docs_removed"] == 3 and stats["output"]["docs"] == 0
    assert "near_dedup" not in steps and output(tmp_path / "out") == {}  # no document reached it
