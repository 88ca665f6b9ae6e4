"""The curation run: inputs to OUT/part-*.jsonl.zst, OUT/stats.json and OUT/rejected/.

Three passes, so that dedup sees every document of the run while memory stays bounded:
1. per shard, in parallel: read, then the per-document steps before dedup; kept documents stream to
   OUT/.work/p1/, and each one's exact-dedup key and MinHash signature to small side files;
2. once, over the side files of all shards: exact then near duplicates (the only global state is
   16 + 4 * bands * rows bytes per document, never the texts);
3. per shard, in parallel: drop the duplicates and run the steps after dedup (PII).
A shard's pass is done when its stats file exists (written last), so a second run after a crash
redoes only the unfinished shards. A run with other inputs or config starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scratchlm.curate.audit import RejectWriters, ShardStats, merge_stats, utf8_len
from scratchlm.curate.config import ALL_STEPS, CurateConfig
from scratchlm.curate.minhash import (
    MinHasher,
    candidate_pairs,
    resolve_duplicates,
    shingle_hashes,
    shingle_keys,
)
from scratchlm.curate.readers import Shard, find_shards, read_shard
from scratchlm.curate.steps import (
    BAD_INPUT_REASONS,
    DEDUP_STEPS,
    EDITING_STEPS,
    PER_DOC_STEPS,
    StepContext,
)
from scratchlm.documents import read_documents, write_documents
from scratchlm.errors import UserError
from scratchlm.paths import resolve

EXACT_KEY_BYTES = 16


def resolve_steps(steps: list[str], only: list[str] | None) -> list[str]:
    """The steps to run, in order; `only` picks some of them ("dedup" names both dedup steps)."""
    known = set(ALL_STEPS)
    if only is not None:
        wanted = {s for name in only for s in (DEDUP_STEPS if name == "dedup" else [name])}
        unknown = sorted(wanted - known)
        if unknown:
            raise UserError(
                f"unknown curate step {unknown[0]!r}; known: dedup, {', '.join(ALL_STEPS)}"
            )
        order = [s for s in steps if s in wanted]
        steps = order + sorted(wanted - set(order), key=ALL_STEPS.index)
    for s in steps:
        if s not in known:
            raise UserError(
                f"unknown curate step {s!r} in curate.steps; known: {', '.join(ALL_STEPS)}"
            )
    if len(set(steps)) != len(steps):
        raise UserError(f"curate.steps names a step twice: {steps}")
    positions = [i for i, s in enumerate(steps) if s in DEDUP_STEPS]
    if positions and positions[-1] - positions[0] != len(positions) - 1:
        raise UserError("curate.steps: exact_dedup and near_dedup must be next to each other")
    return steps


def _split_steps(steps: list[str]) -> tuple[list[str], list[str], list[str]]:
    positions = [i for i, s in enumerate(steps) if s in DEDUP_STEPS]
    if not positions:
        return steps, [], []
    return (
        steps[: positions[0]],
        steps[positions[0] : positions[-1] + 1],
        steps[positions[-1] + 1 :],
    )


def _fingerprint(shards: list[Shard], cfg: CurateConfig, steps: list[str]) -> str:
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for s in shards for p in s.paths]
    blob = json.dumps([dataclasses.asdict(cfg), steps, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def exact_key(text: str) -> bytes:
    """Hash of the text with case and whitespace folded."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode(), digest_size=16).digest()


def _run_steps(
    doc: dict, names: list[str], ctx: StepContext, stats: ShardStats, rejects: RejectWriters
) -> bool:
    """Run per-document steps on doc; False (and the doc in rejected/) when one removes it."""
    size = utf8_len(doc["text"])
    for name in names:
        t0 = time.perf_counter()
        rejection = PER_DOC_STEPS[name](doc, ctx)
        counts = stats.step(name)
        if rejection is not None:
            counts.seconds += time.perf_counter() - t0
            counts.removed(size, rejection[0])
            rejects.write(name, doc, *rejection)
            return False
        new_size = utf8_len(doc["text"]) if name in EDITING_STEPS else size
        counts.seconds += time.perf_counter() - t0
        counts.passed(size, new_size)
        size = new_size
    return True


