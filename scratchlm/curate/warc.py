"""WARC and WET records to documents (warcio does the record framing and per-record gzip)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from scratchlm.curate import ranges, storage
from scratchlm.curate.readers import bad, decode_html

_CHARSET = re.compile(r"charset=([A-Za-z0-9_\-:.]+)", re.I)


def _charset(content_type: str | None) -> str | None:
    m = _CHARSET.search(content_type or "")
    return m.group(1) if m else None


def read_warc(
    path: str, source: str, start: int = 0, end: int = -1, max_bytes: int = -1
) -> Iterator[dict]:
    """HTML responses (to be extracted by the html step) and WET conversion records (plain text)
    of the records that start in [start, end) (-1: to the end of the file). A body longer than
    max_bytes (-1: no limit) is a bad record, `record too long`, and is not held in memory.

    Other records (requests, metadata, images...) are not documents and are passed over. A file
    that ends early or breaks the WARC framing yields a bad record and ends the shard there.
    """
    from warcio.archiveiterator import ArchiveIterator

    offset = start
    with storage.open_read(path) as raw:
        try:
            first = ranges.first_warc_record(raw, start, path.lower().endswith(".gz"))
            if first is None:
                return
            raw.seek(first)
            it = ArchiveIterator(raw)
            for record in it:
                doc = _record_document(record, source, max_bytes)
                # Only after the record is read: get_record_offset() skips the rest of it. The
                # offset is the file's (warcio starts from the stream's position).
                offset = it.get_record_offset()
                if 0 <= end <= offset:
                    return
                if doc is not None:
                    doc["id"] = f"{source}@{offset}"
                    yield doc
        # warcio raises a range of errors on broken input (ArchiveLoadFailed, EOFError, zlib and
        # ValueError from header parsing); every one means the rest of the file is unreadable.
        except Exception as e:  # noqa: BLE001
            yield bad(
                f"{source}@{offset}:end", "truncated or corrupt warc", f"{type(e).__name__}: {e}"
            )


def _cut_short(record) -> bool:
    """Whether the file ended before the record's declared Content-Length (warcio does not say)."""
    return getattr(record.raw_stream, "limit", 0) > 0


def _body(record, max_bytes: int) -> bytes | None:
    """The record's content, or None when it is longer than max_bytes (read no further: warcio
    skips the rest in small blocks on its way to the next record)."""
    if max_bytes < 0:
        return record.content_stream().read()
    body = record.content_stream().read(max_bytes + 1)
    return None if len(body) > max_bytes else body


def _record_document(record, source: str, max_bytes: int) -> dict | None:
    url = record.rec_headers.get_header("WARC-Target-URI") or ""
    meta = {"source": source, "url": url}
    if record.rec_type == "conversion":
        body = _body(record, max_bytes)
        if body is None:
            return bad("", "record too long", "", float(record.length or 0))
        if _cut_short(record):
            return bad("", "truncated or corrupt warc", body.decode("utf-8", errors="replace"))
        return {"id": "", "text": body.decode("utf-8", errors="replace"), "meta": meta}
    if record.rec_type != "response" or record.http_headers is None:
        return None
    content_type = record.http_headers.get_header("Content-Type") or ""
    if "html" not in content_type.lower():
        return None
    body = _body(record, max_bytes)
    if body is None:
        return bad("", "record too long", "", float(record.length or 0))
    if _cut_short(record):
        return bad("", "truncated or corrupt warc", body.decode("utf-8", errors="replace"))
    meta["format"] = "html"
    return {"id": "", "text": decode_html(body, _charset(content_type)), "meta": meta}
