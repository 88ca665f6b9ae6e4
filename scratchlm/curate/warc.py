"""WARC and WET records to documents (warcio does the record framing and per-record gzip)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from scratchlm.curate.readers import bad, decode_html

_CHARSET = re.compile(r"charset=([A-Za-z0-9_\-:.]+)", re.I)


def _charset(content_type: str | None) -> str | None:
    m = _CHARSET.search(content_type or "")
    return m.group(1) if m else None


def read_warc(path: Path, source: str) -> Iterator[dict]:
    """HTML responses (to be extracted by the html step) and WET conversion records (plain text).

    Other records (requests, metadata, images...) are not documents and are passed over. A file
    that ends early or breaks the WARC framing yields a bad record and ends the shard there.
    """
    from warcio.archiveiterator import ArchiveIterator

    offset = 0
    with open(path, "rb") as raw:
        try:
            it = ArchiveIterator(raw)
            for record in it:
                doc = _record_document(record, source)
                # Only after the record is read: get_record_offset() skips the rest of it.
                offset = it.get_record_offset()
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


def _record_document(record, source: str) -> dict | None:
    url = record.rec_headers.get_header("WARC-Target-URI") or ""
    meta = {"source": source, "url": url}
    if record.rec_type == "conversion":
        body = record.content_stream().read()
        if _cut_short(record):
            return bad("", "truncated or corrupt warc", body.decode("utf-8", errors="replace"))
        return {"id": "", "text": body.decode("utf-8", errors="replace"), "meta": meta}
    if record.rec_type != "response" or record.http_headers is None:
        return None
    content_type = record.http_headers.get_header("Content-Type") or ""
    if "html" not in content_type.lower():
        return None
    body = record.content_stream().read()
    if _cut_short(record):
        return bad("", "truncated or corrupt warc", body.decode("utf-8", errors="replace"))
    meta["format"] = "html"
    return {"id": "", "text": decode_html(body, _charset(content_type)), "meta": meta}
