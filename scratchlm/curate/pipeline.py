"""The curation run: inputs to OUT/part-*.jsonl.zst, OUT/stats.json and OUT/rejected/.

Three passes, so that dedup sees every document of the run while memory stays bounded:
1. per shard, one task each: read, then the per-document steps before dedup; kept documents
   stream to OUT/.work/p1/, and each one's exact-dedup key, MinHash signature, shingle keys and id
   to side files;
2. dedup over the side files of all shards, as map/reduce stages (dedup.py): exact then near
   duplicates, with no task holding more than its share of the corpus;
3. per shard, one task each: drop the duplicates and run the steps after dedup (PII).
An executor (executor.py) runs the tasks: processes on this machine, or Ray tasks on a cluster,
with the same results. OUT and the inputs may be local paths or fsspec URLs (storage.py).
A shard's pass is done when its stats file exists (written last), so a second run after a crash
redoes only the unfinished shards. A run with other inputs or config starts over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import zstandard

from scratchlm import disk
from scratchlm.curate import dedup, storage
from scratchlm.curate.audit import RejectWriters, ShardStats, merge_stats, utf8_len
from scratchlm.curate.config import ALL_STEPS, EXECUTION_KEYS, CurateConfig
from scratchlm.curate.executor import Progress, make_executor
from scratchlm.curate.minhash import MinHasher, shingle_hashes, shingle_keys
from scratchlm.curate.readers import Shard, find_shards, read_shard
from scratchlm.curate.steps import (
    BAD_INPUT_REASONS,
    DEDUP_STEPS,
    EDITING_STEPS,
    PER_DOC_STEPS,
    StepContext,
)
from scratchlm.errors import UserError
from scratchlm.paths import resolve


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
    """Inputs and the config that shapes results; how they run (executor, workers) is left out,
    so a run started on one executor can be finished on the other."""
    versions = {p: storage.version(p) for s in shards for p in s.paths}
    files = [(i, p, s.start, s.end, *versions[p]) for i, s in enumerate(shards) for p in s.paths]
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_KEYS}
    blob = json.dumps([settings, steps, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def exact_key(text: str) -> bytes:
    """Hash of the text with case and whitespace folded."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode(), digest_size=16).digest()


