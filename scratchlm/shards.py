"""Token shards: tokenizing documents in parallel into flat token files, and reading them back.

A tokens folder holds train-00000.bin ... and val-00000.bin ...: flat little-endian uint16 arrays
(uint32 when the vocabulary has more than 65,536 tokens), each document followed by <|eos|>, plus
meta.json with the dtype, the tokenizer's sha256 and the token, document and byte counts per shard
and per split. Readers memory-map the files, so a shard costs no RAM until its pages are touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scratchlm import disk
from scratchlm.documents import read_documents
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

META_FILE = "meta.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
# A chunk is the unit of work sent to a tokenizer process: big enough to amortize the pickling,
# small enough to keep every process busy and the memory of chunks in flight small.
CHUNK_CHARS = 1 << 20
CHUNK_DOCS = 2048
TOKENIZE_AGAIN = "run `scratchlm tokenize` again"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def val_score(seed: int, doc_id: str) -> float:
    """A uniform number in [0, 1) fixed by the seed and the document id: below val_fraction is val.

    Keyed on the id, not the position, so a document keeps its split when the corpus around it
    changes and validation documents never leak into training on a rerun.
    """
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


# -- writing ---------------------------------------------------------------------------------------


def write_token_shards(
    doc_files: list[Path],
    tokenizer_path: Path,
    out_dir: Path,
    val_fraction: float,
    seed: int = 0,
    workers: int = 0,
    shard_tokens: int = 2**24,
    executor: str = "local",
    ray_address: str = "",
) -> dict:
    """Tokenize `doc_files` into train/val shards in `out_dir`; returns meta.json plus the timing.

    The output is the same whatever the number of worker processes (0: one per core), and the
    same on the Ray executor (shards_tasks.py). Each shard is written under a .tmp name and
    renamed when complete, and meta.json, written last, lists the shards, so a crash leaves no
    folder that looks complete.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be positive, got {shard_tokens}")
    tokenizer = Tokenizer.load(tokenizer_path)
    doc_files = [Path(f) for f in doc_files]
    for f in doc_files:
        if not f.is_file():
            raise UserError(f"documents file {f} does not exist")
    out_dir = Path(out_dir)
    if executor != "local":
        from scratchlm.curate.executor import make_executor
        from scratchlm.shards_tasks import write_token_shards_by_tasks

        return write_token_shards_by_tasks(
            make_executor(executor, workers, ray_address),
            doc_files,
            Path(tokenizer_path),
            out_dir,
            val_fraction,
            seed,
            shard_tokens,
        )
    _clear_tokens_dir(out_dir)
    start = time.perf_counter()

    forced_val, forced_train = _forced_splits(doc_files, seed, val_fraction)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _ShardWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
    empty_docs = 0
    chunks = _chunks(doc_files, seed, val_fraction, forced_val, forced_train)
    try:
        for (splits, n_empty), (tokens, lengths, n_bytes) in _tokenize_in_order(
            chunks, Path(tokenizer_path), workers
        ):
            empty_docs += n_empty
            ends = np.cumsum(lengths)
            for i, split in enumerate(splits):
                writers[split].add(tokens[ends[i] - lengths[i] : ends[i]], int(n_bytes[i]))
        split_meta = {s: w.finish() for s, w in writers.items()}
    except BaseException as e:  # a full disk, Ctrl-C: no shard is left half-written
        open_shards = [w.current["file"] for w in writers.values() if w.file is not None]
        written = sum(w.abort() for w in writers.values())
        if disk.is_disk_full(e):
            what = f"token shard {', '.join(open_shards)}"
            free = disk.free_bytes(out_dir)
            raise disk.DiskFull(what, out_dir, None, free, TOKENIZE_AGAIN, written) from None
        raise
    return finish_meta(
        out_dir, split_meta, tokenizer, dtype, val_fraction, seed, empty_docs, doc_files, start
    )