def _phase1(job: tuple) -> dict:
    index, shard, cfg, pre, dedup, out = job
    work = out / ".work" / "p1"
    name = f"part-{index:05d}"
    ctx = StepContext(cfg)
    stats = ShardStats()
    rejects = RejectWriters(out / "rejected", f"{name}.jsonl.zst")
    hasher = MinHasher(cfg.minhash_bands * cfg.minhash_rows, cfg.minhash_seed, cfg.minhash_ngram)
    side = {
        ext: open(work / f"{name}.{ext}.tmp", "wb")
        for ext in ("exact", "sig", "keys", "nkeys", "ids")
    }

    def kept() -> Iterator[dict]:
        reader = read_shard(shard, cfg)
        read = stats.step("read")
        while True:
            t0 = time.perf_counter()
            doc = next(reader, None)
            read.seconds += time.perf_counter() - t0
            if doc is None:
                return
            size = utf8_len(doc["text"])
            if "reason" in doc:
                read.removed(size, doc["reason"])
                rejects.write("read", doc, doc["reason"], doc["score"])
                continue
            read.passed(size, size)
            if not _run_steps(doc, pre, ctx, stats, rejects):
                continue
            if dedup:  # a duplicate's audit record names the kept document by its id
                side["ids"].write(json.dumps(doc.get("id", "")).encode() + b"\n")
            if "exact_dedup" in dedup:
                t0 = time.perf_counter()
                side["exact"].write(exact_key(doc["text"]))
                stats.step("exact_dedup").seconds += time.perf_counter() - t0
            if "near_dedup" in dedup:
                t0 = time.perf_counter()
                shingles = shingle_hashes(doc["text"], cfg.minhash_ngram)
                side["sig"].write(hasher.signature_of_hashes(shingles).tobytes())
                keys = shingle_keys(shingles)
                if cfg.near_dedup_threshold > 0:  # only verification reads the keys
                    side["keys"].write(keys.tobytes())
                side["nkeys"].write(np.int64(keys.size).tobytes())
                stats.step("near_dedup").seconds += time.perf_counter() - t0
            yield doc

    try:
        stats.counters["docs_after_pre"] = write_documents(work / f"{name}.jsonl.zst", kept())
    finally:
        rejects.close()
        for f in side.values():
            f.close()
    for ext in side:
        (work / f"{name}.{ext}.tmp").replace(work / f"{name}.{ext}")
    stats.counters.update(ctx.counters)
    result = stats.to_dict()
    _write_json(work / f"{name}.stats.json", result)
    return result


def _global_dedup(out: Path, n_shards: int, cfg: CurateConfig, dedup: list[str]) -> dict:
    """Decide which documents of the run are duplicates; writes .work/dedup/part-N.npz per shard
    (positions within the shard, reason code 0 exact / 1 near, score, id of the kept document)."""
    t0 = time.perf_counter()
    p1 = out / ".work" / "p1"
    folder = out / ".work" / "dedup"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    counts = [
        json.loads((p1 / f"part-{i:05d}.stats.json").read_text())["counters"]["docs_after_pre"]
        for i in range(n_shards)
    ]
    n = sum(counts)
    first_of_shard = np.cumsum([0, *counts])
    shard_of = np.repeat(np.arange(n_shards), counts)
    position = np.arange(n) - first_of_shard[shard_of]
    removed = np.zeros(n, bool)
    reason = np.zeros(n, np.int8)
    score = np.zeros(n, np.float32)
    kept_as = np.arange(n)  # the document each duplicate is removed in favour of
    timings = {}
    if "exact_dedup" in dedup:
        keys = np.concatenate(
            [np.fromfile(p1 / f"part-{i:05d}.exact", np.uint8) for i in range(n_shards)]
        ).reshape(n, EXACT_KEY_BYTES)
        _, first, group = np.unique(
            keys.view(np.dtype((np.void, EXACT_KEY_BYTES))).reshape(-1),
            return_index=True,
            return_inverse=True,
        )
        kept_as = first[group.reshape(-1)]
        removed |= kept_as != np.arange(n)
        score[removed] = 1.0
        timings["exact_dedup"] = time.perf_counter() - t0
    if "near_dedup" in dedup:
        t1 = time.perf_counter()
        n_perm = cfg.minhash_bands * cfg.minhash_rows
        sigs = np.concatenate(
            [np.fromfile(p1 / f"part-{i:05d}.sig", np.uint32) for i in range(n_shards)]
        ).reshape(n, n_perm)
        shingles = _ShingleKeys(p1, first_of_shard)
        active = shingles.sizes > 0
        threshold = cfg.near_dedup_threshold
        edges = candidate_pairs(
            sigs, cfg.minhash_bands, cfg.minhash_rows, threshold, active & ~removed
        )
        rep, jaccard = resolve_duplicates(sigs, edges, threshold, shingles)
        near = rep != np.arange(n)
        removed |= near
        reason[near] = 1
        score[near] = jaccard[near]
        kept_as[near] = rep[near]
        timings["near_dedup"] = time.perf_counter() - t1
    ids = _ids_of(out, np.unique(kept_as[removed]), shard_of, position)
    for i in range(n_shards):
        sel = removed & (shard_of == i)
        np.savez(
            folder / f"part-{i:05d}.npz",
            position=position[sel],
            reason=reason[sel],
            score=score[sel],
            duplicate_of=np.array([ids[int(k)] for k in kept_as[sel]], dtype=str),
        )
    return timings


