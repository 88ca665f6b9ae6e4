"""Reading benchmark files: JSON Lines (plain or gzip) and plain text, with layout checks.

A task names the file it reads relative to a data folder (data/eval holds small bundled subsets;
the full files keep the same names and layout). A missing file, a line that is not JSON or a
record without the fields a task needs is a UserError that names the file and what it expects.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError
from scratchlm.paths import resolve

DEFAULT_DATA_DIR = "data/eval"


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise UserError(f"evaluation data not found: {path}")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file; blank lines are skipped."""
    records = []
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}: line {number} is not JSON") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}: line {number} is not a JSON object")
                records.append(record)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return records


def read_paragraphs(path: Path) -> list[str]:
    """A text file as documents separated by blank lines (empty ones dropped), the way the
    `datasets` text loader reads it with sample_by="paragraph"."""
    try:
        with _open_text(path) as f:
            text = f.read()  # universal newlines: \r\n and \r read as \n, as `datasets` does
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return [p for p in text.split("\n\n") if p]


def check_fields(
    records: Iterable[dict[str, Any]], fields: Iterable[str], path: Path, task: str
) -> None:
    """A UserError naming the first record that lacks one of `fields`."""
    fields = list(fields)
    for number, record in enumerate(records, 1):
        missing = [f for f in fields if f not in record]
        if missing:
            raise UserError(
                f"{path}: record {number} has no {', '.join(missing)}; the {task} task reads "
                f"records with the fields {', '.join(fields)} (this one has "
                f"{', '.join(sorted(record)) or 'none'})"
            )


def data_path(data_dir: str | Path, name: str) -> Path:
    """A file or folder of the data folder (relative folders are looked up like recipe paths)."""
    return resolve(Path(data_dir)) / name
