"""Reading files that may be damaged: decompression that notices a cut, lines of bounded length,
JSON of bounded nesting.

Shared by the curation readers and the alignment data readers, which both take files from
outside: a file cut short, a line of hundreds of megabytes or a record nested a hundred thousand
levels deep must become one record set aside with its reason, never an exception that stops the
run, nor memory that grows with the damage.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import IO, Any

import zstandard

# A stream that ends early or holds garbage raises one of these from the decompressor.
STREAM_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)
MAX_JSON_DEPTH = 100
"""Records nested deeper than this are set aside: Python's parser would otherwise raise
RecursionError at a depth that depends on the caller's stack (about 1,000 levels)."""
LINE_PIECE_BYTES = 1 << 20
"""An over-long line is read and dropped in pieces of this size."""

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # the low 4 bits are free


def decompressed(raw: IO[bytes], name: str) -> IO[bytes]:
    """The bytes of `raw`, decompressed by the suffix of `name` (.gz, .zst, else as they are).

    A compressed stream that ends early raises EOFError (or another of STREAM_ERRORS) when the
    reader gets there, after the bytes before the cut; no read holds more than it asks for, so a
    small file that decompresses to gigabytes costs no more memory than a large one.
    """
    suffix = PurePosixPath(name).suffix.lower()
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if suffix == ".zst":
        return io.BufferedReader(_ZstdReader(raw))
    return raw


class _ZstdFrames(io.RawIOBase):
    """The compressed bytes of a zstd file as they are read, with its frames followed (magic,
    header, block headers, checksum) so that `complete` says whether the bytes read so far end on
    a frame boundary. zstandard's stream_reader ends quietly in the middle of a frame."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.state = "magic"
        self.want = 4  # bytes of the field being collected
        self.field = b""
        self.skip = 0  # bytes to pass over (block contents, skippable frames)
        self.checksum = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        self._follow(data)
        buffer[: len(data)] = data
        return len(data)

    def complete(self) -> bool:
        return self.state == "magic" and not self.field and not self.skip

    def _follow(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if self.skip:
                n = min(self.skip, len(data) - pos)
                self.skip -= n
                pos += n
                continue
            take = min(self.want - len(self.field), len(data) - pos)
            self.field += data[pos : pos + take]
            pos += take
            if len(self.field) == self.want:
                field, self.field = self.field, b""
                self._on_field(int.from_bytes(field, "little"))

    def _on_field(self, value: int) -> None:
        if self.state == "magic":
            if value == _ZSTD_MAGIC:
                self.state, self.want = "descriptor", 1
            elif value & 0xFFFFFFF0 == _SKIPPABLE_MAGIC:
                self.state, self.want = "skippable", 4
            else:
                raise zstandard.ZstdError("not a zstd frame")
        elif self.state == "descriptor":
            size_flag, single_segment = value >> 6, value >> 5 & 1
            self.checksum = bool(value >> 2 & 1)
            content_size = (1 if single_segment else 0, 2, 4, 8)[size_flag]
            self.skip = (0 if single_segment else 1) + (0, 1, 2, 4)[value & 3] + content_size
            self.state, self.want = "block", 3
        elif self.state == "block":
            last, kind, size = value & 1, value >> 1 & 3, value >> 3
            if kind == 3:
                raise zstandard.ZstdError("reserved zstd block type")
            self.skip = 1 if kind == 1 else size  # an RLE block holds one byte
            if last:
                self.skip += 4 if self.checksum else 0
                self.state, self.want = "magic", 4
        elif self.state == "skippable":
            self.skip = value
            self.state, self.want = "magic", 4

    def close(self) -> None:
        self.raw.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a zstd file of one or more frames, each read bounded by the buffer
    it fills. Unlike zstandard's stream_reader alone, a file that ends inside a frame raises
    EOFError instead of ending quietly."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.frames = _ZstdFrames(raw)
        self.reader = zstandard.ZstdDecompressor().stream_reader(
            self.frames, read_across_frames=True
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.reader.readinto(buffer)
        if n == 0 and not self.frames.complete():
            raise EOFError("zstd stream ended in the middle of a frame")
        return n

    def close(self) -> None:
        self.reader.close()
        self.frames.close()
        super().close()


def bounded_lines(stream: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(offset, line, length) for each line of a binary stream, from where it stands: offset
    counts bytes from there, line keeps its newline. A line longer than `limit` bytes comes out as
    None: it is read in pieces and dropped, so memory does not grow with a line's length."""
    offset = 0
    while True:
        pieces: list[bytes] = []
        held = 0
        while True:
            piece = stream.readline(LINE_PIECE_BYTES)
            if not piece:
                break
            held += len(piece)
            if held <= limit:
                pieces.append(piece)
            else:
                pieces.clear()
            if piece.endswith(b"\n"):
                break
        if not held:
            return
        yield offset, (b"".join(pieces) if held <= limit else None), held
        offset += held


class NestedTooDeep(ValueError):
    """A JSON value nested more than MAX_JSON_DEPTH levels."""


def parse_json(text: str | bytes) -> Any:
    """json.loads, with NestedTooDeep for a value nested more than MAX_JSON_DEPTH levels, whether
    or not the parser reached Python's recursion limit (where it stops depends on how deep the
    caller's stack is, so the check is made on the result as well). A leading byte order mark is
    ignored; a lone surrogate escape ("\\ud800", which no UTF-8 writer can encode) becomes
    U+FFFD, as invalid bytes do."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        value = json.loads(text.lstrip("\ufeff"))
    except RecursionError:
        raise NestedTooDeep(f"nested more than {MAX_JSON_DEPTH} levels") from None
    if _nested_deeper_than(value, MAX_JSON_DEPTH):
        raise NestedTooDeep(f"nested more than {MAX_JSON_DEPTH} levels")
    return _without_surrogates(value) if _SURROGATE_ESCAPE.search(text) else value


def _without_surrogates(value: Any) -> Any:
    """value with every surrogate code point in its strings replaced by U+FFFD (recursion is
    safe: the value is at most MAX_JSON_DEPTH deep)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    return value


def _nested_deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False