def finish_meta(
    out_dir: Path,
    split_meta: dict[str, dict],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    val_fraction: float,
    seed: int,
    empty_documents: int,
    doc_files: list[Path],
    start: float,
) -> dict:
    """Write meta.json for the finished shards of every split; returns it with the speed (the
    timing stays out of meta.json, so the whole folder is reproducible)."""
    total = sum(m["tokens"] for m in split_meta.values())
    if total == 0:
        raise UserError("cannot tokenize an empty corpus: the documents hold no text")
    seconds = time.perf_counter() - start
    total_bytes = sum(m["bytes"] for m in split_meta.values())
    meta = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_sha256": tokenizer.sha256,
        "val_fraction": val_fraction,
        "seed": seed,
        "tokens": total,
        "bytes": total_bytes,
        "train_tokens": split_meta["train"]["tokens"],
        "val_tokens": split_meta["val"]["tokens"],
        "train_documents": split_meta["train"]["documents"],
        "val_documents": split_meta["val"]["documents"],
        "empty_documents_skipped": empty_documents,
        "sources": [str(f) for f in doc_files],
        "splits": split_meta,
    }
    disk.write_atomic(out_dir / META_FILE, json.dumps(meta, indent=2).encode())
    speed = {"seconds": round(seconds, 3), "mb_per_s": round(total_bytes / 1e6 / seconds, 3)}
    return {**meta, **speed}


