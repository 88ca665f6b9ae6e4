"""Fuzz: damaged input files of every kind (seeded, so each run tries the same files) for the
curation readers and command, and for the alignment data readers.

Nothing may raise; every record read is kept or set aside with a reason (kept + set aside = read);
curate's command exits 0 with the bad records counted, or 2 with one line when nothing can be
read, leaving its output folder as it was.
"""

import gzip
import io
import json
import random
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from conftest import ROOT
from curate_samples import html_page, story, write_warc
from damaged_files import JSONL_KINDS, make

from scratchlm.align.data import (
    read_chat,
    read_preferences,
    read_prompts,
    reason_kind,
    write_rejects,
)
from scratchlm.curate.config import CurateConfig
from scratchlm.curate.pipeline import read_docs
from scratchlm.curate.readers import find_shards, looks_binary, read_shard

SEED = 20261207
PER_KIND = 6
MAX_DOC_CHARS = 20_000  # records over 120,000 bytes are "record too long"
CFG = CurateConfig(max_doc_chars=MAX_DOC_CHARS)
READ_REASONS = {
    "binary file",
    "invalid json",
    "json nested too deeply",
    "record too long",
    "not a json object",
    "missing text field 'text'",
    "truncated or corrupt input",
    "truncated or corrupt warc",
    "unreadable parquet",
    "document too long",
}
WORDS = "the cat sat on a mat and then the dog ran to the big red house".split()


