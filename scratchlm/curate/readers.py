"""Readers: input files, folders and globs (local paths or fsspec URLs) to a stream of documents.

A shard is one input file, one byte range of a large file (see ranges.py), or all .html files of
one folder: the unit of parallel work and of resuming. Readers never raise on bad content: a
record they cannot use comes out as a document with a "reason" (and the pipeline sets it aside
under rejected/read/). Only a path that does not exist, or a file whose format is unknown, is a
UserError.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO

import zstandard

from scratchlm.curate import ranges, storage
from scratchlm.curate.config import CurateConfig
from scratchlm.errors import UserError

COMPRESSIONS = (".gz", ".zst")
FORMAT_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".warc": "warc",
    ".wet": "warc",
    ".html": "html",
    ".htm": "html",
}
# A stream that ends early or holds garbage raises one of these from the decompressor.
STREAM_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)
BINARY_SNIFF_BYTES = 8192
CHUNK_CHARS = 1 << 20


@dataclass
class Shard:
    name: str
    """Stable source name: the path as found, used in document ids."""
    fmt: str
    paths: list[str] = field(default_factory=list)
    start: int = 0
    """First byte (JSON Lines, WARC) or row group (Parquet) of the range this shard reads."""
    end: int = -1
    """End of the range, exclusive; -1: the end of the file."""


def detect_format(path: str) -> str | None:
    suffixes = [s.lower() for s in PurePosixPath(str(path)).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FORMAT_SUFFIXES.get(suffixes[-1]) if suffixes else None


def find_shards(inputs: list[str], shard_bytes: int = 0) -> tuple[list[Shard], dict[str, int]]:
    """The shards of the inputs, in a stable order, and counts of files skipped inside folders.

    Files larger than shard_bytes (0: no limit) are split into ranges where their format allows.
    Raises UserError for a path or glob that matches nothing, or a named file of unknown format.
    """
    shards: list[Shard] = []
    skipped: dict[str, int] = {}
    known = ", ".join(sorted({*FORMAT_SUFFIXES, *COMPRESSIONS}))
    for spec in inputs:
        spec = str(spec)
        if any(c in spec for c in "*?["):
            paths = storage.glob(spec)
            if not paths:
                raise UserError(f"input glob {spec!r} matches no files")
        else:
            paths = [spec]
            if not storage.exists(spec):
                raise UserError(f"input not found: {spec}")
        for path in paths:
            if storage.is_dir(path):
                _add_folder(path, shards, skipped, shard_bytes)
            elif detect_format(path) is None:
                raise UserError(f"cannot read {path}: unknown format (known suffixes: {known})")
            else:
                shards.extend(_file_shards(path, detect_format(path) or "", shard_bytes))
    if not shards:
        raise UserError(f"no readable files in {', '.join(inputs)} (known suffixes: {known})")
    return shards, skipped


def _file_shards(path: str, fmt: str, shard_bytes: int) -> list[Shard]:
    if shard_bytes > 0 and fmt == "parquet":
        return [Shard(path, fmt, [path], a, b) for a, b in _row_group_ranges(path, shard_bytes)]
    if shard_bytes > 0 and ranges.splittable(path, fmt):
        return [
            Shard(path, fmt, [path], a, b)
            for a, b in ranges.byte_ranges(storage.size(path), shard_bytes)
        ]
    return [Shard(path, fmt, [path])]


def _row_group_ranges(path: str, shard_bytes: int) -> list[tuple[int, int]]:
    """Runs of consecutive row groups of about shard_bytes (compressed) each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with storage.open_read(path) as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowException, OSError):
        return [(0, -1)]  # the reader sets the file aside with its reason
    out: list[tuple[int, int]] = []
    first, acc = 0, 0
    for i in range(meta.num_row_groups):
        acc += meta.row_group(i).total_byte_size
        if acc >= shard_bytes and i + 1 < meta.num_row_groups:
            out.append((first, i + 1))
            first, acc = i + 1, 0
    return [*out, (first, -1)]


def _add_folder(
    folder: str, shards: list[Shard], skipped: dict[str, int], shard_bytes: int
) -> None:
    files = storage.list_files(folder)
    parts = [p for p in files if re.fullmatch(r"part-\d+\.jsonl\.zst", storage.name_of(p))]
    if storage.join(folder, "stats.json") in files and parts:
        # The output of an earlier curate run: its documents, not its rejected/ audit files.
        top = [p for p in parts if storage.parent(p).rstrip("/") == folder.rstrip("/")]
        shards.extend(Shard(p, "jsonl", [p]) for p in top)
        return
    html_by_dir: dict[str, list[str]] = {}
    for path in files:
        if any(part.startswith(".") for part in storage.relative_parts(path, folder)):
            continue
        fmt = detect_format(path)
        if fmt is None:
            skipped["unknown format"] = skipped.get("unknown format", 0) + 1
        elif fmt == "html":
            html_by_dir.setdefault(storage.parent(path), []).append(path)
        else:
            shards.extend(_file_shards(path, fmt, shard_bytes))
    for parent, paths in sorted(html_by_dir.items()):
        shards.append(Shard(parent, "html", paths))


