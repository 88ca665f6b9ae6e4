"""Token shards written by independent tasks, for a Ray cluster: the same files as shards.py.

The local path streams every document through one process that writes the shards in order; on a
cluster that process would read and write everything. Here the work is two task stages:
1. one task per documents file tokenizes it into OUT/.tokenize/fNNNNN.<split>.bin (the final
   dtype, each document followed by <|eos|>) and returns each document's tokens and bytes;
2. the driver lays out the shards exactly as shards._ShardWriter does (a new shard at the
   document boundary once the current one holds shard_tokens), and one task per shard copies its
   token ranges out of the stage-1 files.
So the shards and meta.json are byte for byte those of the local path, and no process holds more
than one documents file or one shard.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from scratchlm.curate import storage
from scratchlm.shards import (
    SPLITS,
    _clear_tokens_dir,
    _forced_splits,
    _iter_docs,
    _tokenize_texts,
    finish_meta,
    token_dtype,
    val_score,
)
from scratchlm.tokenizer import Tokenizer

WORK = ".tokenize"
BATCH_DOCS = 2048


@lru_cache(maxsize=2)
def _tokenizer(path: str, sha256: str) -> Tokenizer:
    # The executor's processes are the parallelism; a thread pool in each would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.load(path)
    if tok.sha256 != sha256:
        raise RuntimeError(f"{path} changed while tokenizing")
    return tok


def _tokenize_file(job: tuple) -> dict:
    """Stage 1: one documents file to its per-split token files; per document tokens and bytes."""
    index, doc_file, tokenizer_path, sha256, work, seed, val_fraction, forced, dtype = job
    tok = _tokenizer(tokenizer_path, sha256)
    forced_val, forced_train = forced
    found: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
    empty = 0
    paths = {s: storage.join(work, f"f{index:05d}.{s}.bin") for s in SPLITS}
    with storage.open_write(paths["train"]) as train, storage.open_write(paths["val"]) as val:
        files = {"train": train, "val": val}
        texts: list[str] = []
        splits: list[str] = []

        def flush() -> None:
            tokens, lengths, n_bytes = _tokenize_texts(tok, texts)
            ends = np.cumsum(lengths)
            for i, split in enumerate(splits):
                doc = tokens[ends[i] - lengths[i] : ends[i]]
                files[split].write(doc.astype(dtype, copy=False).tobytes())
                found[split][0].append(int(lengths[i]))
                found[split][1].append(int(n_bytes[i]))
            texts.clear()
            splits.clear()

        for position, (doc_id, text, named) in enumerate(_iter_docs([Path(doc_file)])):
            if not text:
                empty += 1
                continue
            is_val = position == forced_val or (
                position != forced_train and val_score(seed, doc_id) < val_fraction
            )
            texts.append(text)
            splits.append(named or ("val" if is_val else "train"))
            if len(texts) >= BATCH_DOCS:
                flush()
        if texts:
            flush()
    return {
        "empty": empty,
        **{s: (np.array(t, np.int64), np.array(b, np.int64)) for s, (t, b) in found.items()},
    }


def _copy_shard(job: tuple) -> None:
    """Stage 2: one shard from token ranges (file, first token, end token) of stage-1 files."""
    work, split, path, pieces, itemsize = job
    with storage.open_write(path) as f:
        for index, start, end in pieces:
            src = storage.join(work, f"f{index:05d}.{split}.bin")
            (data,) = storage.read_ranges(src, [start * itemsize], [end * itemsize])
            f.write(data)
        if not storage.is_remote(path):
            f.flush()
            os.fsync(f.fileno())


def _layout(per_file: list[tuple[np.ndarray, np.ndarray]], shard_tokens: int) -> list[dict]:
    """Shards of one split, as shards._ShardWriter cuts them, with the ranges they copy."""
    shards: list[dict] = []
    current: dict | None = None
    for index, (tokens, n_bytes) in enumerate(per_file):
        at = 0
        for n, b in zip(tokens.tolist(), n_bytes.tolist(), strict=True):
            if current is None:
                current = {"tokens": 0, "documents": 0, "bytes": 0, "pieces": []}
            pieces = current["pieces"]
            if pieces and pieces[-1][0] == index and pieces[-1][2] == at:
                pieces[-1][2] = at + n
            else:
                pieces.append([index, at, at + n])
            current["tokens"] += n
            current["documents"] += 1
            current["bytes"] += b
            at += n
            if current["tokens"] >= shard_tokens:
                shards.append(current)
                current = None
    if current is not None:
        shards.append(current)
    return shards


def _local_positions(doc_files: list[Path], positions: tuple[int | None, int | None]):
    """Global document positions to (file index, position in that file) for each file."""
    out = [[None, None] for _ in doc_files]
    wanted = [p for p in positions if p is not None]
    if not wanted:
        return [tuple(x) for x in out]
    offset = 0
    for i, f in enumerate(doc_files):
        n = sum(1 for _ in _iter_docs([f]))
        for k, p in enumerate(positions):
            if p is not None and offset <= p < offset + n:
                out[i][k] = p - offset
        offset += n
        if offset > max(wanted):
            break
    return [tuple(x) for x in out]


def write_token_shards_by_tasks(
    executor,
    doc_files: list[Path],
    tokenizer_path: Path,
    out_dir: Path,
    val_fraction: float,
    seed: int,
    shard_tokens: int,
    progress: bool = True,
) -> dict:
    """shards.write_token_shards, its tasks run by `executor` (see executor.py)."""
    from scratchlm.curate.executor import Progress

    tokenizer = Tokenizer.load(tokenizer_path)
    out_dir = Path(out_dir)
    _clear_tokens_dir(out_dir)
    work = str(out_dir / WORK)
    storage.remove_tree(work)
    start = time.perf_counter()
    forced = _local_positions(doc_files, _forced_splits(doc_files, seed, val_fraction))
    dtype = token_dtype(tokenizer.vocab_size)
    bar = Progress(progress, "tokenize")
    try:
        jobs = [
            (
                i,
                str(f),
                str(tokenizer_path),
                tokenizer.sha256,
                work,
                seed,
                val_fraction,
                forced[i],
                dtype,
            )
            for i, f in enumerate(doc_files)
        ]
        results = executor.map(_tokenize_file, jobs, bar, "tokenize")
        split_meta = {}
        copies = []
        for split in SPLITS:
            shards = _layout([r[split] for r in results], shard_tokens)
            for k, shard in enumerate(shards):
                shard["file"] = f"{split}-{k:05d}.bin"
                path = str(out_dir / shard["file"])
                copies.append((work, split, path, shard.pop("pieces"), dtype.itemsize))
            split_meta[split] = {
                "tokens": sum(s["tokens"] for s in shards),
                "documents": sum(s["documents"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
                "shards": [
                    {"file": s["file"], **{k: s[k] for k in ("tokens", "documents", "bytes")}}
                    for s in shards
                ],
            }
        executor.map(_copy_shard, copies, bar, "write shards")
    finally:
        bar.close()
        executor.close()
        storage.remove_tree(work)
    empty = sum(r["empty"] for r in results)
    return finish_meta(
        out_dir, split_meta, tokenizer, dtype, val_fraction, seed, empty, doc_files, start
    )
