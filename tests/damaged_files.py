"""Damaged input files for the fuzz tests: each kind of damage as a function of a seeded random
generator and the good records it damages.

make(kind, rng, good, fields) returns (suffix, bytes): `good()` makes one valid record (a dict),
`fields` are the keys whose values the "wrong types" and "huge numbers" damage replaces.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable

import zstandard

Record = Callable[[], dict]

WRONG_VALUES = [
    None,
    0,
    -1,
    1.5,
    True,
    [],
    {},
    [1, 2],
    "",
    " ",
    "\ud800 a lone surrogate",
    [[]],
    {"a": {"b": []}},
    {"role": 5},
    [{"role": "user", "content": 5}],
    [{"role": ["user"], "content": "hi"}],
    [{"from": ["gpt"], "value": "x"}],
    [{"from": {"a": 1}, "value": "x"}],
    [{"role": "assistant", "content": None}],
    "\n\nHuman: hi\n\nAssistant:",
]
HUGE_NUMBERS = ["1e400", "-1e999", "9" * 5000, "NaN", "Infinity", "-Infinity", "1" * 300]


def _lines(rng: random.Random, good: Record, n: int) -> list[str]:
    return [json.dumps(good(), ensure_ascii=rng.random() < 0.5) for _ in range(n)]


def _join(lines: list[str], end: str = "\n") -> bytes:
    return (end.join(lines) + end).encode("utf-8", errors="surrogatepass")


def _compress(data: bytes, how: str) -> bytes:
    if how == "gz":
        return gzip.compress(data)
    if how == "zst":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    return data


def truncated(rng: random.Random, good: Record, how: str) -> bytes:
    whole = _compress(_join(_lines(rng, good, rng.randint(2, 30))), how)
    return whole[: rng.randint(1, len(whole) - 1)]


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(1, 3000))


def invalid_utf8(rng: random.Random, good: Record) -> bytes:
    data = bytearray(_join(_lines(rng, good, rng.randint(1, 20))))
    for _ in range(rng.randint(1, 30)):
        data.insert(rng.randrange(len(data)), rng.choice([0x80, 0xC3, 0xFF, 0xFE, 0xED, 0xF4]))
    return bytes(data)


def nul_bytes(rng: random.Random, good: Record) -> bytes:
    data = bytearray(_join(_lines(rng, good, rng.randint(1, 20))))
    for _ in range(rng.randint(1, 10)):
        data.insert(rng.randrange(len(data)), 0)
    return bytes(data)


def deep_nesting(rng: random.Random, good: Record, fields: list[str]) -> bytes:
    lines = _lines(rng, good, rng.randint(0, 10))
    depth = rng.choice([101, 500, 999, 5000, 100_000])
    open_, close = rng.choice([("[", "]"), ('{"a": ', "}")])
    nested = open_ * depth + "1" + close * depth
    shapes = [nested, json.dumps({rng.choice(fields): "X"}).replace('"X"', nested)]
    lines.insert(rng.randint(0, len(lines)), rng.choice(shapes))
    return _join(lines)


def wrong_types(rng: random.Random, good: Record, fields: list[str]) -> bytes:
    records = [good() for _ in range(rng.randint(1, 20))]
    for record in rng.sample(records, rng.randint(1, len(records))):
        record[rng.choice(fields)] = rng.choice(WRONG_VALUES)
    lines = [json.dumps(r) for r in records] + [json.dumps(rng.choice(WRONG_VALUES))]
    return _join(lines)


def huge_numbers(rng: random.Random, good: Record, fields: list[str]) -> bytes:
    lines = []
    for _ in range(rng.randint(1, 10)):
        record = good()
        record[rng.choice([*fields, "id", "margin"])] = "HUGE"
        lines.append(json.dumps(record).replace('"HUGE"', rng.choice(HUGE_NUMBERS)))
    return _join(lines)


def empty(rng: random.Random) -> bytes:
    return rng.choice([b"", b"\n", b"\n\n  \n", b"\r\n", b" "])


def byte_order_marks(rng: random.Random, good: Record) -> bytes:
    lines = _lines(rng, good, rng.randint(1, 10))
    if rng.random() < 0.5:
        return b"\xef\xbb\xbf" + _join(lines)
    return _join(["\ufeff" + line for line in lines])


def line_ends(rng: random.Random, good: Record) -> bytes:
    """CRLF, lone CRs, blank lines, U+2028 and U+0085 inside strings, no final newline."""
    records = [good() for _ in range(rng.randint(1, 10))]
    for record in records:
        for key, value in record.items():
            if isinstance(value, str):
                record[key] = value + rng.choice(["\u2028", "\u0085", "\r", "\u2029 x"])
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    data = _join(lines, rng.choice(["\r\n", "\n\n", "\n"]))
    return data[:-1] if rng.random() < 0.5 else data


def long_line(rng: random.Random, good: Record, fields: list[str], limit: int) -> bytes:
    lines = _lines(rng, good, rng.randint(0, 5))
    record = good()
    record[rng.choice(fields)] = "y" * rng.randint(limit, 3 * limit)
    lines.insert(rng.randint(0, len(lines)), json.dumps(record))
    return _join(lines)


def make(
    kind: str, rng: random.Random, good: Record, fields: list[str], long_limit: int
) -> tuple[str, bytes]:
    """A damaged JSON Lines file of `kind`: (suffix, bytes)."""
    compress = rng.choice(["", "", "gz", "zst"])
    if kind == "truncated gzip":
        return ".jsonl.gz", truncated(rng, good, "gz")
    if kind == "truncated zstd":
        return ".jsonl.zst", truncated(rng, good, "zst")
    if kind == "random bytes":
        return rng.choice([".jsonl", ".jsonl.gz", ".jsonl.zst", ".json"]), random_bytes(rng)
    data = {
        "invalid utf-8": lambda: invalid_utf8(rng, good),
        "nul bytes": lambda: nul_bytes(rng, good),
        "deep nesting": lambda: deep_nesting(rng, good, fields),
        "wrong types": lambda: wrong_types(rng, good, fields),
        "huge numbers": lambda: huge_numbers(rng, good, fields),
        "empty": lambda: empty(rng),
        "byte order marks": lambda: byte_order_marks(rng, good),
        "line ends": lambda: line_ends(rng, good),
        "long line": lambda: long_line(rng, good, fields, long_limit),
    }[kind]()
    return ".jsonl" + (f".{compress}" if compress else ""), _compress(data, compress)


JSONL_KINDS = [
    "truncated gzip",
    "truncated zstd",
    "random bytes",
    "invalid utf-8",
    "nul bytes",
    "deep nesting",
    "wrong types",
    "huge numbers",
    "empty",
    "byte order marks",
    "line ends",
    "long line",
]
