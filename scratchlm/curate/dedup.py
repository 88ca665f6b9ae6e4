"""Global exact and near dedup as map/reduce stages, so that no task holds the whole corpus.

Pass 1 of the pipeline leaves, per shard, side files under WORK/p1/: each kept document's 16-byte
exact key (.exact), its MinHash signature (.sig), its sorted shingle keys (.keys), its id (.ids),
and an index of where each document's keys and id end (.index). A document is named by one
uint64, shard << 40 | position, so sorting by it is the order of the run.

The stages (each a list of tasks an executor runs; files under WORK/dedup/, see shuffle.py):
- exact_map (per group of shards) -> exact_reduce (per hash partition of the keys): the first
  document of each key is kept, the others are exact duplicates of it;
- band_map (per group; documents not already removed, with shingles) -> band_reduce (per hash
  partition of the band buckets): in each bucket, each member is paired with up to LSH_WINDOW
  earlier members, exactly as minhash.lsh_edges does in memory;
- verify (per hash partition of the candidate pairs): the signature estimate, then the exact
  Jaccard of the two documents' shingle keys, as minhash.resolve_duplicates does;
- connected components by alternating large-star and small-star rounds (Kiveris et al. 2014,
  "Connected Components in MapReduce and Beyond") over edges partitioned by node, until a round
  leaves the edge set unchanged: then every component is a star around its lowest document;
- cc_final (per partition): each near duplicate, the document it is kept in favour of, and the
  score (exact Jaccard, or the signature estimate when there is no verification);
- plan (per group): the removals of each shard, which pass 3 reads.

Memory per task is set by `dedup_docs_per_task` (groups and partitions hold about that many
documents), not by the size of the corpus. The result does not depend on it either.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from scratchlm.curate import shuffle, storage
from scratchlm.curate.minhash import ESTIMATE_MARGIN, LSH_WINDOW, exact_jaccard, splitmix64

DOC_BITS = 40
EXACT_KEY_BYTES = 16
INDEX_DTYPE = np.dtype([("keys_end", "<i8"), ("ids_end", "<i8")])
EXACT_DTYPE = np.dtype([("key", f"V{EXACT_KEY_BYTES}"), ("doc", "<u8")])
PAIR_DTYPE = np.dtype([("a", "<u8"), ("b", "<u8")])
REMOVAL_DTYPE = np.dtype([("doc", "<u8"), ("kind", "u1"), ("kept", "<u8"), ("score", "<f4")])
EXACT, NEAR = 0, 1
MAX_ROUNDS = 200


@dataclass
class DedupPlan:
    work: str
    steps: list[str]
    counts: list[int]
    """Documents per shard after pass 1."""
    groups: list[tuple[int, int]]
    """Map groups: shards [first, end)."""
    partitions: int
    bands: int
    rows: int
    threshold: float

    @property
    def n_perm(self) -> int:
        return self.bands * self.rows


def make_plan(work: str, steps: list[str], counts: list[int], cfg, docs_per_task: int) -> DedupPlan:
    groups: list[tuple[int, int]] = []
    first, acc = 0, 0
    for i, n in enumerate(counts):
        if acc and acc + n > docs_per_task:
            groups.append((first, i))
            first, acc = i, 0
        acc += n
    groups.append((first, len(counts)))
    return DedupPlan(
        work=work,
        steps=list(steps),
        counts=list(counts),
        groups=groups,
        partitions=max(1, -(-sum(counts) // docs_per_task)),
        bands=cfg.minhash_bands,
        rows=cfg.minhash_rows,
        threshold=cfg.near_dedup_threshold,
    )


def save_plan(plan: DedupPlan) -> str:
    """Write WORK/dedup/plan.json; returns its digest, which tasks use to load it (once each)."""
    data = json.dumps(asdict(plan)).encode()
    storage.write_bytes(storage.join(plan.work, "dedup", "plan.json"), data)
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=4)
def load_plan(work: str, digest: str) -> DedupPlan:
    data = json.loads(storage.read_bytes(storage.join(work, "dedup", "plan.json")))
    data["groups"] = [tuple(g) for g in data["groups"]]
    return DedupPlan(**data)


# -- naming documents and reading pass 1's side files ---------------------------------------------


def doc_ids(shard: int, n: int) -> np.ndarray:
    return (np.uint64(shard) << np.uint64(DOC_BITS)) | np.arange(n, dtype=np.uint64)


def shard_of(docs: np.ndarray) -> np.ndarray:
    return (docs >> np.uint64(DOC_BITS)).astype(np.int64)


def position_of(docs: np.ndarray) -> np.ndarray:
    return (docs & np.uint64((1 << DOC_BITS) - 1)).astype(np.int64)


def side_path(work: str, shard: int, ext: str) -> str:
    return storage.join(work, "p1", f"part-{shard:05d}.{ext}")


def _by_shard(docs: np.ndarray):
    shards, positions = shard_of(docs), position_of(docs)
    for s in np.unique(shards):
        sel = np.flatnonzero(shards == s)
        yield int(s), sel, positions[sel]


def read_signatures(work: str, docs: np.ndarray, n_perm: int) -> np.ndarray:
    out = np.zeros((len(docs), n_perm), np.uint32)
    row = 4 * n_perm
    for s, sel, pos in _by_shard(docs):
        chunks = storage.read_ranges(
            side_path(work, s, "sig"), list(pos * row), list(pos * row + row)
        )
        out[sel] = np.frombuffer(b"".join(chunks), np.uint32).reshape(-1, n_perm)
    return out


def _index_rows(work: str, s: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) rows of the index for documents `pos` of shard s (start is 0 for the first)."""
    size = INDEX_DTYPE.itemsize
    starts = np.maximum(pos - 1, 0) * size
    chunks = storage.read_ranges(side_path(work, s, "index"), list(starts), list((pos + 1) * size))
    lo = np.zeros(len(pos), INDEX_DTYPE)
    hi = np.zeros(len(pos), INDEX_DTYPE)
    for i, (p, chunk) in enumerate(zip(pos, chunks, strict=True)):
        rows = np.frombuffer(chunk, INDEX_DTYPE)
        hi[i] = rows[-1]
        if p > 0:
            lo[i] = rows[0]
    return lo, hi


