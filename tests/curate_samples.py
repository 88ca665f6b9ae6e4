"""Hand-made documents shared by the curation tests."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

GOOD_PARAGRAPH = (
    "The river runs through the old town and past the mill. People walk along the bank in the "
    "evening to watch the boats. The bakery near the bridge sells bread that is still warm. "
    "Children play in the park while their parents talk with the neighbours. In the summer there "
    "is a market with fruit and flowers from the farms in the valley. Many visitors come to see "
    "the church, which is more than five hundred years old and has a tall tower with a clock."
)


def story(i: int) -> str:
    """A distinct clean English document of about 100 words."""
    return f"Story number {i} begins here. " + GOOD_PARAGRAPH.replace("river", f"river {i}")


def write_jsonl(path: Path, records: list, compress: str = "") -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_warc(path: Path, pages: list[tuple[str, bytes, str]], gzip: bool = True) -> Path:
    """A WARC of HTTP responses (url, body, content type), gzipped per record by default."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gzip)
        for url, body, content_type in pages:
            headers = StatusAndHeaders(
                "200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1"
            )
            record = writer.create_warc_record(
                url, "response", payload=io.BytesIO(body), length=len(body), http_headers=headers
            )
            writer.write_record(record)
    return path


def html_page(body_text: str) -> str:
    return (
        "<html><head><title>t</title></head><body><nav><a href='/'>Home</a> | <a href='/x'>About"
        f"</a></nav><article><p>{body_text}</p></article><footer>Copyright 2024</footer>"
        "</body></html>"
    )
