"""Readers: input files, folders and globs (local paths or fsspec URLs) to a stream of documents.

A shard is one byte range of a large file (see ranges.py), or a group of whole files of one
format (one file when it is large): the unit of parallel work and of resuming. Readers never
raise on bad content: a record they cannot use comes out as a document with a "reason" (and the
pipeline sets it aside under rejected/read/). Only a path that does not exist, a file whose
format is unknown or a named file that cannot be read, is a UserError.
"""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO

from scratchlm.curate import ranges, storage
from scratchlm.curate.config import CurateConfig
from scratchlm.curate.streams import (
    STREAM_ERRORS,
    NestedTooDeep,
    bounded_lines,
    decompressed,
    parse_json,
)
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
BINARY_SNIFF_BYTES = 8192
CHUNK_CHARS = 1 << 20
RECORD_BYTES_PER_CHAR = 6
"""A JSON Lines record, a WARC record's body or an HTML file longer than this many bytes per
character of max_doc_chars is set aside while it is read (`record too long`), not held whole:
room for a document of max_doc_chars written as \\uXXXX escapes, or for a page's markup."""
GROUP_FILES = 1000
"""Small files are read by one task in groups of up to this many (and up to shard_bytes)."""


@dataclass
class Shard:
    name: str
    """Stable name: the path of its (first) file as found; each file's path names its documents."""
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


def find_shards(
    inputs: list[str], shard_bytes: int = 0
) -> tuple[list[Shard], dict[str, list[str]]]:
    """The shards of the inputs, in a stable order, and the entries skipped inside folders and
    globs, by why (unknown format, a dangling symlink, not a regular file, unreadable).

    Files larger than shard_bytes (0: no limit) are split into ranges where their format allows;
    smaller ones are read in groups of up to shard_bytes and GROUP_FILES files.
    Raises UserError for a path or glob that matches nothing, or a named file of unknown format
    or that cannot be read.
    """
    shards: list[Shard] = []
    skipped: dict[str, list[str]] = {}
    known = ", ".join(sorted({*FORMAT_SUFFIXES, *COMPRESSIONS}))
    for spec in inputs:
        spec = str(spec)
        globbed = any(c in spec for c in "*?[")
        if globbed:
            paths = storage.glob(spec)
            if not paths:
                raise UserError(f"input glob {spec!r} matches no files")
        else:
            paths = [spec]
            if not storage.exists(spec):
                raise UserError(f"input not found: {spec}")
        for path in paths:
            unreadable = None if storage.is_dir(path) else storage.why_unreadable(path)
            if unreadable and globbed:
                skipped.setdefault(unreadable, []).append(path)
            elif unreadable:
                raise UserError(f"cannot read {path}: {unreadable}")
            elif storage.is_dir(path):
                _add_folder(path, shards, skipped, shard_bytes)
            elif detect_format(path) is None:
                raise UserError(f"cannot read {path}: unknown format (known suffixes: {known})")
            else:
                shards.extend(_file_shards(path, detect_format(path) or "", shard_bytes))
    if not shards:
        raise UserError(f"no readable files in {', '.join(inputs)} (known suffixes: {known})")
    return _grouped(shards, shard_bytes), skipped


def _file_shards(path: str, fmt: str, shard_bytes: int) -> list[Shard]:
    if shard_bytes > 0 and fmt == "parquet":
        return [Shard(path, fmt, [path], a, b) for a, b in _row_group_ranges(path, shard_bytes)]
    if shard_bytes > 0 and ranges.splittable(path, fmt):
        return [
            Shard(path, fmt, [path], a, b)
            for a, b in ranges.byte_ranges(storage.size(path), shard_bytes)
        ]
    return [Shard(path, fmt, [path])]


def _grouped(shards: list[Shard], shard_bytes: int) -> list[Shard]:
    """Whole files of one format gathered into shards of up to shard_bytes (0: no limit) and
    GROUP_FILES files, each where its first file was: a task per file would cost more than the
    file (10,000 one-story files were 20,025 tasks and 100,026 files written)."""
    out: list[Shard] = []
    filling: dict[str, tuple[Shard, int]] = {}  # format: (its open group, the group's bytes)
    for shard in shards:
        if shard.start != 0 or shard.end != -1:
            out.append(shard)  # a range of a large file
            continue
        size = sum(storage.size(p) for p in shard.paths)
        group, held = filling.get(shard.fmt, (None, 0))
        full = group is not None and (
            len(group.paths) + len(shard.paths) > GROUP_FILES
            or (shard_bytes > 0 and held + size > shard_bytes)
        )
        if group is None or full:
            group, held = Shard(shard.name, shard.fmt, []), 0
            out.append(group)
        group.paths.extend(shard.paths)
        filling[shard.fmt] = (group, held + size)
    return out


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
    folder: str, shards: list[Shard], skipped: dict[str, list[str]], shard_bytes: int
) -> None:
    files = storage.list_files(folder)
    parts = [p for p in files if re.fullmatch(r"part-\d+\.jsonl\.zst", storage.name_of(p))]
    if storage.join(folder, "stats.json") in files and parts:
        # The output of an earlier curate run: its documents, not its rejected/ audit files.
        top = [p for p in parts if storage.parent(p).rstrip("/") == folder.rstrip("/")]
        shards.extend(Shard(p, "jsonl", [p]) for p in top)
        return
    html: list[str] = []
    for path in files:
        if any(part.startswith(".") for part in storage.relative_parts(path, folder)):
            continue
        fmt = detect_format(path)
        why = "unknown format" if fmt is None else storage.why_unreadable(path)
        if why:
            skipped.setdefault(why, []).append(path)
        elif fmt == "html":
            html.append(path)
        else:
            shards.extend(_file_shards(path, fmt, shard_bytes))
    shards.extend(Shard(path, "html", [path]) for path in html)