def read_shingle_keys(work: str, docs: np.ndarray) -> list[np.ndarray]:
    out: list = [None] * len(docs)
    for s, sel, pos in _by_shard(docs):
        lo, hi = _index_rows(work, s, pos)
        chunks = storage.read_ranges(
            side_path(work, s, "keys"), list(lo["keys_end"] * 4), list(hi["keys_end"] * 4)
        )
        for i, chunk in zip(sel, chunks, strict=True):
            out[i] = np.frombuffer(chunk, np.uint32)
    return out


def read_ids(work: str, docs: np.ndarray) -> list[str]:
    out: list = [None] * len(docs)
    for s, sel, pos in _by_shard(docs):
        lo, hi = _index_rows(work, s, pos)
        chunks = storage.read_ranges(
            side_path(work, s, "ids"), list(lo["ids_end"]), list(hi["ids_end"])
        )
        for i, chunk in zip(sel, chunks, strict=True):
            out[i] = json.loads(chunk)
    return out


# -- partitioning ----------------------------------------------------------------------------------


def _partition(values: np.ndarray, n: int) -> np.ndarray:
    return (splitmix64(values.astype(np.uint64)) % np.uint64(n)).astype(np.int64)


def _group_of_docs(plan: DedupPlan, docs: np.ndarray) -> np.ndarray:
    bounds = np.array([end for _, end in plan.groups])
    return np.searchsorted(bounds, shard_of(docs), side="right")


def _stage_path(plan: DedupPlan, stage: str, i: int) -> str:
    return storage.join(plan.work, "dedup", stage, f"{i:05d}")


def _inputs(plan: DedupPlan, stage: str, n: int) -> list[str]:
    return [_stage_path(plan, stage, i) for i in range(n)]


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty(len(a), PAIR_DTYPE)
    out["a"], out["b"] = a, b
    return out


def _unique_pairs(pairs: np.ndarray | None) -> np.ndarray:
    if pairs is None or not len(pairs):
        return np.zeros(0, PAIR_DTYPE)
    return np.unique(pairs)  # sorted by (a, b)


# -- stages: fn(plan, index, output path, input folder); outputs in WORK/dedup/<folder>/ ---