def words(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def decompress(data: bytes, suffix: str) -> bytes | None:
    """The bytes a reader sees, or None when the file does not decompress."""
    try:
        if suffix.endswith(".gz"):
            return gzip.decompress(data)
        if suffix.endswith(".zst"):
            return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    except (OSError, EOFError, zlib.error, zstandard.ZstdError):
        return None
    return data


def nonblank_lines(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.decode("utf-8", "replace").strip())


def text_files(rng: random.Random, scratch: Path) -> list[tuple[str, bytes]]:
    """Damaged plain-text, WARC and Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for _ in range(PER_KIND):
        good = story(rng.randrange(1000)).encode()
        files += [
            (".txt", rng.randbytes(rng.randint(1, 2000))),
            (".txt", good.replace(b" ", b"\xff\x00", rng.randint(1, 5))),
            (".txt", rng.choice([b"", b"\n", b"\xef\xbb\xbf"])),
            (".txt.gz", gzip.compress(good)[: rng.randint(1, 60)]),
        ]
    for i in range(3):
        pages = [(f"http://x/{j}", html_page(story(j)).encode(), "text/html") for j in range(4)]
        warc = write_warc(scratch / f"{i}.warc", pages, gzip=False).read_bytes()
        at = rng.randrange(len(warc) // 3, len(warc))
        files += [
            (".warc", warc[:at]),  # cut
            (".warc", warc[:at] + b"WARC/1.0\r\nContent-Length: x\r\n\r\n" + warc[at:]),
            (".warc", warc.replace(b"Content-Length: ", b"Content-Length: 9", 2)),
        ]
    for table in (
        pa.table({"body": ["a", "b"]}),  # no text column
        pa.table({"text": [1, 2, 3]}),  # text of the wrong type
        pa.table({"text": [story(1), None]}),
    ):
        sink = io.BytesIO()
        pq.write_table(table, sink)
        files.append((".parquet", sink.getvalue()))
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": [story(i) for i in range(50)]}), sink)
    files += [(".parquet", sink.getvalue()[: rng.randint(10, 2000)]), (".parquet", b"PAR1")]
    return files


@pytest.fixture(scope="module")
def curate_inputs(tmp_path_factory) -> tuple[Path, dict[str, list[Path]]]:
    rng = random.Random(SEED)
    root = tmp_path_factory.mktemp("damaged")
    folder = root / "in"
    folder.mkdir()
    by_kind: dict[str, list[Path]] = {}

    def good() -> dict:
        return {"text": story(rng.randrange(10_000)), "meta": {"n": rng.randrange(9)}}

    for kind in JSONL_KINDS:
        for i in range(PER_KIND):
            suffix, data = make(kind, rng, good, ["text", "meta", "id"], 6 * MAX_DOC_CHARS)
            suffix = ".jsonl" if suffix == ".json" else suffix  # .json is not a curate input
            path = folder / f"{kind.replace(' ', '_')}-{i}{suffix}"
            path.write_bytes(data)
            by_kind.setdefault(kind, []).append(path)
    for i, (suffix, data) in enumerate(text_files(rng, root)):
        path = folder / f"other-{i}{suffix}"
        path.write_bytes(data)
        by_kind.setdefault(f"damaged {suffix}", []).append(path)
    return folder, by_kind


def read_file(path: Path) -> list[dict]:
    shards, _ = find_shards([str(path)], CFG.shard_bytes)
    return [d for s in shards for d in read_shard(s, CFG)]


def test_curate_readers_account_for_every_record_of_damaged_files(curate_inputs):
    _, by_kind = curate_inputs
    for kind, paths in by_kind.items():
        for path in paths:
            docs = read_file(path)
            reasons = [d["reason"] for d in docs if "reason" in d]
            assert set(reasons) <= READ_REASONS, (path, reasons)
            for doc in docs:
                assert isinstance(doc["text"], str) and isinstance(doc["id"], str), path
                assert isinstance(doc["meta"], dict), path
            if kind.startswith("truncated"):
                assert "truncated or corrupt input" in reasons, path
            data = decompress(path.read_bytes(), path.name)
            if ".jsonl" in path.name and data is not None and not kind.startswith("truncated"):
                binary = looks_binary(data[:8192])
                assert len(docs) == (1 if binary else nonblank_lines(data)), path
            if path.name.endswith((".txt", ".txt.gz")):
                assert len(docs) == 1, path


def test_curate_command_counts_damaged_files_and_keeps_the_rest(curate_inputs, tmp_path):
    folder, by_kind = curate_inputs
    read = {p: len(read_file(p)) for paths in by_kind.values() for p in paths}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scratchlm", "curate", str(folder), "--out", str(out)]
    settings = ["--set", f"curate.max_doc_chars={MAX_DOC_CHARS}", "--set", "curate.workers=2"]
    result = subprocess.run(cmd + settings, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    stats = json.loads((out / "stats.json").read_text())
    steps = stats["steps"]
    assert steps[0]["docs_in"] == sum(read.values())
    removed = 0
    for before, after in zip(steps, steps[1:], strict=False):
        assert before["docs_out"] == after["docs_in"]
    for step in steps:
        assert step["docs_in"] - step["docs_out"] == step["docs_removed"]
        audit = [
            d for p in (out / "rejected" / step["step"]).glob("*.zst") for d in read_docs(str(p))
        ]
        assert len(audit) == step["docs_removed"], step["step"]
        removed += step["docs_removed"]
    kept = sum(1 for p in out.glob("part-*.jsonl.zst") for _ in read_docs(str(p)))
    assert kept == stats["output"]["docs"] > 0
    assert kept + removed == steps[0]["docs_in"]  # every record read is kept or set aside
    print(f"curate on {len(read)} damaged files: {steps[0]['docs_in']} records read, {kept} kept")
    print(json.dumps(stats["bad_input"]["reasons"], indent=1))
    print(json.dumps({k: len(v) for k, v in by_kind.items()}, indent=1))


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_curate_command_refuses_unusable_input_in_one_line(tmp_path):
    """Nothing readable: exit 2, one line, and an earlier run's output folder is left as it was."""
    out = tmp_path / "out"
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": story(1)}) + "\n")
    first = subprocess.run(
        [sys.executable, "-m", "scratchlm", "curate", str(good), "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert first.returncode == 0, first.stderr
    before = _snapshot(out)
    unusable = tmp_path / "unusable"
    unusable.mkdir()
    (unusable / "notes.pdf").write_bytes(b"%PDF")
    (unusable / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    (tmp_path / "a.docx").write_bytes(b"PK")
    for inputs in ([unusable], [tmp_path / "a.docx"], [tmp_path / "*.nothing"]):
        result = subprocess.run(
            [sys.executable, "-m", "scratchlm", "curate", *map(str, inputs), "--out", str(out)],
            capture_output=True,
            text=True,
            env=_env(),
        )
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: "), result.stderr
        assert _snapshot(out) == before


CHAT_FIELDS = ["messages"]
PREFERENCE_FIELDS = ["prompt", "chosen", "rejected"]


def test_align_readers_account_for_every_record_of_damaged_files(tmp_path, monkeypatch):
    import scratchlm.align.data

    monkeypatch.setattr(scratchlm.align.data, "MAX_LINE_BYTES", 100_000)
    rng = random.Random(SEED + 1)

    def chat() -> dict:
        turns = [{"role": "user", "content": words(rng)}]
        return {"messages": [*turns, {"role": "assistant", "content": words(rng)}]}

    def preference() -> dict:
        record = {"prompt": words(rng), "chosen": words(rng), "rejected": words(rng, 9)}
        return record | ({"margin": rng.random()} if rng.random() < 0.3 else {})

    tried: Counter[str] = Counter()
    seen_reasons: Counter[str] = Counter()
    for kind in JSONL_KINDS:
        for i in range(PER_KIND):
            for form, good, fields in [
                ("chat", chat, CHAT_FIELDS),
                ("preference", preference, PREFERENCE_FIELDS),
            ]:
                suffix, data = make(kind, rng, good, fields, 100_000)
                if rng.random() < 0.2:
                    suffix = suffix.replace(".jsonl", ".json")
                path = tmp_path / f"{form}-{kind.replace(' ', '_')}-{i}{suffix}"
                path.write_bytes(data)
                tried[kind] += 1
                for read in (read_chat, read_preferences, read_prompts):
                    dataset = read([path])
                    dataset.describe()
                    for reject in dataset.rejects:
                        seen_reasons[reason_kind(reject.reason)] += 1
                    if kind.startswith("truncated"):
                        assert any(r.reason.startswith("truncated or corrupt file") for r in
                                   dataset.rejects), path  # fmt: skip
                    plain = decompress(data, suffix)
                    if ".jsonl" in suffix and plain is not None and "truncated" not in kind:
                        total = len(dataset.records) + len(dataset.rejects)
                        assert total == nonblank_lines(plain), (path, read.__name__)
                    written = write_rejects(dataset.rejects, tmp_path / "rejects")
                    if written is not None:
                        rows = [json.loads(line) for line in written.read_text().splitlines()]
                        assert len(rows) == len(dataset.rejects)
    print(dict(tried), dict(seen_reasons))