def open_binary(path: str) -> IO[bytes]:
    """The decompressed bytes of a file (gzip or zstd by suffix)."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=storage.open_read(path), mode="rb")
    if suffix == ".zst":
        return io.BufferedReader(_ZstdReader(storage.open_read(path)))
    return storage.open_read(path)


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a zstd file of one or more frames. Unlike zstandard's stream_reader,
    a file that ends inside a frame raises EOFError instead of ending quietly."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.in_frame = False
        self.pending = b""
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(1 << 16)
            if not chunk:
                if self.in_frame:
                    raise EOFError("zstd stream ended in the middle of a frame")
                return 0
            while chunk:
                self.in_frame = True
                self.pending += self.dobj.decompress(chunk)
                chunk = b""
                if self.dobj.eof:
                    chunk = self.dobj.unused_data
                    self.dobj = zstandard.ZstdDecompressor().decompressobj()
                    self.in_frame = False
        n = min(len(buffer), len(self.pending) - self.pos)
        buffer[:n] = self.pending[self.pos : self.pos + n]
        self.pos += n
        if self.pos == len(self.pending):
            self.pending, self.pos = b"", 0
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def looks_binary(head: bytes) -> bool:
    """NUL bytes, or many control bytes, in the first bytes of a stream: not text."""
    if not head:
        return False
    if b"\x00" in head:
        return True
    controls = sum(head.count(bytes([b])) for b in range(32) if b not in (9, 10, 12, 13, 27))
    return controls / len(head) > 0.1


def bad(doc_id: str, reason: str, text: str = "", score: float = 0.0) -> dict:
    """A record set aside by a reader: it goes to rejected/read/ with its reason."""
    return {"id": doc_id, "text": text[:1000], "meta": {}, "reason": reason, "score": score}


def read_shard(shard: Shard, cfg: CurateConfig) -> Iterator[dict]:
    """Every document of a shard, bad records included (those carry a "reason")."""
    if shard.fmt == "html":
        for path in shard.paths:
            yield from _read_html_file(path)
        return
    path = shard.paths[0]
    if shard.fmt == "warc":
        from scratchlm.curate.warc import read_warc

        yield from read_warc(path, shard.name, shard.start, shard.end)
        return
    if shard.fmt == "jsonl" and ranges.splittable(path, "jsonl"):
        yield from _read_jsonl_range(path, shard.name, cfg, shard.start, shard.end)
        return
    if shard.fmt == "parquet":
        yield from _read_parquet(path, shard.name, cfg, shard.start, shard.end)
        return
    reader = {"text": _read_text, "jsonl": _read_jsonl}[shard.fmt]
    try:
        yield from reader(path, shard.name, cfg)
    except STREAM_ERRORS as e:
        yield bad(f"{shard.name}:end", "truncated or corrupt input", str(e))


def _sniffed_text(path: str, source: str) -> tuple[IO[str] | None, dict | None]:
    stream = open_binary(path)
    buffered = io.BufferedReader(stream) if not isinstance(stream, io.BufferedReader) else stream
    head = buffered.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]
    if looks_binary(head):
        buffered.close()
        return None, bad(source, "binary file", "", 1.0)
    return io.TextIOWrapper(buffered, encoding="utf-8", errors="replace", newline=""), None


def _read_text(path: str, source: str, cfg: CurateConfig) -> Iterator[dict]:
    text_io, rejected = _sniffed_text(path, source)
    if text_io is None:
        yield rejected  # type: ignore[misc]
        return
    with text_io:
        if not cfg.text_separator:
            text = text_io.read(cfg.max_doc_chars + 1)
            if len(text) > cfg.max_doc_chars:
                yield bad(source, "document too long", text, float(len(text)))
            else:
                yield {"id": source, "text": text, "meta": {"source": source}}
            return
        try:
            separator = re.compile(cfg.text_separator)
        except re.error as e:
            raise UserError(f"curate.text_separator {cfg.text_separator!r}: {e}") from None
        for offset, piece in split_stream(text_io, separator, cfg.max_doc_chars):
            doc_id = f"{source}:{offset}"
            if piece is None:
                yield bad(doc_id, "document too long", "", float(cfg.max_doc_chars))
            else:
                yield {"id": doc_id, "text": piece, "meta": {"source": source}}


def split_stream(
    text_io: IO[str], separator: re.Pattern[str], max_chars: int
) -> Iterator[tuple[int, str | None]]:
    """(character offset, piece) for each piece between separators, reading in chunks.

    A piece longer than max_chars comes out once as (offset, None) and is not held in memory.
    """
    buf, offset, skipping = "", 0, False
    while True:
        chunk = text_io.read(CHUNK_CHARS)
        eof = not chunk
        buf += chunk
        pos = 0
        for m in separator.finditer(buf):
            # Near the buffer's end a separator (or its lookahead) may go on in the next chunk.
            if m.end() == m.start() or (not eof and m.end() > len(buf) - 256):
                continue
            if not skipping:
                yield offset + pos, buf[pos : m.start()]
            skipping = False
            pos = m.end()
        buf, offset = buf[pos:], offset + pos
        if len(buf) > max_chars and not skipping:
            yield offset, None
            skipping = True
        if skipping:
            # Keep a tail so that a separator straddling chunks is still seen.
            offset += max(0, len(buf) - 256)
            buf = buf[-256:]
        if eof:
            if buf and not skipping:
                yield offset, buf
            return


def _read_jsonl(path: str, source: str, cfg: CurateConfig) -> Iterator[dict]:
    text_io, rejected = _sniffed_text(path, source)
    if text_io is None:
        yield rejected  # type: ignore[misc]
        return
    with text_io:
        for lineno, line in enumerate(text_io, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield bad(f"{source}:{lineno}", "invalid json", line)
                continue
            yield _doc_from_record(obj, f"{source}:{lineno}", source, cfg, line)


def _read_jsonl_range(
    path: str, source: str, cfg: CurateConfig, start: int, end: int
) -> Iterator[dict]:
    """The records of an uncompressed JSON Lines file that start in [start, end); their fallback
    ids are byte offsets (a range does not know its line numbers)."""
    with storage.open_read(path) as f:
        if looks_binary(f.read(BINARY_SNIFF_BYTES)):
            if start == 0:
                yield bad(source, "binary file", "", 1.0)
            return
        offset = ranges.first_line_start(f, start)
        f.seek(offset)
        while end < 0 or offset < end:
            raw = f.readline()
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace")
            doc_id = f"{source}@{offset}"
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield bad(doc_id, "invalid json", line)
                continue
            yield _doc_from_record(obj, doc_id, source, cfg, line)


def _doc_from_record(
    obj: object, fallback_id: str, source: str, cfg: CurateConfig, raw: str
) -> dict:
    if not isinstance(obj, dict):
        return bad(fallback_id, "not a json object", raw)
    text = obj.get(cfg.text_field)
    if not isinstance(text, str):
        return bad(fallback_id, f"missing text field {cfg.text_field!r}", raw)
    doc_id = obj.get(cfg.id_field)
    meta = dict(obj["meta"]) if isinstance(obj.get("meta"), dict) else {}
    meta.setdefault("source", source)
    if isinstance(obj.get("url"), str):
        meta.setdefault("url", obj["url"])
    return {"id": str(doc_id) if doc_id is not None else fallback_id, "text": text, "meta": meta}


def _read_parquet(
    path: str, source: str, cfg: CurateConfig, first: int = 0, end: int = -1
) -> Iterator[dict]:
    """The rows of row groups [first, end) (-1: to the last)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = storage.open_read(path)
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        if first == 0:
            yield bad(source, "unreadable parquet", str(e))
        return
    with f:
        names = pf.schema_arrow.names
        if cfg.text_field not in names:
            if first == 0:
                yield bad(source, f"missing text field {cfg.text_field!r}", ", ".join(names))
            return
        columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field in names else [])
        groups = list(range(first, pf.metadata.num_row_groups if end < 0 else end))
        row = sum(pf.metadata.row_group(i).num_rows for i in range(first))
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=columns, row_groups=groups):
                for rec in batch.to_pylist():
                    yield _doc_from_record(rec, f"{source}:{row}", source, cfg, "")
                    row += 1
        except (pa.ArrowException, OSError) as e:
            yield bad(f"{source}:{row}", "truncated or corrupt input", str(e))


_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset=["']?([A-Za-z0-9_\-:.]+)""", re.I)


def decode_html(body: bytes, declared: str | None = None) -> str:
    """Decode page bytes: the declared charset, else a <meta> one, else UTF-8, else a guess.

    Bytes invalid in the chosen encoding become U+FFFD (counted by the normalize step).
    """
    sniffed = _META_CHARSET.search(body[:4096])
    for enc in (declared, sniffed.group(1).decode("ascii") if sniffed else None):
        if enc:
            try:
                codecs.lookup(enc)
            except LookupError:
                continue
            return body.decode(enc, errors="replace")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        guess = from_bytes(body[:65536]).best()
        return body.decode(guess.encoding if guess else "utf-8", errors="replace")


def _read_html_file(path: str) -> Iterator[dict]:
    source = path
    try:
        with open_binary(path) as f:
            body = f.read()
    except STREAM_ERRORS as e:
        yield bad(source, "truncated or corrupt input", str(e))
        return
    if looks_binary(body[:BINARY_SNIFF_BYTES]):
        yield bad(source, "binary file", "", 1.0)
        return
    yield {"id": source, "text": decode_html(body), "meta": {"source": source, "format": "html"}}
