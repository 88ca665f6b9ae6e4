"""Large files split into byte ranges (or row groups) read the same documents as when read whole."""

import io
import json
import random

import pytest
from curate_samples import html_page, story, write_jsonl, write_warc

from scratchlm.curate.config import CurateConfig
from scratchlm.curate.readers import find_shards, read_shard


def read(path, shard_bytes):
    shards, _ = find_shards([str(path)], shard_bytes)
    return shards, [
        (d["id"], d["text"], d.get("reason")) for s in shards for d in read_shard(s, CurateConfig())
    ]


def jsonl_records(n, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        text = " ".join(
            rng.choice(["a", "bb", "ccc", "é", "🙂"]) for _ in range(rng.randint(0, 60))
        )
        records.append({"text": text} if i % 3 else {"id": f"doc-{i}", "text": text})
    records.insert(n // 2, "{not json")
    return records


@pytest.mark.parametrize("shard_bytes", [1, 7, 64, 333, 4096])
def test_jsonl_ranges_read_every_record_once(tmp_path, shard_bytes):
    p = write_jsonl(tmp_path / "d.jsonl", jsonl_records(80))
    whole_shards, whole = read(p, 0)
    shards, split = read(p, shard_bytes)
    assert len(whole_shards) == 1 and len(shards) == -(-p.stat().st_size // shard_bytes)
    assert split == whole and len(whole) == 81
    assert "invalid json" in [r for _, _, r in whole]


def test_compressed_jsonl_is_not_split(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl.gz", jsonl_records(20), "gz")
    shards, _ = read(p, 10)
    assert len(shards) == 1


def tricky_pages(n):
    # A page whose body looks like a WARC record boundary must not be taken for one.
    fake = b"text\r\n\r\nWARC/1.0\r\nWARC-Type: response\r\nContent-Length: 5\r\n\r\nhello\r\n\r\n"
    pages = []
    for i in range(n):
        body = html_page(story(i)).encode()
        if i % 4 == 1:
            body = body.replace(b"<footer>", b"<pre>" + fake + b"</pre><footer>")
        pages.append((f"http://a/{i}", body, "text/html"))
    return pages


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("shard_bytes", [50, 700, 3000])
def test_warc_ranges_read_every_record_once(tmp_path, gzipped, shard_bytes):
    p = write_warc(
        tmp_path / ("a.warc.gz" if gzipped else "a.warc"), tricky_pages(12), gzip=gzipped
    )
    whole_shards, whole = read(p, 0)
    shards, split = read(p, shard_bytes)
    assert len(shards) > 1
    assert split == whole and len(whole) == 12


def test_warc_gzipped_as_one_stream_is_not_split(tmp_path):
    import gzip

    plain = write_warc(tmp_path / "a.warc", tricky_pages(4), gzip=False)
    p = tmp_path / "b.warc.gz"
    p.write_bytes(gzip.compress(plain.read_bytes()))
    shards, docs = read(p, 100)
    assert len(shards) == 1 and docs == read(p, 0)[1]


def test_parquet_splits_by_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    texts = [story(i) for i in range(50)]
    pq.write_table(pa.table({"text": texts}), p, row_group_size=7)
    shards, split = read(p, 1500)
    _, whole = read(p, 0)
    assert len(shards) > 2 and split == whole
    assert [t for _, t, _ in split] == texts and split[8][0] == f"{p}:8"


def test_binary_file_split_is_set_aside_once(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(bytes(range(256)) * 40)
    shards, docs = read(p, 1000)
    assert len(shards) > 1 and [r for _, _, r in docs] == ["binary file"]


def test_jsonl_record_straddling_a_boundary(tmp_path):
    line = json.dumps({"text": "x" * 100}) + "\n"
    p = tmp_path / "d.jsonl"
    p.write_text(line * 3)
    for shard_bytes in range(1, 4 * len(line)):
        _, docs = read(p, shard_bytes)
        assert [i for i, _, _ in docs] == [f"{p}@{k * len(line)}" for k in range(3)]


def test_warc_boundaries_found_are_true_record_starts(tmp_path):
    from warcio.archiveiterator import ArchiveIterator

    from scratchlm.curate import ranges

    p = write_warc(tmp_path / "a.warc", tricky_pages(6), gzip=False)
    data = p.read_bytes()
    it = ArchiveIterator(io.BytesIO(data))
    true_starts = []
    for _ in it:
        true_starts.append(it.get_record_offset())
    for start in range(1, len(data), 37):
        found = ranges.first_warc_record(io.BytesIO(data), start, False)
        expected = min((s for s in true_starts if s >= start), default=None)
        assert found == expected