def _clear_tokens_dir(out_dir: Path) -> None:
    """Remove the shards of an earlier run: meta.json first, so no reader trusts a mix; what a
    killed run left half-written is named, with the space it freed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    unfinished = [f"{split}-*.bin.tmp" for split in SPLITS] + [".tmp-*", ".tokenize"]
    disk.say_removed("tokenize", *disk.remove_stale(out_dir, unfinished))
    for split in SPLITS:
        for path in out_dir.glob(f"{split}-*.bin"):
            path.unlink()


def _iter_docs(doc_files: list[Path]) -> Iterator[tuple[str, str, str | None]]:
    """(id, text, split named by the document's meta or None) of every document, in file order.

    A document whose meta names {"split": "train"} or {"split": "val"} goes there, so a user (or a
    benchmark) can fix its own held-out set.
    """
    for f in doc_files:
        for line_no, doc in enumerate(read_documents(f), 1):
            text, doc_id = doc.get("text"), doc.get("id")
            if not isinstance(text, str) or doc_id is None:
                raise UserError(f"{f}: document {line_no} needs an 'id' and a string 'text'")
            meta = doc.get("meta")
            named = meta.get("split") if isinstance(meta, dict) else None
            yield str(doc_id), text, named if named in SPLITS else None


def _forced_splits(
    doc_files: list[Path], seed: int, val_fraction: float
) -> tuple[int | None, int | None]:
    """Positions of the documents moved so that val and train each get at least one document.

    With val_fraction > 0 and two or more documents, when no document falls into val by its
    score, the one with the lowest score goes there (and likewise the highest into train). The
    scan stops as soon as both splits are known to get a document, which on any real corpus is
    after a few hundred documents.
    """
    if val_fraction == 0:
        return None, None
    lowest: tuple[float, int] | None = None
    highest: tuple[float, int] | None = None
    n_docs = 0
    for position, (doc_id, text, named) in enumerate(_iter_docs(doc_files)):
        if named is not None:
            return None, None
        if not text:
            continue
        score = val_score(seed, doc_id)
        n_docs += 1
        lowest = min(lowest or (score, position), (score, position))
        highest = max(highest or (score, position), (score, position))
        if lowest[0] < val_fraction <= highest[0]:
            return None, None
    if n_docs < 2:
        return None, None
    assert lowest is not None and highest is not None
    if lowest[0] >= val_fraction:
        return lowest[1], None
    return None, highest[1]


def _chunks(
    doc_files: list[Path],
    seed: int,
    val_fraction: float,
    forced_val: int | None,
    forced_train: int | None,
) -> Iterator[tuple[list[str], list[str], int]]:
    """(texts, split of each text, empty documents skipped) in chunks, in document order."""
    texts: list[str] = []
    splits: list[str] = []
    chars = empty = 0
    for position, (doc_id, text, named) in enumerate(_iter_docs(doc_files)):
        if not text:
            empty += 1
            continue
        is_val = position == forced_val or (
            position != forced_train and val_score(seed, doc_id) < val_fraction
        )
        texts.append(text)
        splits.append(named or ("val" if is_val else "train"))
        chars += len(text)
        if chars >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
            yield texts, splits, empty
            texts, splits, chars, empty = [], [], 0, 0
    if texts or empty:
        yield texts, splits, empty


# The tokenizer of a worker process, loaded once by _init_worker.
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: Path) -> None:
    global _worker_tokenizer
    # The processes are the parallelism; a thread pool in each would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _tokenize_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None, "_init_worker did not run"
    return _tokenize_texts(_worker_tokenizer, texts)


def _tokenize_texts(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens of all texts, each followed by eos; tokens per text; UTF-8 bytes per text)."""
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    # Counting bytes from the tokens rather than the text also covers texts whose lone
    # surrogates the tokenizer replaced.
    token_bytes = tok.token_bytes()
    n_bytes = np.empty(len(ids), dtype=np.int64)
    at = 0
    for i, doc in enumerate(ids):
        tokens[at : at + len(doc)] = doc
        tokens[at + len(doc)] = tok.eos_id
        n_bytes[i] = token_bytes[tokens[at : at + len(doc)]].sum()
        at += len(doc) + 1
    return tokens, lengths, n_bytes


def _tokenize_in_order(
    chunks: Iterator[tuple[list[str], list[str], int]], tokenizer_path: Path, workers: int
) -> Iterator[tuple[tuple[list[str], int], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Tokenized chunks in input order, from `workers` processes with a bounded queue."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        tok = Tokenizer.load(tokenizer_path)
        for texts, splits, empty in chunks:
            yield (splits, empty), _tokenize_texts(tok, texts)
        return
    # spawn, not fork: the parent may already run tokenizers' or torch's threads.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()
        for texts, splits, empty in chunks:
            pending.append(((splits, empty), pool.apply_async(_tokenize_chunk, (texts,))))
            if len(pending) >= 2 * workers:
                info, result = pending.popleft()
                yield info, result.get()
        while pending:
            info, result = pending.popleft()
            yield info, result.get()


class _ShardWriter:
    """Appends documents to one split's shards, starting a new shard at a document boundary once
    the current one holds `shard_tokens` tokens. A shard is NAME.tmp until complete."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir = out_dir
        self.split = split
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.file: contextlib.AbstractContextManager | None = None
        self.current: dict = {}

    def add(self, tokens: np.ndarray, n_bytes: int) -> None:
        if self.file is None:
            name = f"{self.split}-{len(self.shards):05d}.bin"
            self.current = {"file": name, "tokens": 0, "documents": 0, "bytes": 0}
            self.file = disk.open_file(self._tmp())
            self.out = self.file.__enter__()
        self.out.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.current["tokens"] += len(tokens)
        self.current["documents"] += 1
        self.current["bytes"] += n_bytes
        if self.current["tokens"] >= self.shard_tokens:
            self._close_shard()

    def _tmp(self) -> Path:
        return self.out_dir / (self.current["file"] + ".tmp")

    def _close_shard(self) -> None:
        assert self.file is not None
        file, self.file = self.file, None
        file.__exit__(None, None, None)  # flushed and synced to the disk
        name = self.current["file"]
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        self.shards.append(self.current)

    def abort(self) -> int:
        """After an error: remove the shard being written; returns the bytes it had reached."""
        if self.file is None:
            return 0
        file, self.file = self.file, None
        with contextlib.suppress(Exception):  # its last writes may fail again
            file.__exit__(RuntimeError, RuntimeError("aborted"), None)
        written = disk.tree_bytes(self._tmp())
        disk.remove(self._tmp())
        return written

    def finish(self) -> dict:
        if self.file is not None:
            self._close_shard()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "bytes": sum(s["bytes"] for s in self.shards),
            "shards": self.shards,
        }


# -- reading ---------------------------------------------------------------------------------------


def read_meta(tokens_dir: Path) -> dict:
    path = Path(tokens_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"no token shards in {tokens_dir} (missing {META_FILE}); run `scratchlm tokenize`"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format {meta.get('format')!r}, expected {FORMAT_VERSION}; "
            "rerun `scratchlm tokenize`"
        )
    return meta


def check_tokenizer(meta: dict, tokenizer: Tokenizer) -> None:
    """Shards are only meaningful with the tokenizer that wrote them."""
    written = str(meta.get("tokenizer_sha256", ""))
    if written != tokenizer.sha256:
        raise UserError(
            f"the token shards were written with another tokenizer (sha256 {written[:12]}) than "
            f"{tokenizer.path} (sha256 {tokenizer.sha256[:12]}): the tokenizer changed after "
            "tokenizing; rerun `scratchlm tokenize`"
        )


def open_split(tokens_dir: Path, meta: dict, split: str) -> list[np.ndarray]:
    """The shards of one split, memory-mapped, after checking that the folder is what meta.json
    says: every listed shard there at its exact size and ending with <|eos|> (a document never
    spans two shards), the counts adding up, no shard of another tokenize run beside them. A
    damaged folder is one line naming the file, never silently wrong training."""
    tokens_dir = Path(tokens_dir)
    rerun = "rerun `scratchlm tokenize`"
    if split not in meta.get("splits", {}):
        raise UserError(f"{tokens_dir} has no split {split!r} (it has {', '.join(meta['splits'])})")
    try:
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        shards = meta["splits"][split]["shards"]
        listed = sum(int(shard["tokens"]) for shard in shards)
        total = int(meta["splits"][split]["tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{tokens_dir / META_FILE} is damaged (no valid {e}); {rerun}") from None
    if listed != total:
        raise UserError(
            f"{tokens_dir / META_FILE} is inconsistent: the {split} shards it lists hold {listed} "
            f"tokens, but it counts {total}; {rerun}"
        )
    names = {shard["file"] for shard in shards}
    strays = sorted(p.name for p in tokens_dir.glob(f"{split}-*.bin") if p.name not in names)
    if strays:
        raise UserError(
            f"{tokens_dir / META_FILE} does not list {', '.join(strays)}: the folder mixes shards "
            f"of two tokenize runs; {rerun}"
        )
    parts = []
    for shard in shards:
        path = tokens_dir / shard["file"]
        expected = int(shard["tokens"]) * dtype.itemsize
        if not path.is_file():
            raise UserError(f"token shard {path} is missing; {rerun}")
        size = path.stat().st_size
        if size != expected:
            how = "the shard is truncated" if size < expected else "the shard is longer"
            raise UserError(
                f"token shard {path} has {size} bytes, but meta.json lists {shard['tokens']} "
                f"tokens ({expected} bytes): {how}, or meta.json is not its own; {rerun}"
            )
        part = np.memmap(path, dtype=dtype, mode="r") if size else np.empty(0, dtype)
        if len(part) and "eos_id" in meta and int(part[-1]) != meta["eos_id"]:
            raise UserError(
                f"token shard {path} does not end with <|eos|> (token {meta['eos_id']}): its end "
                f"is damaged; {rerun}"
            )
        parts.append(part)
    return parts


class TokenStream:
    """One split's shards as a single read-only token array, memory-mapped. Opening it checks the
    folder (`open_split`) and, given the tokenizer, that the shards were written with it."""

    def __init__(self, tokens_dir: Path, split: str, tokenizer: Tokenizer | None = None) -> None:
        meta = read_meta(tokens_dir)
        if tokenizer is not None:
            check_tokenizer(meta, tokenizer)
        self.parts = open_split(tokens_dir, meta, split)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.meta = meta

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        at = 0
        part = int(np.searchsorted(self.starts, start, side="right")) - 1
        while at < length:
            offset = start + at - int(self.starts[part])
            take = min(length - at, len(self.parts[part]) - offset)
            out[at : at + take] = self.parts[part][offset : offset + take]
            at += take
            part += 1
        return out


def _to_torch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # torch is imported here, not at the top, so the tokenizer processes start without it.
    import torch

    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TokenLoader:
    """Deterministic, resumable (input, target) batches of one split for pretraining.

    Each epoch picks a random offset in [0, seq_len) and a seeded permutation of the
    non-overlapping windows of seq_len + 1 tokens that start there. Step after step takes the next
    `global_batch` windows of that order (running on into the next epoch), and data-parallel rank
    r gets rows [r * global_batch / dp_size, (r + 1) * global_batch / dp_size): the sequence of
    global batches, and so the loss curve, depends only on the seed, not on the number of ranks.

    Opening it checks the folder against meta.json (`open_split`) and, given the tokenizer, that
    the shards were written with it; a saved position records both, so a resume on other data
    is refused.
    """

    def __init__(
        self,
        tokens_dir: Path,
        split: str,
        seq_len: int,
        global_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if seq_len < 1 or global_batch < 1:
            raise UserError(f"seq_len ({seq_len}) and global batch ({global_batch}) must be >= 1")
        if global_batch % dp_size != 0:
            raise UserError(
                f"the global batch of {global_batch} sequences does not divide among "
                f"{dp_size} data-parallel ranks"
            )
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        self.stream = TokenStream(tokens_dir, split, tokenizer)
        if len(self.stream) < seq_len + 1:
            raise UserError(
                f"the {split} split holds {len(self.stream)} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}; add data or lower the sequence length"
            )
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.global_batch, self.dp_rank, self.dp_size = global_batch, dp_rank, dp_size
        self._epoch = 0
        self._index = 0
        self._order_of: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def _order(self, epoch: int) -> np.ndarray:
        """The window starts of `epoch`, in the order they are served."""
        if self._order_of is None or self._order_of[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self.stream)
            offset = int(rng.integers(0, min(self.seq_len - 1, n - self.seq_len - 1) + 1))
            n_windows = (n - 1 - offset) // self.seq_len
            self._order_of = (epoch, offset + rng.permutation(n_windows) * self.seq_len)
        return self._order_of[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 tensors [global_batch // dp_size, seq_len], y is x shifted by one."""
        starts: list[int] = []
        while len(starts) < self.global_batch:
            order = self._order(self._epoch)
            take = order[self._index : self._index + self.global_batch - len(starts)]
            starts += take.tolist()
            self._index += len(take)
            if self._index == len(order):
                self._epoch, self._index = self._epoch + 1, 0
        per_rank = self.global_batch // self.dp_size
        mine = starts[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        rows = np.stack([self.stream.read(s, self.seq_len + 1) for s in mine])
        return _to_torch(rows)

    def state_dict(self) -> dict:
        return {
            "split": self.split,
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "tokens": len(self.stream),
            "tokenizer_sha256": self.stream.meta.get("tokenizer_sha256"),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (any global batch or number of ranks)."""
        for key in ("split", "seed", "seq_len", "tokens", "tokenizer_sha256"):
            if key not in state and key == "tokenizer_sha256":  # saved before it was recorded
                continue
            if state.get(key) != self.state_dict()[key]:
                raise UserError(
                    f"the saved data-loader position is for {key}={state.get(key)!r}, but this "
                    f"run has {key}={self.state_dict()[key]!r}; the token shards or the data "
                    "settings changed since the checkpoint"
                )
        self._epoch, self._index = int(state["epoch"]), int(state["index"])


def iter_eval_batches(
    tokens_dir: Path, split: str, seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential non-overlapping windows from the start of a split, up to max_tokens targets.

    The same tokens every call, so validation losses compare across steps and runs. A split
    shorter than one window yields a single shorter window; an empty split yields nothing.
    """
    stream = TokenStream(tokens_dir, split)
    n = len(stream)
    if n < 2:
        return
    if n < seq_len + 1:
        yield _to_torch(stream.read(0, n)[None])
        return
    n_windows = min((n - 1) // seq_len, max(1, max_tokens // seq_len))
    for first in range(0, n_windows, batch_size):
        starts = range(first * seq_len, min(first + batch_size, n_windows) * seq_len, seq_len)
        yield _to_torch(np.stack([stream.read(s, seq_len + 1) for s in starts]))
