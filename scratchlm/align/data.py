"""Reading chat and preference files: every record validated, every bad one set aside with why.

    chat = read_chat(["data/instruct/rasbt_instruction_data.json.gz"])
    chat.records      [{"messages": [...]}, ...]
    chat.rejects      [Reject(source="file:12", reason="empty assistant turn", record={...}), ...]
    train, val = split_validation(chat.records, 0.1)

Files are JSON Lines (.jsonl) or one JSON array (.json), plain or compressed (.gz, .zst); a folder
stands for the files in it. The layouts formats.py knows may be mixed. A line that is not JSON, is
nested too deeply or too long, a record that fits no layout or breaks the rules, and the end of a
file cut short, each become a Reject; nothing raises on bad data. A file that does not exist is a
UserError (a mistake in the recipe, not in the data).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scratchlm.align.formats import BadRecord, Message, to_chat, to_preference
from scratchlm.curate.streams import (
    STREAM_ERRORS,
    NestedTooDeep,
    bounded_lines,
    decompressed,
    parse_json,
)
from scratchlm.errors import UserError
from scratchlm.paths import resolve

Kind = Literal["chat", "preference"]
SUFFIXES = (".jsonl", ".json")
MAX_LINE_BYTES = 64 * 2**20
"""A JSON Lines record longer than this is set aside unread (`record too long`)."""


@dataclass
class Reject:
    source: str
    """file:line (a JSON array counts its records from 1 as lines)."""
    reason: str
    record: Any


@dataclass
class Dataset:
    kind: Kind
    records: list[dict] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    """The record's file:line, beside each record."""

    def reject_counts(self) -> dict[str, int]:
        """Rejects per reason, the reason's variable part (a role, a length) left out."""
        return dict(Counter(reason_kind(r.reason) for r in self.rejects).most_common())

    def describe(self) -> str:
        """'1,100 records, 3 set aside (2 empty turn, 1 malformed JSON)'."""
        text = f"{len(self.records):,} {self.kind} records"
        if self.rejects:
            reasons = ", ".join(f"{n} {why}" for why, n in self.reject_counts().items())
            text += f", {len(self.rejects):,} set aside ({reasons})"
        return text


def reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0].split(" '")[0].strip()


def data_files(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for given in paths:
        path = resolve(given)
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*") if p.is_file() and _base_suffix(p) in SUFFIXES
            )
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"data file not found: {given}")
    return files


def _base_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def raw_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, record, None) per record of a file, or (line, raw text, reason) when it is not JSON
    (or when the file ends early: the line after the last one read).

    A .json file holds one array (or one object); when it does not parse as a whole it is read as
    JSON Lines, which many .json files really are."""
    with decompressed(open(path, "rb"), path.name) as stream:
        if _base_suffix(path) != ".json":
            yield from _line_records(stream)
            return
        chunks: list[bytes] = []
        cut = None
        try:
            while chunk := stream.read(1 << 20):
                chunks.append(chunk)
        except STREAM_ERRORS as e:
            cut = f"truncated or corrupt file: {e}"
        data = b"".join(chunks)
    try:
        whole = None if cut else parse_json(data)
    except ValueError:  # NestedTooDeep included: the lines may still be records
        whole = None
    if whole is not None:
        items = whole if isinstance(whole, list) else [whole]
        for i, item in enumerate(items, 1):
            yield i, item, None
        return
    yield from _line_records(io.BytesIO(data), cut)


def _line_records(
    stream: io.BufferedIOBase, cut: str | None = None
) -> Iterator[tuple[int, Any, str | None]]:
    """The records of a JSON Lines stream; `cut`: why the stream ended early, if it did."""
    line = 0
    try:
        for line, (_, raw, length) in enumerate(bounded_lines(stream, MAX_LINE_BYTES), 1):
            if raw is None:
                yield line, "", f"record too long ({length:,} bytes)"
                continue
            text = raw.decode("utf-8", errors="replace")
            if not text.strip():
                continue
            try:
                yield line, parse_json(text), None
            except NestedTooDeep as e:
                yield line, text[:1000], f"JSON nested too deeply ({e})"
            except ValueError as e:
                yield line, text[:1000], f"malformed JSON: {getattr(e, 'msg', e)}"
    except STREAM_ERRORS as e:
        cut = f"truncated or corrupt file: {e}"
    if cut:
        yield line + 1, "", cut


def read_records(paths: list[str | Path], kind: Kind) -> Dataset:
    """Every record of the files in the form of `kind`; bad ones set aside with their reason."""
    convert: Callable[[Any], dict] = to_chat if kind == "chat" else to_preference
    dataset = Dataset(kind)
    for path in data_files(paths):
        for line, record, error in raw_records(path):
            source = f"{path}:{line}"
            if error is None:
                try:
                    dataset.records.append(convert(record))
                    dataset.sources.append(source)
                    continue
                except BadRecord as e:
                    error = str(e)
            dataset.rejects.append(Reject(source, error, record))
    return dataset


def read_chat(paths: list[str | Path]) -> Dataset:
    """Chat records {"messages": [...]} from files in any chat (or preference) layout."""
    return read_records(paths, "chat")


def read_preferences(paths: list[str | Path]) -> Dataset:
    """Preference records {"prompt", "chosen", "rejected"} from files in any preference layout."""
    return read_records(paths, "preference")


def prompt_of(messages: list[Message]) -> list[Message]:
    """The conversation up to, not including, its last assistant turn: what a policy answers."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return messages[:i]
    return list(messages)


def read_prompts(paths: list[str | Path]) -> Dataset:
    """Prompts {"prompt": messages} from chat files (each conversation up to its last assistant
    turn) or preference files (their prompt). A chat whose last turn is the first message has no
    prompt and is set aside."""
    dataset = Dataset("chat")
    for path in data_files(paths):
        for line, record, error in raw_records(path):
            source = f"{path}:{line}"
            if error is None:
                try:
                    dataset.records.append({"prompt": _prompt_record(record)})
                    dataset.sources.append(source)
                    continue
                except BadRecord as e:
                    error = str(e)
            dataset.rejects.append(Reject(source, error, record))
    return dataset


def _prompt_record(record: Any) -> list[Message]:
    if isinstance(record, dict) and "chosen" in record and "rejected" in record:
        return to_preference(record)["prompt"]
    prompt = prompt_of(to_chat(record)["messages"])
    if not prompt:
        raise BadRecord("no prompt before the assistant turn")
    return prompt


def record_prompt(record: dict) -> list[Message]:
    """The prompt of a chat, preference or prompt record."""
    if "prompt" in record:
        return record["prompt"]
    return prompt_of(record["messages"])


def validation_bucket(record: dict) -> float:
    """A number in [0, 1) fixed by the record's prompt alone. A record is held out when its bucket
    is below the validation fraction, so the split does not depend on file order, the same
    prompt is never on both sides, and a smaller fraction's validation set lies inside a larger's
    (SFT holding out as much as the reward model keeps the reward model's pairs unseen)."""
    key = json.dumps(record_prompt(record), sort_keys=True, ensure_ascii=False)
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_validation(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation): records whose validation_bucket is below `fraction` are held out."""
    if not 0 <= fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {fraction}")
    train, val = [], []
    for record in records:
        (val if validation_bucket(record) < fraction else train).append(record)
    return train, val


def write_rejects(rejects: list[Reject], folder: Path) -> Path | None:
    """The rejects as folder/rejected.jsonl (source, reason, record) for audit; None if none."""
    if not rejects:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rejected.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in rejects:
            row = {"source": r.source, "reason": r.reason, "record": r.record}
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return path
