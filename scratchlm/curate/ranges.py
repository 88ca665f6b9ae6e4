"""Splitting one large file into byte ranges that tasks read independently, at record boundaries.

A range [start, end) owns every record that *starts* inside it; its reader finds the first record
boundary at or after `start` and reads on past `end` to finish its last record. The planner only
needs file sizes, so planning a run of any size reads no data.

Splittable: uncompressed JSON Lines (a record starts after a newline), uncompressed WARC/WET (a
record starts with a WARC/1.x header line after a blank line, checked by parsing its header and
finding the next record where its Content-Length says), WARC/WET compressed per record as Common
Crawl's are (a gzip member that decompresses to a WARC header), and Parquet (by row groups).
Other compressed files are one stream that must be read from its start: one range.
"""

from __future__ import annotations

import re
import zlib

from scratchlm.curate import storage

SCAN_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_HEADER = re.compile(rb"\r\n\r\n(WARC/1\.[01]\r\n)")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


def byte_ranges(size: int, shard_bytes: int) -> list[tuple[int, int]]:
    if shard_bytes <= 0 or size <= shard_bytes:
        return [(0, -1)]
    n = -(-size // shard_bytes)
    return [(i * shard_bytes, (i + 1) * shard_bytes if i < n - 1 else -1) for i in range(n)]


def splittable(path: str, fmt: str) -> bool:
    suffix = path.rsplit(".", 1)[-1].lower()
    if fmt == "jsonl":
        return suffix in ("jsonl", "ndjson")
    if fmt == "warc":
        return suffix in ("warc", "wet") or (suffix == "gz" and _gzip_per_record(path))
    return False


def _gzip_per_record(path: str) -> bool:
    """Whether the first gzip member ends before the file does (one member per record)."""
    with storage.open_read(path) as f:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while not d.eof:
            chunk = f.read(1 << 16)
            if not chunk:
                return False
            d.decompress(chunk)
        rest = d.unused_data or f.read(len(GZIP_MAGIC))
        return rest.startswith(GZIP_MAGIC)


def first_line_start(f, start: int) -> int:
    """The offset of the first line that starts at or after `start` (f: a seekable binary file)."""
    if start == 0:
        return 0
    f.seek(start - 1)
    offset = start - 1
    while True:  # in pieces: the line may be hundreds of megabytes long
        piece = f.readline(SCAN_BYTES)
        offset += len(piece)
        if not piece or piece.endswith(b"\n"):
            return offset


def first_warc_record(f, start: int, gzipped: bool) -> int | None:
    """The offset of the first WARC record at or after `start`, or None when there is none."""
    if start == 0:
        return 0
    at = start
    while True:
        # An uncompressed record header follows the blank line that ends the record before it.
        base = at if gzipped else max(0, at - 4)
        f.seek(base)
        block = f.read(at - base + SCAN_BYTES + 64)
        if len(block) <= at - base:
            return None
        pattern = (
            (m.start() for m in re.finditer(re.escape(GZIP_MAGIC), block))
            if gzipped
            else (m.start(1) for m in _WARC_HEADER.finditer(block))
        )
        for offset in pattern:
            if base + offset < at:
                continue
            if base + offset >= at + SCAN_BYTES:
                break
            if _is_record_start(f, base + offset, gzipped):
                return base + offset
        at += SCAN_BYTES


def _is_record_start(f, offset: int, gzipped: bool) -> bool:
    f.seek(offset)
    if gzipped:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            head = d.decompress(f.read(1 << 14), 64)
        except zlib.error:
            return False
        return head.startswith(b"WARC/1.")
    head = f.read(1 << 16)
    end = head.find(b"\r\n\r\n")
    length = _CONTENT_LENGTH.search(head[: end + 2]) if end > 0 else None
    if not head.startswith(b"WARC/1.") or length is None:
        return False
    # A header-like line inside a record's content is not a boundary: a true record ends where
    # its Content-Length says, at the next record's header or at the end of the file.
    f.seek(offset + end + 4 + int(length.group(1)))
    after = f.read(4 + 8).lstrip(b"\r\n")
    return after == b"" or after.startswith(b"WARC/1.")