def write_docs(path: str, docs: Iterable[dict]) -> int:
    """Documents to one .jsonl.zst file (local or remote); returns how many were written."""
    n = 0
    with storage.open_write(path) as raw:
        with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as zw:
            for doc in docs:
                zw.write(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
                n += 1
    return n


def read_docs(path: str) -> Iterator[dict]:
    with storage.open_read(path) as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for line in reader:
            if line.strip():
                yield json.loads(line)


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


class _SideFiles:
    """Pass 1's per-shard dedup inputs (see dedup.py), written as the documents stream by."""

    def __init__(self, stack: contextlib.ExitStack, work: str, index: int, cfg, dedup_steps):
        exts = []
        if dedup_steps:
            exts += ["ids", "index"]
        if "exact_dedup" in dedup_steps:
            exts.append("exact")
        if "near_dedup" in dedup_steps:
            exts += ["sig"] + (["keys"] if cfg.near_dedup_threshold > 0 else [])
        self.files = {
            e: stack.enter_context(storage.open_write(dedup.side_path(work, index, e)))
            for e in exts
        }
        self.hasher = MinHasher(
            cfg.minhash_bands * cfg.minhash_rows, cfg.minhash_seed, cfg.minhash_ngram
        )
        self.ngram = cfg.minhash_ngram
        self.keys_end = self.ids_end = 0

    def add(self, doc: dict, stats: ShardStats) -> None:
        if not self.files:
            return
        doc_id = json.dumps(doc.get("id", "")).encode() + b"\n"
        self.files["ids"].write(doc_id)
        self.ids_end += len(doc_id)
        if "exact" in self.files:
            t0 = time.perf_counter()
            self.files["exact"].write(exact_key(doc["text"]))
            stats.step("exact_dedup").seconds += time.perf_counter() - t0
        if "sig" in self.files:
            t0 = time.perf_counter()
            shingles = shingle_hashes(doc["text"], self.ngram)
            self.files["sig"].write(self.hasher.signature_of_hashes(shingles).tobytes())
            keys = shingle_keys(shingles)
            if "keys" in self.files:  # only verification reads the keys
                self.files["keys"].write(keys.tobytes())
            self.keys_end += keys.size
            stats.step("near_dedup").seconds += time.perf_counter() - t0
        self.files["index"].write(
            np.array([(self.keys_end, self.ids_end)], dedup.INDEX_DTYPE).tobytes()
        )


def _phase1(job: tuple) -> dict:
    index, shard, cfg, pre, dedup_steps, out = job
    work = storage.join(out, ".work")
    name = f"part-{index:05d}"
    ctx = StepContext(cfg)
    stats = ShardStats()
    rejects = RejectWriters(storage.join(out, "rejected"), f"{name}.jsonl.zst")

    def kept(side: _SideFiles) -> Iterator[dict]:
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
            side.add(doc, stats)
            yield doc

    try:
        with contextlib.ExitStack() as stack:
            side = _SideFiles(stack, work, index, cfg, dedup_steps)
            docs = write_docs(storage.join(work, "p1", f"{name}.jsonl.zst"), kept(side))
    except BaseException as e:
        rejects.close(e)
        raise
    rejects.close()
    stats.counters["docs_after_pre"] = docs
    stats.counters.update(ctx.counters)
    result = stats.to_dict()
    _write_json(storage.join(work, "p1", f"{name}.stats.json"), result)
    return result


def _phase3(job: tuple) -> dict:
    index, cfg, dedup_steps, post, out, digest = job
    work = storage.join(out, ".work")
    name = f"part-{index:05d}"
    ctx = StepContext(cfg)
    stats = ShardStats()
    rejects = RejectWriters(storage.join(out, "rejected"), f"{name}.jsonl.zst")
    duplicates: dict[int, tuple[int, float, str]] = {}
    if dedup_steps:
        removal = dedup.removals_of_shard(work, digest, index)
        kept_ids = dedup.read_ids(work, removal["kept"])
        duplicates = {
            int(p): (int(k), float(s), i)
            for p, k, s, i in zip(
                dedup.position_of(removal["doc"]),
                removal["kind"],
                removal["score"],
                kept_ids,
                strict=True,
            )
        }

    def kept() -> Iterator[dict]:
        for position, doc in enumerate(read_docs(storage.join(work, "p1", f"{name}.jsonl.zst"))):
            size = utf8_len(doc["text"])
            for code, step in enumerate(DEDUP_STEPS):
                if step not in dedup_steps:
                    continue
                if duplicates.get(position, (-1,))[0] == code:
                    reason = "exact duplicate" if code == dedup.EXACT else "near duplicate"
                    stats.step(step).removed(size, reason)
                    _, score, duplicate_of = duplicates[position]
                    rejects.write(step, doc, reason, score, duplicate_of=duplicate_of)
                    break
                stats.step(step).passed(size, size)
            else:
                if _run_steps(doc, post, ctx, stats, rejects):
                    yield doc

    try:
        docs = write_docs(storage.join(out, f"{name}.jsonl.zst"), kept())
    except BaseException as e:
        rejects.close(e)
        raise
    rejects.close()
    stats.counters["docs_out"] = docs
    stats.counters.update(ctx.counters)
    result = stats.to_dict()
    _write_json(storage.join(work, "p3", f"{name}.stats.json"), result)
    return result


def _write_json(path: str, data: dict) -> None:
    storage.write_bytes(path, json.dumps(data, indent=1).encode())


def _read_json(path: str) -> dict:
    return json.loads(storage.read_bytes(path))


def _prepare_out(out: str, fingerprint: str) -> None:
    """Keep finished shard work of an identical earlier run; otherwise start from an empty DIR."""
    manifest = storage.join(out, ".work", "manifest.json")
    if storage.is_file(manifest) and _read_json(manifest).get("fingerprint") == fingerprint:
        return
    storage.remove_tree(storage.join(out, ".work"))
    storage.remove_tree(storage.join(out, "rejected"))
    for old in [
        *storage.glob(storage.join(out, "part-*.jsonl.zst")),
        storage.join(out, "stats.json"),
    ]:
        storage.remove(old)
    storage.make_dirs(storage.join(out, ".work", "p1"))
    _write_json(manifest, {"fingerprint": fingerprint})


def _say_skipped(skipped: dict[str, list[str]]) -> None:
    """One line for the entries of input folders and globs that cannot be read (files of an
    unknown type are expected there, and only counted)."""
    unreadable = {why: paths for why, paths in skipped.items() if why != "unknown format"}
    if not unreadable:
        return
    paths = [p for why in sorted(unreadable) for p in unreadable[why]]
    counts = ", ".join(f"{len(unreadable[why])} {why}" for why in sorted(unreadable))
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    print(
        f"curate: skipped {len(paths)} input entries that cannot be read ({counts}): {shown}",
        flush=True,
    )


def run_curate(
    inputs: list[str],
    out: str | Path,
    cfg: CurateConfig,
    only: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Curate the inputs into `out` (a folder or an fsspec URL); returns the stats written to
    out/stats.json."""
    start = time.perf_counter()
    steps = resolve_steps(cfg.steps, only)
    if "quality" in steps and not resolve(cfg.quality_model).is_file():
        raise UserError(
            f"the quality step needs curate.quality_model (a model from `scratchlm curate "
            f"train-quality`); got {cfg.quality_model!r}"
        )
    if cfg.dedup_docs_per_task < 1:
        raise UserError(f"curate.dedup_docs_per_task must be >= 1, got {cfg.dedup_docs_per_task}")
    shards, skipped = find_shards(inputs, cfg.shard_bytes)
    _say_skipped(skipped)
    out = str(out)
    if storage.exists(out) and not storage.is_dir(out):
        raise UserError(f"--out {out} exists and is not a folder")
    if not storage.is_remote(out):  # files a killed run was writing (the CLI holds OUT's lock)
        disk.say_removed(
            "curate",
            *disk.remove_stale(Path(storage.local_path(out)), [f"**/*{storage.TMP_SUFFIX}"]),
        )
    _prepare_out(out, _fingerprint(shards, cfg, steps))
    pre, dedup_steps, post = _split_steps(steps)
    work = storage.join(out, ".work")
    p1, p3 = storage.join(work, "p1"), storage.join(work, "p3")

    def done(folder: str, i: int) -> bool:
        return storage.exists(storage.join(folder, f"part-{i:05d}.stats.json"))

    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    bar = Progress(progress, "curate")
    try:
        jobs = [(i, s, cfg, pre, dedup_steps, out) for i, s in enumerate(shards) if not done(p1, i)]
        executor.map(_phase1, jobs, bar, "filter")
        parts = [
            _read_json(storage.join(p1, f"part-{i:05d}.stats.json")) for i in range(len(shards))
        ]
        dedup_seconds: dict[str, float] = {}
        digest = ""
        if dedup_steps:
            counts = [p["counters"]["docs_after_pre"] for p in parts]
            plan = dedup.make_plan(work, dedup_steps, counts, cfg, cfg.dedup_docs_per_task)
            digest, dedup_seconds = dedup.run_dedup(executor, bar, plan)
        jobs3 = [
            (i, cfg, dedup_steps, post, out, digest) for i in range(len(shards)) if not done(p3, i)
        ]
        executor.map(_phase3, jobs3, bar, "dedup + pii")
        execution = executor.summary()
    finally:
        bar.close()
        executor.close()

    parts += [_read_json(storage.join(p3, f"part-{i:05d}.stats.json")) for i in range(len(shards))]
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
        "inputs": list(dict.fromkeys(p for s in shards for p in s.paths)),
        "shards": len(shards),
        "steps": stats["steps"],
        "bad_input": {"docs": sum(bad.values()), "reasons": dict(sorted(bad.items()))},
        "skipped_files": {why: len(paths) for why, paths in sorted(skipped.items())},
        "counters": {k: v for k, v in counters.items() if k not in ("docs_after_pre", "docs_out")},
        "output": {
            "docs": counters.get("docs_out", 0),
            "bytes": stats["steps"][-1]["bytes_out"] if stats["steps"] else 0,
            "files": len(shards),
        },
        "execution": execution,
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    _write_json(storage.join(out, "stats.json"), stats)
    return stats
