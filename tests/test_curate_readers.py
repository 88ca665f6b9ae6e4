import gzip
import io
import json
import re

import pytest
from curate_samples import html_page, story, write_jsonl, write_warc

from scratchlm.curate.config import CurateConfig
from scratchlm.curate.readers import decode_html, find_shards, read_shard, split_stream
from scratchlm.errors import UserError

TINYSTORIES_SEPARATOR = r"(?<!\n)\n(?!\n)"


def read_all(path, cfg=None):
    shards, _ = find_shards([str(path)])
    return [d for s in shards for d in read_shard(s, cfg or CurateConfig())]


def test_plain_text_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("line one\n\nline two\n")
    docs = read_all(p)
    assert [d["text"] for d in docs] == ["line one\n\nline two\n"]
    assert docs[0]["id"] == str(p)


def test_tinystories_separator_splits_stories_keeps_paragraphs(tmp_path):
    p = tmp_path / "stories.txt.gz"
    p.write_bytes(gzip.compress(b"one day a cat.\n\nthe end.\nonce upon a time a dog.\nlast one."))
    docs = read_all(p, CurateConfig(text_separator=TINYSTORIES_SEPARATOR))
    assert [d["text"] for d in docs] == [
        "one day a cat.\n\nthe end.",
        "once upon a time a dog.",
        "last one.",
    ]
    assert docs[1]["id"] == f"{p}:25"  # source plus character offset


def test_split_stream_across_chunks_matches_whole_split(monkeypatch):
    import scratchlm.curate.readers as readers

    monkeypatch.setattr(readers, "CHUNK_CHARS", 7)
    text = "".join(f"story {i} para a.\n\npara b.\n" for i in range(30))
    pieces = [
        p for _, p in split_stream(io.StringIO(text), re.compile(TINYSTORIES_SEPARATOR), 10**6)
    ]
    assert pieces == re.split(TINYSTORIES_SEPARATOR, text)[:-1]  # no empty piece after the end


def test_split_stream_sets_aside_overlong_piece_without_holding_it():
    text = "short.\n" + "x" * 5000 + "\nnext."
    out = list(split_stream(io.StringIO(text), re.compile("\n"), 1000))
    assert out[0] == (0, "short.")
    assert out[1][1] is None
    assert out[-1][1] == "next."


@pytest.mark.parametrize("compress", ["", "gz", "zst"])
def test_jsonl_keeps_ids_and_falls_back_to_source_offset(tmp_path, compress):
    suffix = {"": ".jsonl", "gz": ".jsonl.gz", "zst": ".jsonl.zst"}[compress]
    p = write_jsonl(
        tmp_path / f"d{suffix}",
        [{"id": "keep-me", "text": "a"}, {"text": "b", "url": "u"}],
        compress,
    )
    docs = read_all(p)
    # A compressed stream is read whole, by line; an uncompressed file may be split into byte
    # ranges, so its records are named by byte offset.
    fallback = f"{p}@31" if compress == "" else f"{p}:2"
    assert [d["id"] for d in docs] == ["keep-me", fallback]
    assert docs[1]["meta"]["url"] == "u"


def test_jsonl_text_field_is_configurable(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"content": "hello"}])
    assert read_all(p, CurateConfig(text_field="content"))[0]["text"] == "hello"


def test_jsonl_bad_lines_are_set_aside_with_reason(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl", ['{"text": "ok"}', "{not json", '{"body": "x"}', "[1, 2]"]
    )
    docs = read_all(p)
    assert [d.get("reason") for d in docs] == [
        None,
        "invalid json",
        "missing text field 'text'",
        "not a json object",
    ]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["first", "second"]}), p)
    assert [(d["id"], d["text"]) for d in read_all(p)] == [("x", "first"), ("y", "second")]


def test_warc_html_responses_in_their_charset(tmp_path):
    body = html_page("Привет, мир. " * 5).encode("cp1251")
    p = write_warc(
        tmp_path / "a.warc.gz",
        [
            ("http://a/", body, "text/html; charset=windows-1251"),
            ("http://b/img", b"\x89PNG....", "image/png"),
        ],
    )
    docs = read_all(p)
    assert len(docs) == 1
    assert "Привет, мир." in docs[0]["text"]
    assert docs[0]["meta"] == {"source": str(p), "url": "http://a/", "format": "html"}
    assert docs[0]["id"].startswith(f"{p}@")