def _exact_map(plan: DedupPlan, g: int, out: str, source: str) -> None:
    first, end = plan.groups[g]
    parts, heads = [], []
    for s in range(first, end):
        raw = storage.read_bytes(side_path(plan.work, s, "exact"))
        rec = np.empty(len(raw) // EXACT_KEY_BYTES, EXACT_DTYPE)
        rec["key"], rec["doc"] = np.frombuffer(raw, f"V{EXACT_KEY_BYTES}"), doc_ids(s, len(rec))
        parts.append(rec)
        # The keys are hashes already: their first 8 bytes pick the partition.
        heads.append(np.frombuffer(raw, "<u8").reshape(-1, EXACT_KEY_BYTES // 8)[:, 0])
    records = np.concatenate(parts)
    head = np.concatenate(heads)
    shuffle.write_partitioned(out, records, _partition(head, plan.partitions), plan.partitions)


def _exact_reduce(plan: DedupPlan, p: int, out: str, source: str) -> None:
    records = shuffle.read_partition_of_all(_inputs(plan, source, len(plan.groups)), p)
    records = records[np.argsort(records["doc"], kind="stable")]
    _, first, group = np.unique(records["key"], return_index=True, return_inverse=True)
    kept = records["doc"][first[group.reshape(-1)]]
    dup = kept != records["doc"]
    removal = np.zeros(int(dup.sum()), REMOVAL_DTYPE)
    removal["doc"], removal["kept"], removal["kind"], removal["score"] = (
        records["doc"][dup],
        kept[dup],
        EXACT,
        1.0,
    )
    shuffle.write_partitioned(out, removal, _group_of_docs(plan, removal["doc"]), len(plan.groups))


def _band_map(plan: DedupPlan, g: int, out: str, source: str) -> None:
    first, end = plan.groups[g]
    removed = np.zeros(0, np.uint64)
    if "exact_dedup" in plan.steps:
        found = shuffle.read_partition_of_all(_inputs(plan, "exact", plan.partitions), g)
        removed = found["doc"]
    width = 4 * plan.rows
    band_dtype = np.dtype([("band", "<u2"), ("key", f"V{width}"), ("doc", "<u8")])
    parts, where = [], []
    for s in range(first, end):
        n = plan.counts[s]
        if n == 0:
            continue
        sig = np.frombuffer(storage.read_bytes(side_path(plan.work, s, "sig")), np.uint32)
        sig = sig.reshape(n, plan.n_perm)
        index = np.frombuffer(storage.read_bytes(side_path(plan.work, s, "index")), INDEX_DTYPE)
        docs = doc_ids(s, n)
        active = (np.diff(index["keys_end"], prepend=0) > 0) & ~np.isin(docs, removed)
        sig, docs = sig[active], docs[active]
        for b in range(plan.bands):
            block = np.ascontiguousarray(sig[:, b * plan.rows : (b + 1) * plan.rows])
            rec = np.empty(len(docs), band_dtype)
            rec["band"], rec["key"], rec["doc"] = b, block.view(f"V{width}").reshape(-1), docs
            parts.append(rec)
            mix = block[:, 0].astype(np.uint64) << np.uint64(32) | block[:, 1 % plan.rows]
            where.append(_partition(mix * np.uint64(plan.bands) + np.uint64(b), plan.partitions))
    records = np.concatenate(parts) if parts else np.zeros(0, band_dtype)
    partition = np.concatenate(where) if where else np.zeros(0, np.int64)
    shuffle.write_partitioned(out, records, partition, plan.partitions)


def _band_reduce(plan: DedupPlan, p: int, out: str, source: str) -> None:
    records = shuffle.read_partition_of_all(_inputs(plan, source, len(plan.groups)), p)
    edges = []
    if len(records) > 1:
        keyed = np.empty(len(records), [("band", "<u2"), ("key", records.dtype["key"])])
        keyed["band"], keyed["key"] = records["band"], records["key"]
        _, bucket = np.unique(keyed, return_inverse=True)
        order = np.lexsort((records["doc"], bucket.reshape(-1)))
        docs, bucket = records["doc"][order], bucket.reshape(-1)[order]
        for lag in range(1, min(LSH_WINDOW, len(docs) - 1) + 1):
            same = np.flatnonzero(bucket[lag:] == bucket[:-lag])
            if same.size == 0:
                break  # no bucket has more than `lag` members
            edges.append(_pairs(docs[same], docs[same + lag]))
    pairs = _unique_pairs(np.concatenate(edges) if edges else None)
    mix = pairs["a"] * np.uint64(0x9E3779B97F4A7C15) + pairs["b"]
    shuffle.write_partitioned(out, pairs, _partition(mix, plan.partitions), plan.partitions)


VERIFY_BATCH = 4096


def _verify(plan: DedupPlan, p: int, out: str, source: str) -> None:
    pairs = _unique_pairs(shuffle.read_partition_of_all(_inputs(plan, source, plan.partitions), p))
    if plan.threshold > 0 and len(pairs):
        kept = []
        for i in range(0, len(pairs), VERIFY_BATCH):
            kept.append(_verified(plan, pairs[i : i + VERIFY_BATCH]))
        pairs = np.concatenate(kept)
    _write_for_large_star(plan, pairs, out)


def _verified(plan: DedupPlan, pairs: np.ndarray) -> np.ndarray:
    docs, inverse = np.unique(np.concatenate([pairs["a"], pairs["b"]]), return_inverse=True)
    a, b = inverse[: len(pairs)], inverse[len(pairs) :]
    sigs = read_signatures(plan.work, docs, plan.n_perm)
    likely = (sigs[a] == sigs[b]).mean(axis=1) >= plan.threshold - ESTIMATE_MARGIN
    pairs, a, b = pairs[likely], a[likely], b[likely]
    needed, slot = np.unique(np.concatenate([a, b]), return_inverse=True)
    keys = read_shingle_keys(plan.work, docs[needed])
    sa, sb = slot[: len(a)], slot[len(a) :]
    jaccard = np.array([exact_jaccard(keys[i], keys[j]) for i, j in zip(sa, sb, strict=True)])
    return pairs[jaccard >= plan.threshold] if len(pairs) else pairs


def _write_for_large_star(
    plan: DedupPlan, pairs: np.ndarray, out: str, meta: dict | None = None
) -> None:
    """Edges in both directions, each at the partition of its first node."""
    both = np.concatenate([pairs, _pairs(pairs["b"], pairs["a"])])
    shuffle.write_partitioned(
        out, both, _partition(both["a"], plan.partitions), plan.partitions, meta
    )


def _fingerprint(pairs: np.ndarray) -> tuple[int, int]:
    """(count, order-free hash) of a set of unique pairs, to see when a round changed nothing."""
    mix = splitmix64(pairs["a"] * np.uint64(0xD6E8FEB86659FD93) + pairs["b"])
    return len(pairs), int(np.bitwise_xor.reduce(mix)) if len(mix) else 0


def _large_star(plan: DedupPlan, p: int, out: str, source: str) -> None:
    """At each node a: its larger neighbours are joined to the smallest of a and its neighbours."""
    edges = _unique_pairs(shuffle.read_partition_of_all(_inputs(plan, source, plan.partitions), p))
    starts = np.flatnonzero(np.r_[True, edges["a"][1:] != edges["a"][:-1]]) if len(edges) else []
    low = (
        np.minimum(np.minimum.reduceat(edges["b"], starts), edges["a"][starts])
        if len(edges)
        else []
    )
    m = np.repeat(low, np.diff(np.r_[starts, len(edges)])) if len(edges) else np.zeros(0, np.uint64)
    bigger = edges["b"] > edges["a"]
    result = _pairs(edges["b"][bigger], m[bigger])  # stored at the larger node, for small-star
    shuffle.write_partitioned(
        out, result, _partition(result["a"], plan.partitions), plan.partitions
    )


def _small_star(plan: DedupPlan, p: int, out: str, source: str) -> dict:
    """At each node u: u and its smaller neighbours are joined to the smallest of them."""
    edges = _unique_pairs(shuffle.read_partition_of_all(_inputs(plan, source, plan.partitions), p))
    count, digest = _fingerprint(edges)
    if len(edges):
        starts = np.flatnonzero(np.r_[True, edges["a"][1:] != edges["a"][:-1]])
        low = np.minimum.reduceat(edges["b"], starts)
        m = np.repeat(low, np.diff(np.r_[starts, len(edges)]))
        others = edges["b"] != m
        result = np.concatenate(
            [_pairs(edges["b"][others], m[others]), _pairs(edges["a"][starts], low)]
        )
    else:
        result = edges
    meta = {"edges": count, "digest": digest}
    _write_for_large_star(plan, result, out, meta)
    return meta


def _cc_final(plan: DedupPlan, p: int, out: str, source: str) -> None:
    """At the fixed point each edge joins a document to the lowest of its component."""
    edges = _unique_pairs(shuffle.read_partition_of_all(_inputs(plan, source, plan.partitions), p))
    if len(edges):
        starts = np.flatnonzero(np.r_[True, edges["a"][1:] != edges["a"][:-1]])
        docs, kept = edges["a"][starts], np.minimum.reduceat(edges["b"], starts)
    else:
        docs = kept = np.zeros(0, np.uint64)
    removal = np.zeros(len(docs), REMOVAL_DTYPE)
    removal["doc"], removal["kept"], removal["kind"] = docs, kept, NEAR
    for i in range(0, len(docs), VERIFY_BATCH):
        batch = slice(i, i + VERIFY_BATCH)
        removal["score"][batch] = _scores(plan, docs[batch], kept[batch])
    shuffle.write_partitioned(out, removal, _group_of_docs(plan, docs), len(plan.groups))


def _scores(plan: DedupPlan, docs: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The exact Jaccard with the kept document (the signature estimate without verification)."""
    if not len(docs):
        return np.zeros(0, np.float32)
    both = np.concatenate([docs, kept])
    if plan.threshold > 0:
        keys = read_shingle_keys(plan.work, both)
        n = len(docs)
        return np.array([exact_jaccard(keys[i], keys[n + i]) for i in range(n)], np.float32)
    sigs = read_signatures(plan.work, both, plan.n_perm)
    return (sigs[: len(docs)] == sigs[len(docs) :]).mean(axis=1).astype(np.float32)


def _plan(plan: DedupPlan, g: int, out: str, source: str) -> None:
    parts = []
    if "exact_dedup" in plan.steps:
        parts.append(shuffle.read_partition_of_all(_inputs(plan, "exact", plan.partitions), g))
    if "near_dedup" in plan.steps:
        parts.append(shuffle.read_partition_of_all(_inputs(plan, "near", plan.partitions), g))
    removal = np.concatenate(parts)
    removal = removal[np.argsort(removal["doc"], kind="stable")]
    first, end = plan.groups[g]
    shuffle.write_partitioned(out, removal, shard_of(removal["doc"]) - first, end - first)


STAGES = {
    "exact_map": _exact_map,
    "exact_reduce": _exact_reduce,
    "band_map": _band_map,
    "band_reduce": _band_reduce,
    "verify": _verify,
    "large_star": _large_star,
    "small_star": _small_star,
    "cc_final": _cc_final,
    "plan": _plan,
}


def run_task(job: tuple[str, str, str, str, int, str]) -> dict:
    """One task: (work folder, plan digest, stage, output folder, index, input folder)."""
    work, digest, stage, folder, index, source = job
    t0 = time.perf_counter()
    plan = load_plan(work, digest)
    meta = STAGES[stage](plan, index, storage.join(work, "dedup", folder, f"{index:05d}"), source)
    return {"seconds": time.perf_counter() - t0, "meta": meta or {}}


def run_dedup(executor, progress, plan: DedupPlan) -> tuple[str, dict[str, float]]:
    """Run every stage; returns the plan's digest and the task seconds of each dedup step. Tasks
    whose output exists (from an interrupted run of the same plan) are not run again."""
    digest = save_plan(plan)
    seconds = {"exact_dedup": 0.0, "near_dedup": 0.0}
    groups, parts = len(plan.groups), plan.partitions

    def stage(name: str, folder: str, n: int, source: str, step: str) -> list[dict]:
        outputs = [storage.join(plan.work, "dedup", folder, f"{i:05d}") for i in range(n)]
        todo = [i for i in range(n) if not storage.exists(outputs[i])]
        jobs = [(plan.work, digest, name, folder, i, source) for i in todo]
        for result in executor.map(run_task, jobs, progress, f"dedup {name}"):
            seconds[step] += result["seconds"]
        return [shuffle.read_meta(path) for path in outputs]

    if "exact_dedup" in plan.steps:
        stage("exact_map", "exact_map", groups, "", "exact_dedup")
        stage("exact_reduce", "exact", parts, "exact_map", "exact_dedup")
    if "near_dedup" in plan.steps:
        stage("band_map", "band_map", groups, "", "near_dedup")
        stage("band_reduce", "band_reduce", parts, "band_map", "near_dedup")
        stage("verify", "cc-000-large", parts, "band_reduce", "near_dedup")
        previous = None
        for r in range(MAX_ROUNDS):
            small = f"cc-{r:03d}-small"
            stage("large_star", small, parts, f"cc-{r:03d}-large", "near_dedup")
            metas = stage("small_star", f"cc-{r + 1:03d}-large", parts, small, "near_dedup")
            edges = sum(m["edges"] for m in metas)
            digest = 0
            for m in metas:
                digest ^= m["digest"]
            if (edges, digest) == previous:
                break
            previous = (edges, digest)
        else:
            raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
        stage("cc_final", "near", parts, small, "near_dedup")
    last = "near_dedup" if "near_dedup" in plan.steps else "exact_dedup"
    stage("plan", "plan", groups, "", last)
    return digest, seconds


def removals_of_shard(work: str, digest: str, shard: int) -> np.ndarray:
    """The removals pass 3 applies to a shard (REMOVAL_DTYPE, in document order)."""
    plan = load_plan(work, digest)
    bounds = np.array([end for _, end in plan.groups])
    g = int(np.searchsorted(bounds, shard, side="right"))
    return shuffle.read_partition(
        storage.join(work, "dedup", "plan", f"{g:05d}"), shard - plan.groups[g][0]
    )