def open_binary(path: str) -> IO[bytes]:
    """The decompressed bytes of a file (gzip or zstd by suffix)."""
    return decompressed(storage.open_read(path), path)


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
    for path in shard.paths:
        try:
            yield from _read_file(path, shard.fmt, cfg, shard.start, shard.end)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            yield bad(path, "unreadable file", str(e))
        except STREAM_ERRORS as e:
            yield bad(f"{path}:end", "truncated or corrupt input", str(e))


def _read_file(path: str, fmt: str, cfg: CurateConfig, start: int, end: int) -> Iterator[dict]:
    """The documents of one file, or of the range [start, end) of it; the path names them."""
    if fmt == "html":
        yield from _read_html_file(path, RECORD_BYTES_PER_CHAR * cfg.max_doc_chars)
    elif fmt == "warc":
        from scratchlm.curate.warc import read_warc

        yield from read_warc(path, path, start, end, RECORD_BYTES_PER_CHAR * cfg.max_doc_chars)
    elif fmt == "jsonl" and ranges.splittable(path, "jsonl"):
        yield from _read_jsonl_range(path, path, cfg, start, end)
    elif fmt == "parquet":
        yield from _read_parquet(path, path, cfg, start, end)
    elif fmt == "jsonl":
        yield from _read_jsonl(path, path, cfg)
    else:
        yield from _read_text(path, path, cfg)


def _sniffed(path: str, source: str) -> tuple[io.BufferedReader | None, dict | None]:
    """The decompressed bytes of a file, or None and a bad record when they look binary."""
    stream = open_binary(path)
    buffered = io.BufferedReader(stream) if not isinstance(stream, io.BufferedReader) else stream
    head = buffered.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]
    if looks_binary(head):
        buffered.close()
        return None, bad(source, "binary file", "", 1.0)
    return buffered, None


def _read_text(path: str, source: str, cfg: CurateConfig) -> Iterator[dict]:
    stream, rejected = _sniffed(path, source)
    if stream is None:
        yield rejected  # type: ignore[misc]
        return
    with io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="") as text_io:
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
    stream, rejected = _sniffed(path, source)
    if stream is None:
        yield rejected  # type: ignore[misc]
        return
    with stream:
        lines = bounded_lines(stream, RECORD_BYTES_PER_CHAR * cfg.max_doc_chars)
        for lineno, (_, raw, length) in enumerate(lines, start=1):
            doc = _record(raw, length, f"{source}:{lineno}", source, cfg)
            if doc is not None:
                yield doc


def _read_jsonl_range(
    path: str, source: str, cfg: CurateConfig, start: int, end: int
) -> Iterator[dict]:
    """The records of an uncompressed JSON Lines file that start in [start, end); their fallback
    ids are byte offsets (a range does not know its line numbers)."""
    with storage.open_read(path) as raw_file:
        f = raw_file if isinstance(raw_file, io.BufferedReader) else io.BufferedReader(raw_file)
        if looks_binary(f.read(BINARY_SNIFF_BYTES)):
            if start == 0:
                yield bad(source, "binary file", "", 1.0)
            return
        first = ranges.first_line_start(f, start)
        f.seek(first)
        for offset, raw, length in bounded_lines(f, RECORD_BYTES_PER_CHAR * cfg.max_doc_chars):
            if 0 <= end <= first + offset:
                return
            doc = _record(raw, length, f"{source}@{first + offset}", source, cfg)
            if doc is not None:
                yield doc


def _record(
    raw: bytes | None, length: int, doc_id: str, source: str, cfg: CurateConfig
) -> dict | None:
    """The document of one JSON Lines record (raw None: a line too long, dropped unread), a bad
    record with its reason, or None for a blank line."""
    if raw is None:
        return bad(doc_id, "record too long", "", float(length))
    line = raw.decode("utf-8", errors="replace")
    if not line.strip():
        return None
    try:
        obj = parse_json(line)
    except NestedTooDeep:
        return bad(doc_id, "json nested too deeply", line)
    except ValueError:
        return bad(doc_id, "invalid json", line)
    return _doc_from_record(obj, doc_id, source, cfg, line)


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


def _read_html_file(path: str, max_bytes: int) -> Iterator[dict]:
    source = path
    try:
        with open_binary(path) as f:
            body = f.read(max_bytes + 1)
    except STREAM_ERRORS as e:
        yield bad(source, "truncated or corrupt input", str(e))
        return
    if len(body) > max_bytes:
        yield bad(source, "record too long", "", float(len(body)))
        return
    if looks_binary(body[:BINARY_SNIFF_BYTES]):
        yield bad(source, "binary file", "", 1.0)
        return
    yield {"id": source, "text": decode_html(body), "meta": {"source": source, "format": "html"}}
