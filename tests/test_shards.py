"""Token shards: writing (split, determinism, formats, counts) and the resumable loaders."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlm.documents import write_documents
from scratchlm.errors import UserError
from scratchlm.paths import PROJECT_ROOT
from scratchlm.shards import (
    TokenLoader,
    iter_eval_batches,
    read_meta,
    token_dtype,
    val_score,
    write_token_shards,
)
from scratchlm.tokenizer import Tokenizer, train_tokenizer

TINYSTORIES = PROJECT_ROOT / "data" / "tinystories" / "tinystories_train_head_lowercase.txt.gz"


def stories(n_chars: int) -> list[str]:
    with gzip.open(TINYSTORIES, "rt", encoding="utf-8") as f:
        return [s for s in f.read(n_chars).split("\n") if s.strip()]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(stories(100_000), 512, path)
    return path


def write_docs(folder: Path, texts: list[str], per_file: int = 100) -> list[Path]:
    files = []
    for part, first in enumerate(range(0, len(texts), per_file)):
        path = folder / f"part-{part:05d}.jsonl.zst"
        docs = [
            {"id": f"doc-{i}", "text": t, "meta": {}}
            for i, t in enumerate(texts[first : first + per_file], first)
        ]
        write_documents(path, docs)
        files.append(path)
    return files


def split_tokens(tokens_dir: Path, split: str) -> np.ndarray:
    meta = read_meta(tokens_dir)
    parts = [
        np.fromfile(tokens_dir / s["file"], dtype=meta["dtype"])
        for s in meta["splits"][split]["shards"]
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    """A tokens folder of ~600 stories, several shards per split."""
    folder = tmp_path_factory.mktemp("corpus")
    files = write_docs(folder / "docs", stories(400_000))
    write_token_shards(
        files, tokenizer_path, folder / "tokens", 0.1, workers=1, shard_tokens=20_000
    )
    return folder / "tokens"


def test_round_trip_of_documents(tmp_path: Path, tokenizer_path: Path) -> None:
    texts = ["once upon a time", "Grüße, 東京 😀", "a <|eos|> inside", "\n\n  spaces  "]
    files = write_docs(tmp_path / "docs", texts, per_file=3)
    meta = write_token_shards(files, tokenizer_path, tmp_path / "tokens", 0.0, workers=1)
    tok = Tokenizer.load(tokenizer_path)
    train = split_tokens(tmp_path / "tokens", "train")
    assert tok.decode(train.tolist()) == "".join(t + "<|eos|>" for t in texts)
    assert int((train == tok.eos_id).sum()) == len(texts)
    assert meta["train_documents"] == 4 and meta["val_documents"] == 0
    assert meta["train_tokens"] == len(train)
    assert meta["bytes"] == sum(len(t.encode()) for t in texts)
    assert meta["tokenizer_sha256"] == tok.sha256
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    assert meta["seconds"] > 0 and meta["mb_per_s"] > 0
    assert read_meta(tmp_path / "tokens") == {
        k: v for k, v in meta.items() if k not in ("seconds", "mb_per_s")
    }


def test_output_is_identical_for_any_worker_count(tmp_path: Path, tokenizer_path: Path) -> None:
    files = write_docs(tmp_path / "docs", stories(150_000))
    metas = []
    for workers in (1, 2):
        out = tmp_path / f"tokens-{workers}"
        metas.append(
            write_token_shards(
                files, tokenizer_path, out, 0.2, seed=3, workers=workers, shard_tokens=5_000
            )
        )
    assert len(metas[0]["splits"]["train"]["shards"]) > 2
    assert metas[0]["val_documents"] > 0
    files_1 = sorted(p.name for p in (tmp_path / "tokens-1").iterdir())
    assert files_1 == sorted(p.name for p in (tmp_path / "tokens-2").iterdir())
    for name in files_1:
        assert (tmp_path / "tokens-1" / name).read_bytes() == (
            tmp_path / "tokens-2" / name
        ).read_bytes()


def test_meta_counts_match_files_and_documents(corpus: Path) -> None:
    meta = read_meta(corpus)
    texts = {f"doc-{i}": t for i, t in enumerate(stories(400_000))}
    val_ids = {d for d in texts if val_score(meta["seed"], d) < meta["val_fraction"]}
    expected_docs = {"train": len(texts) - len(val_ids), "val": len(val_ids)}
    expected_bytes = {
        "train": sum(len(t.encode()) for d, t in texts.items() if d not in val_ids),
        "val": sum(len(t.encode()) for d, t in texts.items() if d in val_ids),
    }
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["documents"] == expected_docs[split]
        assert info["bytes"] == expected_bytes[split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert info["documents"] == sum(s["documents"] for s in info["shards"])
        for shard in info["shards"]:
            assert (corpus / shard["file"]).stat().st_size == 2 * shard["tokens"]
            tokens = np.fromfile(corpus / shard["file"], dtype=np.uint16)
            # Shards end at document boundaries.
            assert tokens[-1] == meta["eos_id"]
            assert int((tokens == meta["eos_id"]).sum()) == shard["documents"]
    assert 0.05 < meta["val_documents"] / (meta["val_documents"] + meta["train_documents"]) < 0.15
    assert sorted(p.name for p in corpus.iterdir() if p.suffix == ".tmp") == []


def test_split_follows_the_seed(tmp_path: Path, tokenizer_path: Path) -> None:
    files = write_docs(tmp_path / "docs", stories(60_000))
    val_docs = []
    for seed in (0, 1):
        out = tmp_path / f"tokens-{seed}"
        write_token_shards(files, tokenizer_path, out, 0.3, seed=seed, workers=1)
        val_docs.append(split_tokens(out, "val").tolist())
    assert val_docs[0] != val_docs[1]


def test_val_gets_a_document_from_a_tiny_corpus(tmp_path: Path, tokenizer_path: Path) -> None:
    files = write_docs(tmp_path / "docs", ["the first story", "the second story"])
    meta = write_token_shards(files, tokenizer_path, tmp_path / "tokens", 0.001, workers=1)
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    meta = write_token_shards(files, tokenizer_path, tmp_path / "tokens", 0.999, workers=1)
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)


def test_a_document_can_name_its_split(tmp_path: Path, tokenizer_path: Path) -> None:
    docs = [
        {"id": "a", "text": "held out text", "meta": {"split": "val"}},
        {"id": "b", "text": "training text", "meta": {"split": "train"}},
        {"id": "c", "text": "more training text", "meta": {"split": "train"}},
    ]
    write_documents(tmp_path / "docs" / "part-00000.jsonl.zst", docs)
    files = [tmp_path / "docs" / "part-00000.jsonl.zst"]
    meta = write_token_shards(files, tokenizer_path, tmp_path / "tokens", 0.99, workers=1)
    assert (meta["train_documents"], meta["val_documents"]) == (2, 1)
    tok = Tokenizer.load(tokenizer_path)
    assert tok.decode(split_tokens(tmp_path / "tokens", "val").tolist()) == "held out text<|eos|>"


def test_empty_documents_are_skipped_and_counted(tmp_path: Path, tokenizer_path: Path) -> None:
    files = write_docs(tmp_path / "docs", ["", "some text", ""])
    meta = write_token_shards(files, tokenizer_path, tmp_path / "tokens", 0.0, workers=1)
    assert meta["empty_documents_skipped"] == 2 and meta["train_documents"] == 1


def test_empty_corpus_is_a_user_error(tmp_path: Path, tokenizer_path: Path) -> None:
    files = write_docs(tmp_path / "docs", ["", ""])
    with pytest.raises(UserError, match="empty corpus"):
        write_token_shards(files, tokenizer_path, tmp_path / "tokens", 0.1, workers=1)
    with pytest.raises(UserError, match="missing meta.json"):
        read_meta(tmp_path / "tokens")


def test_bad_inputs_are_user_errors(tmp_path: Path, tokenizer_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        write_token_shards([tmp_path / "nope.jsonl.zst"], tokenizer_path, tmp_path / "t", 0.1)
    with pytest.raises(UserError, match="val_fraction"):
        write_token_shards([], tokenizer_path, tmp_path / "t", 1.0)
    bad = tmp_path / "bad.jsonl.zst"
    write_documents(bad, [{"id": "x", "body": "no text key"}])
    with pytest.raises(UserError, match="needs an 'id' and a string 'text'"):
        write_token_shards([bad], tokenizer_path, tmp_path / "t", 0.1, workers=1)


def test_rerun_replaces_earlier_shards(tmp_path: Path, tokenizer_path: Path) -> None:
    files = write_docs(tmp_path / "docs", stories(40_000))
    out = tmp_path / "tokens"
    many = write_token_shards(files, tokenizer_path, out, 0.0, workers=1, shard_tokens=1_000)
    assert len(many["splits"]["train"]["shards"]) > 3
    write_token_shards(files, tokenizer_path, out, 0.0, workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train-00000.bin"]


def test_dtype_is_uint32_above_65536_tokens(tmp_path: Path, tokenizer_path: Path) -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    big = json.loads(tokenizer_path.read_text())
    vocab = big["model"]["vocab"]
    vocab.update({f"filler{i}": len(vocab) for i in range(70_000)})
    (tmp_path / "big.json").write_text(json.dumps(big))
    files = write_docs(tmp_path / "docs", ["hello world"])
    meta = write_token_shards(files, tmp_path / "big.json", tmp_path / "tokens", 0.0, workers=1)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_512
    train = split_tokens(tmp_path / "tokens", "train")
    assert (tmp_path / "tokens" / "train-00000.bin").stat().st_size == 4 * len(train)
    assert Tokenizer.load(tmp_path / "big.json").decode(train.tolist()) == "hello world<|eos|>"


# -- loaders ---------------------------------------------------------------------------------------


def batches(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_loader_batches_are_shifted_windows_of_the_stream(corpus: Path) -> None:
    stream = split_tokens(corpus, "train").astype(np.int64)
    loader = TokenLoader(corpus, "train", seq_len=64, global_batch=8, seed=5)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = set()
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        start = int(
            np.flatnonzero(
                np.all(
                    np.lib.stride_tricks.sliding_window_view(stream, 64)[: len(stream) - 64]
                    == row_x,
                    axis=1,
                )
            )[0]
        )
        assert np.array_equal(stream[start + 1 : start + 65], row_y)
        starts.add(start)
    # Windows of one epoch start on one grid of stride seq_len.
    assert len({s % 64 for s in starts}) == 1 and len(starts) == 8


def test_loader_epoch_visits_each_window_once(tmp_path: Path, tokenizer_path: Path) -> None:
    files = write_docs(tmp_path / "docs", stories(3_000))
    write_token_shards(files, tokenizer_path, tmp_path / "tokens", 0.0, workers=1)
    n = len(split_tokens(tmp_path / "tokens", "train"))
    loader = TokenLoader(tmp_path / "tokens", "train", seq_len=16, global_batch=1, seed=0)
    rows = []
    while loader.epoch == 0:
        rows.append(loader.next_batch()[0][0].tolist())
    assert len(rows) in ((n - 1) // 16, (n - 1) // 16 - 1)
    assert len({tuple(r) for r in rows}) == len(rows)


def test_loader_is_deterministic_in_the_seed(corpus: Path) -> None:
    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return batches(TokenLoader(corpus, "train", 32, 4, seed=seed), 3)

    a, b, c = run(1), run(1), run(2)
    assert all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True)
    )
    assert not torch.equal(a[0][0], c[0][0])


def test_loader_resumes_exactly_across_epochs(corpus: Path) -> None:
    seq_len, batch = 128, 32
    reference = TokenLoader(corpus, "val", seq_len, batch, seed=7)
    expected = batches(reference, 12)
    assert reference.epoch >= 2  # the small val split wraps, so the resume crosses epochs

    first = TokenLoader(corpus, "val", seq_len, batch, seed=7)
    batches(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TokenLoader(corpus, "val", seq_len, batch, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(batches(resumed, 7), expected[5:], strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_ranks_split_the_global_batch(corpus: Path) -> None:
    whole = batches(TokenLoader(corpus, "train", 32, 6, seed=3), 4)
    ranks = [batches(TokenLoader(corpus, "train", 32, 6, r, 3, seed=3), 4) for r in range(3)]
    for step, (x, y) in enumerate(whole):
        assert ranks[0][step][0].shape == (2, 32)
        assert torch.equal(torch.cat([r[step][0] for r in ranks]), x)
        assert torch.equal(torch.cat([r[step][1] for r in ranks]), y)


def test_loader_user_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not divide"):
        TokenLoader(corpus, "train", 32, 5, dp_rank=0, dp_size=2)
    val_tokens = read_meta(corpus)["val_tokens"]
    with pytest.raises(UserError, match="fewer than one window"):
        TokenLoader(corpus, "val", val_tokens, 1)
    with pytest.raises(UserError, match="no split 'test'"):
        TokenLoader(corpus, "test", 32, 1)
    with pytest.raises(UserError, match="missing meta.json"):
        TokenLoader(tmp_path, "train", 32, 1)
    state = TokenLoader(corpus, "train", 32, 4).state_dict()
    with pytest.raises(UserError, match=re.escape("seq_len=32")):
        TokenLoader(corpus, "train", 64, 4).load_state_dict(state)


def test_eval_batches_are_sequential_and_bounded(corpus: Path) -> None:
    stream = split_tokens(corpus, "val").astype(np.int64)
    got = list(iter_eval_batches(corpus, "val", 50, 4, max_tokens=500))
    assert [x.shape[0] for x, _ in got] == [4, 4, 2]
    xs = torch.cat([x for x, _ in got]).flatten().numpy()
    ys = torch.cat([y for _, y in got]).flatten().numpy()
    assert np.array_equal(xs, stream[:500]) and np.array_equal(ys, stream[1:501])
    all_windows = list(iter_eval_batches(corpus, "val", 50, 4, max_tokens=10**9))
    assert sum(x.numel() for x, _ in all_windows) == (len(stream) - 1) // 50 * 50


def test_eval_of_a_split_shorter_than_a_window(tmp_path: Path, tokenizer_path: Path) -> None:
    files = write_docs(tmp_path / "docs", ["a short story"])
    write_token_shards(files, tokenizer_path, tmp_path / "tokens", 0.0, workers=1)
    stream = split_tokens(tmp_path / "tokens", "train").astype(np.int64)
    (x, y), *rest = list(iter_eval_batches(tmp_path / "tokens", "train", 256, 8, 4096))
    assert rest == [] and x.shape == (1, len(stream) - 1)
    assert np.array_equal(y[0].numpy(), stream[1:])
    assert list(iter_eval_batches(tmp_path / "tokens", "val", 256, 8, 4096)) == []