class _ShingleKeys:
    """shingles_of(global index): a document's sorted shingle keys, read from the memory-mapped
    .keys files of pass 1, so the global pass never holds many documents' shingles at once."""

    def __init__(self, p1: Path, first_of_shard: np.ndarray) -> None:
        self.p1 = p1
        self.first_of_shard = first_of_shard
        self.sizes = np.concatenate(
            [
                np.fromfile(p1 / f"part-{i:05d}.nkeys", np.int64)
                for i in range(len(first_of_shard) - 1)
            ]
        )
        self.offsets = np.r_[0, np.cumsum(self.sizes)]
        self.shards: dict[int, np.ndarray] = {}

    def __call__(self, doc: int) -> np.ndarray:
        shard = int(np.searchsorted(self.first_of_shard, doc, side="right")) - 1
        if shard not in self.shards:
            path = self.p1 / f"part-{shard:05d}.keys"
            self.shards[shard] = (
                np.memmap(path, np.uint32, mode="r")
                if path.stat().st_size
                else np.zeros(0, np.uint32)
            )
        start = self.offsets[doc] - self.offsets[self.first_of_shard[shard]]
        return np.asarray(self.shards[shard][start : start + self.sizes[doc]])


def _ids_of(
    out: Path,
    docs: np.ndarray,
    shard_of: np.ndarray,
    position: np.ndarray,
) -> dict[int, str]:
    """The ids of some documents (the kept ones of duplicate groups), from the shards' id files."""
    ids = {}
    for shard in np.unique(shard_of[docs]):
        wanted = docs[shard_of[docs] == shard]
        path = out / ".work" / "p1" / f"part-{shard:05d}.ids"
        with open(path, encoding="utf-8") as f:
            shard_ids = [json.loads(line) for line in f]
        ids.update({int(d): shard_ids[position[d]] for d in wanted})
    return ids


def _phase3(job: tuple) -> dict:
    index, cfg, dedup, post, out = job
    name = f"part-{index:05d}"
    ctx = StepContext(cfg)
    stats = ShardStats()
    rejects = RejectWriters(out / "rejected", f"{name}.jsonl.zst")
    duplicates: dict[int, tuple[int, float, str]] = {}
    if dedup:
        with np.load(out / ".work" / "dedup" / f"{name}.npz", allow_pickle=False) as plan:
            duplicates = {
                int(p): (int(r), float(s), str(k))
                for p, r, s, k in zip(
                    plan["position"],
                    plan["reason"],
                    plan["score"],
                    plan["duplicate_of"],
                    strict=True,
                )
            }

    def kept() -> Iterator[dict]:
        for position, doc in enumerate(read_documents(out / ".work" / "p1" / f"{name}.jsonl.zst")):
            size = utf8_len(doc["text"])
            for code, step in enumerate(DEDUP_STEPS):
                if step not in dedup:
                    continue
                if duplicates.get(position, (-1,))[0] == code:
                    stats.step(step).removed(
                        size, "exact duplicate" if code == 0 else "near duplicate"
                    )
                    rejects.write(
                        step,
                        doc,
                        "exact duplicate" if code == 0 else "near duplicate",
                        duplicates[position][1],
                        duplicate_of=duplicates[position][2],
                    )
                    break
                stats.step(step).passed(size, size)
            else:
                if _run_steps(doc, post, ctx, stats, rejects):
                    yield doc

    try:
        stats.counters["docs_out"] = write_documents(out / f"{name}.jsonl.zst", kept())
    finally:
        rejects.close()
    stats.counters.update(ctx.counters)
    result = stats.to_dict()
    _write_json(out / ".work" / "p3" / f"{name}.stats.json", result)
    return result


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _parallel(fn, jobs: list[tuple], workers: int, progress: bool, desc: str) -> None:
    if not jobs:
        return
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="shard", disable=not progress)
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            fn(job)
            bar.update()
    else:
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(fn, jobs):
                bar.update()
    bar.close()


