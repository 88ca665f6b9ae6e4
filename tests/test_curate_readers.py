import gzip
import io
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
    assert skipped == {"unknown format": 1}


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
