"""The documents seam: zstd-compressed JSON Lines, one {"id", "text", "meta"} object per line."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import zstandard

from scratchlm.errors import UserError


def write_documents(path: Path, docs: Iterable[dict]) -> int:
    """Write documents to one .jsonl.zst file; returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as zw:
        for doc in docs:
            zw.write(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
            n += 1
    tmp.replace(path)
    return n


def read_documents(path: Path) -> Iterator[dict]:
    """Documents of one .jsonl.zst file."""
    with open(path, "rb") as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for line in reader:
            if line.strip():
                yield json.loads(line)


def document_files(folder: Path) -> list[Path]:
    """The part-*.jsonl.zst files of a documents folder, in order; an error if there are none."""
    files = sorted(folder.glob("part-*.jsonl.zst"))
    if not files:
        raise UserError(f"no documents in {folder} (expected part-*.jsonl.zst files)")
    return files


def iter_texts(folder: Path) -> Iterator[str]:
    """Every document text of a documents folder."""
    for f in document_files(folder):
        for doc in read_documents(f):
            yield doc["text"]