def _prepare_out(out: Path, fingerprint: str) -> None:
    """Keep finished shard work of an identical earlier run; otherwise start from an empty DIR."""
    manifest = out / ".work" / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
        return
    shutil.rmtree(out / ".work", ignore_errors=True)
    shutil.rmtree(out / "rejected", ignore_errors=True)
    for old in [*out.glob("part-*.jsonl.zst"), out / "stats.json"]:
        old.unlink(missing_ok=True)
    (out / ".work" / "p1").mkdir(parents=True, exist_ok=True)
    _write_json(manifest, {"fingerprint": fingerprint})


def run_curate(
    inputs: list[str],
    out: Path,
    cfg: CurateConfig,
    only: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Curate the inputs into `out`; returns the stats written to out/stats.json."""
    start = time.perf_counter()
    steps = resolve_steps(cfg.steps, only)
    if "quality" in steps and not resolve(cfg.quality_model).is_file():
        raise UserError(
            f"the quality step needs curate.quality_model (a model from `scratchlm curate "
            f"train-quality`); got {cfg.quality_model!r}"
        )
    shards, skipped = find_shards(inputs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    _prepare_out(out, _fingerprint(shards, cfg, steps))
    pre, dedup, post = _split_steps(steps)
    workers = cfg.workers or os.cpu_count() or 1

    p1 = out / ".work" / "p1"
    jobs = [(i, s, cfg, pre, dedup, out) for i, s in enumerate(shards)]
    todo = [j for j in jobs if not (p1 / f"part-{j[0]:05d}.stats.json").is_file()]
    _parallel(_phase1, todo, workers, progress, "curate: filter")
    dedup_seconds = _global_dedup(out, len(shards), cfg, dedup) if dedup else {}
    p3 = out / ".work" / "p3"
    jobs3 = [(i, cfg, dedup, post, out) for i in range(len(shards))]
    todo3 = [j for j in jobs3 if not (p3 / f"part-{j[0]:05d}.stats.json").is_file()]
    _parallel(_phase3, todo3, workers, progress, "curate: dedup + pii")

    parts = [json.loads((p1 / f"part-{i:05d}.stats.json").read_text()) for i in range(len(shards))]
    parts += [json.loads((p3 / f"part-{i:05d}.stats.json").read_text()) for i in range(len(shards))]
    stats = merge_stats(parts, ["read", *steps])
    for entry in stats["steps"]:
        entry["seconds"] = round(entry["seconds"] + dedup_seconds.get(entry["step"], 0.0), 3)
    bad: dict[str, int] = {}
    for entry in stats["steps"]:
        for reason, r in entry["reasons"].items():
            if entry["step"] == "read" or reason in BAD_INPUT_REASONS:
                bad[reason] = bad.get(reason, 0) + r["docs"]
    counters = stats["counters"]
    stats = {
        "inputs": [s.name for s in shards],
        "shards": len(shards),
        "steps": stats["steps"],
        "bad_input": {"docs": sum(bad.values()), "reasons": dict(sorted(bad.items()))},
        "skipped_files": skipped,
        "counters": {k: v for k, v in counters.items() if k not in ("docs_after_pre", "docs_out")},
        "output": {
            "docs": counters.get("docs_out", 0),
            "bytes": stats["steps"][-1]["bytes_out"] if stats["steps"] else 0,
            "files": len(shards),
        },
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    _write_json(out / "stats.json", stats)
    return stats