def test_decode_html_meta_charset_and_invalid_bytes():
    assert decode_html(b'<meta charset="iso-8859-1"><p>caf\xe9</p>').endswith("café</p>")
    assert "\ufffd" in decode_html(b"<p>ok \xff\xfe bytes</p>", "utf-8")


def test_html_folder_is_one_shard(tmp_path):
    (tmp_path / "pages").mkdir()
    for i in range(3):
        (tmp_path / "pages" / f"{i}.html").write_text(html_page(story(i)))
    (tmp_path / "pages" / "notes.pdf").write_bytes(b"%PDF")
    shards, skipped = find_shards([str(tmp_path / "pages")])
    assert [s.fmt for s in shards] == ["html"] and len(shards[0].paths) == 3
    assert skipped == {"unknown format": [str(tmp_path / "pages" / "notes.pdf")]}


def test_binary_file_is_set_aside(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(bytes(range(256)) * 10)
    assert [d["reason"] for d in read_all(p)] == ["binary file"]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_file_keeps_what_was_read(tmp_path, suffix):
    records = [{"text": story(i)} for i in range(2000)]
    compress = suffix.rsplit(".", 1)[1]
    p = write_jsonl(tmp_path / f"d{suffix}", records, compress)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    docs = read_all(p)
    good = [d for d in docs if "reason" not in d]
    assert 0 < len(good) < 2000
    assert docs[-1]["reason"] in ("truncated or corrupt input", "invalid json")
    assert any(d.get("reason") == "truncated or corrupt input" for d in docs)


def test_truncated_warc(tmp_path):
    pages = [(f"http://a/{i}", html_page(story(i)).encode(), "text/html") for i in range(5)]
    p = write_warc(tmp_path / "a.warc.gz", pages)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 200])
    docs = read_all(p)
    assert len([d for d in docs if "reason" not in d]) == 4
    assert docs[-1]["reason"] == "truncated or corrupt warc"


def test_missing_path_unknown_format_and_empty_glob_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="input not found"):
        find_shards([str(tmp_path / "nope.txt")])
    (tmp_path / "a.docx").write_bytes(b"PK")
    with pytest.raises(UserError, match="unknown format"):
        find_shards([str(tmp_path / "a.docx")])
    with pytest.raises(UserError, match="matches no files"):
        find_shards([str(tmp_path / "*.jsonl")])


