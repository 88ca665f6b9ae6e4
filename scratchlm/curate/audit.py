"""The audit trail: per-step counts of documents and bytes, and the rejected documents."""

from __future__ import annotations

import json
from collections import Counter

import zstandard

from scratchlm.curate import storage
from scratchlm.errors import RunFault

REJECT_TEXT_LIMIT = 100_000
"""Rejected texts longer than this are cut in the audit files (a 10 MB line is not kept)."""


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


class StepCounts:
    """Documents and bytes into and out of one step, with the reasons for every removal."""

    def __init__(self) -> None:
        self.docs_in = self.bytes_in = self.docs_out = self.bytes_out = 0
        self.seconds = 0.0
        self.reasons: dict[str, list[int]] = {}

    def passed(self, bytes_in: int, bytes_out: int) -> None:
        self.docs_in += 1
        self.docs_out += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def removed(self, bytes_in: int, reason: str) -> None:
        self.docs_in += 1
        self.bytes_in += bytes_in
        entry = self.reasons.setdefault(reason, [0, 0])
        entry[0] += 1
        entry[1] += bytes_in

    def to_dict(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "bytes_in": self.bytes_in,
            "docs_out": self.docs_out,
            "bytes_out": self.bytes_out,
            "docs_removed": self.docs_in - self.docs_out,
            "bytes_removed": sum(b for _, b in self.reasons.values()),
            "seconds": round(self.seconds, 3),
            "reasons": {r: {"docs": d, "bytes": b} for r, (d, b) in sorted(self.reasons.items())},
        }


class ShardStats:
    def __init__(self) -> None:
        self.steps: dict[str, StepCounts] = {}
        self.counters: Counter[str] = Counter()

    def step(self, name: str) -> StepCounts:
        if name not in self.steps:
            self.steps[name] = StepCounts()
        return self.steps[name]

    def to_dict(self) -> dict:
        return {
            "steps": {name: c.to_dict() for name, c in self.steps.items()},
            "counters": dict(self.counters),
        }


def merge_stats(parts: list[dict], order: list[str]) -> dict:
    """The funnel of a run from the stats of its shards, steps in run order."""
    steps: dict[str, dict] = {}
    counters: Counter[str] = Counter()
    for part in parts:
        counters.update(part.get("counters", {}))
        for name, s in part["steps"].items():
            total = steps.setdefault(
                name,
                {k: 0 for k in ("docs_in", "bytes_in", "docs_out", "bytes_out")}
                | {"docs_removed": 0, "bytes_removed": 0, "seconds": 0.0, "reasons": {}},
            )
            for key in ("docs_in", "bytes_in", "docs_out", "bytes_out", "docs_removed"):
                total[key] += s[key]
            total["bytes_removed"] += s["bytes_removed"]
            total["seconds"] = round(total["seconds"] + s["seconds"], 3)
            for reason, r in s["reasons"].items():
                t = total["reasons"].setdefault(reason, {"docs": 0, "bytes": 0})
                t["docs"] += r["docs"]
                t["bytes"] += r["bytes"]
    ordered = [{"step": name, **steps[name]} for name in order if name in steps]
    return {"steps": ordered, "counters": dict(sorted(counters.items()))}


class RejectWriters:
    """rejected/<step>/<part name>: one zstd JSON Lines file per step, opened on first use and
    put in place on close (storage.open_write), so a crash never leaves a half-written file under
    its real name."""

    def __init__(self, root: str, part_name: str) -> None:
        self.root = root
        self.part_name = part_name
        self.open: dict[str, tuple[object, object]] = {}

    def write(
        self, step: str, doc: dict, reason: str, score: float, duplicate_of: str | None = None
    ) -> None:
        if step not in self.open:
            target = storage.open_write(storage.join(self.root, step, self.part_name))
            raw = target.__enter__()
            writer = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
            self.open[step] = (target, writer)
        text = doc.get("text", "")
        meta = dict(doc.get("meta") or {})
        if len(text) > REJECT_TEXT_LIMIT:
            meta["text_chars"] = len(text)
            text = text[:REJECT_TEXT_LIMIT]
        record = {
            "id": doc.get("id", ""),
            "text": text,
            "meta": meta,
            "reason": reason,
            "score": round(float(score), 6),
        }
        if duplicate_of is not None:
            record["duplicate_of"] = duplicate_of
        self.open[step][1].write(json.dumps(record, ensure_ascii=False).encode() + b"\n")

    def close(self, error: BaseException | None = None) -> None:
        """Put the files in place; after an error (the caller's, or one met closing, such as a
        full disk), discard every file not yet in place and raise the first one met here."""
        failure: BaseException | None = None
        for target, writer in self.open.values():
            try:
                writer.close()
            except Exception as e:
                failure = failure or e
            cause = error or failure
            try:
                target.__exit__(None if cause is None else type(cause), cause, None)
            except Exception as e:  # open_write names a full disk: the better error to show
                failure = e if failure is None or isinstance(e, RunFault) else failure
        self.open.clear()
        if failure is not None and error is None:
            raise failure