DEEP_LINES = [
    "[" * 100_000 + "]" * 100_000,
    '{"text": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}",
    '{"text": "fine", "meta": {"a": ' + "[" * 150 + "]" * 150 + "}}",
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_deeply_nested_json_is_set_aside_and_the_rest_read(tmp_path, suffix):
    lines = ['{"text": "before"}', *DEEP_LINES, '{"text": "after"}']
    p = write_jsonl(tmp_path / f"d{suffix}", lines, suffix.rsplit(".", 1)[1].replace("jsonl", ""))
    docs = read_all(p)
    assert [d.get("reason") for d in docs] == [None, *["json nested too deeply"] * 3, None]
    assert [docs[0]["text"], docs[-1]["text"]] == ["before", "after"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_a_record_too_long_is_set_aside_unread(tmp_path, suffix):
    cfg = CurateConfig(max_doc_chars=1000)  # records over 6,000 bytes are refused
    long_record = json.dumps({"text": "x" * 7000})
    escaped = json.dumps({"text": "é" * 900})  # 5,400 bytes of \u00e9 escapes: not too long
    p = write_jsonl(
        tmp_path / f"d{suffix}",
        ['{"text": "a"}', long_record, escaped, '{"text": "b"}'],
        suffix.rsplit(".", 1)[1].replace("jsonl", ""),
    )
    docs = read_all(p, cfg)
    assert [d.get("reason") for d in docs] == [None, "record too long", None, None]
    assert docs[1]["score"] == len(long_record) + 1 and docs[1]["text"] == ""
    assert [d["text"] for d in docs if "reason" not in d] == ["a", "é" * 900, "b"]


def test_a_range_that_starts_inside_a_long_line(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl", ['{"text": "a"}', json.dumps({"text": "x" * 50_000}), '{"text": "b"}']
    )
    shards, _ = find_shards([str(p)], shard_bytes=1000)
    docs = [d for s in shards for d in read_shard(s, CurateConfig(max_doc_chars=1000))]
    assert [d.get("reason") for d in docs] == [None, "record too long", None]


def test_byte_order_marks_and_crlf_line_ends(tmp_path):
    for name, data in [
        ("bom.jsonl", b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n'),
        ("bom.jsonl.gz", gzip.compress(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}')),
    ]:
        (tmp_path / name).write_bytes(data)
        docs = read_all(tmp_path / name)
        assert [(d["text"], d.get("reason")) for d in docs] == [("first", None), ("second", None)]


def test_zstd_frames_skippable_frames_and_a_cut_checksum(tmp_path):
    import struct

    import zstandard

    frames = zstandard.ZstdCompressor(write_checksum=True).compress(b'{"text": "one"}\n')
    frames += struct.pack("<II", 0x184D2A5E, 3) + b"abc"  # a skippable frame
    frames += zstandard.ZstdCompressor(write_content_size=False).compress(b'{"text": "two"}\n')
    (tmp_path / "ok.jsonl.zst").write_bytes(frames)
    assert [d["text"] for d in read_all(tmp_path / "ok.jsonl.zst")] == ["one", "two"]
    whole = zstandard.ZstdCompressor(write_checksum=True).compress(b'{"text": "one"}\n')
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[:-2])  # only the checksum is cut
    docs = read_all(tmp_path / "cut.jsonl.zst")
    assert docs[-1]["reason"] == "truncated or corrupt input"


MEMORY_PROBE = """
import gzip, resource, sys
import zstandard
from scratchlm.curate.config import CurateConfig
from scratchlm.curate.readers import find_shards, read_shard

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def write(path, megabytes):
    raw = open(path, "wb")
    if path.endswith(".gz"):
        out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1)
    else:
        out = zstandard.ZstdCompressor(level=1).stream_writer(raw)
    out.write(b'{"text": "')
    for _ in range(megabytes):
        out.write(b"a" * 2**20)
    out.write(b'"}\\n{"text": "after"}\\n')
    out.close()
    raw.close()

def reasons(path):
    shards, _ = find_shards([path])
    return [d.get("reason") for s in shards for d in read_shard(s, CurateConfig())]

small, big = sys.argv[1:3]
write(small, 1)
write(big, 200)
reasons(small)
before = peak_mb()
print(reasons(big), round(peak_mb() - before))
"""


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_memory_does_not_grow_with_a_line_length(tmp_path, suffix):
    """One 200 MB line in a small compressed file is refused while it is read: the reader's
    peak memory grows by far less than the line (it grew by about 450 MB before)."""
    import subprocess
    import sys

    small, big = tmp_path / f"small{suffix}", tmp_path / f"big{suffix}"
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(small), str(big)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    reasons, grew_mb = result.stdout.rsplit(" ", 1)
    assert reasons == "['record too long', None]"
    assert big.stat().st_size < 1_000_000
    assert int(grew_mb) < 100


@pytest.mark.parametrize("gzipped", [True, False])
def test_a_warc_body_or_html_file_too_long_is_set_aside_unread(tmp_path, gzipped):
    cfg = CurateConfig(max_doc_chars=1000)  # bodies over 6,000 bytes are refused
    huge = html_page("word " * 40_000).encode()
    pages = [(f"http://a/{i}", body, "text/html") for i, body in enumerate([b"<p>a</p>", huge])]
    p = write_warc(tmp_path / ("a.warc.gz" if gzipped else "a.warc"), [*pages, pages[0]], gzipped)
    docs = read_all(p, cfg)
    assert [d.get("reason") for d in docs] == [None, "record too long", None]
    assert len(huge) < docs[1]["score"] < len(huge) + 200  # the WARC length: HTTP headers too
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "big.html").write_bytes(huge)
    (tmp_path / "pages" / "small.html").write_bytes(b"<p>a</p>")
    assert [d.get("reason") for d in read_all(tmp_path / "pages", cfg)] == ["record too long", None]
