"""Partitioned record files: how the dedup stages hand data to each other through storage.

A map task writes one file holding its records grouped by destination partition, and a reduce
task reads its partition's segment of every map file by a ranged read. So a shuffle of M map
tasks into P partitions makes M files (not M x P), and no task holds more than its own share.

File layout: 8 bytes (little-endian header length), a JSON header {"dtype", "counts", "meta"},
then the records (a numpy structured array) partition after partition.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from scratchlm.curate import storage

_LEN = struct.Struct("<Q")


def write_partitioned(
    path: str,
    records: np.ndarray,
    partition: np.ndarray,
    n_partitions: int,
    meta: dict | None = None,
) -> None:
    """Write records grouped by partition; the order within a partition is kept."""
    order = np.argsort(partition, kind="stable")
    counts = np.bincount(partition, minlength=n_partitions) if len(partition) else None
    header = json.dumps(
        {
            "dtype": np.lib.format.dtype_to_descr(records.dtype),
            "counts": [0] * n_partitions if counts is None else counts.tolist(),
            "meta": meta or {},
        }
    ).encode()
    with storage.open_write(path) as f:
        f.write(_LEN.pack(len(header)))
        f.write(header)
        f.write(np.ascontiguousarray(records[order]).tobytes())


def read_header(path: str) -> dict:
    with storage.open_read(path) as f:
        (n,) = _LEN.unpack(f.read(_LEN.size))
        header = json.loads(f.read(n))
    header["data_start"] = _LEN.size + n
    header["dtype"] = np.lib.format.descr_to_dtype(_as_descr(header["dtype"]))
    return header


def _as_descr(descr):
    # JSON turns the descr's (name, type) tuples into lists; fields here are plain scalars.
    return [tuple(field) for field in descr] if isinstance(descr, list) else descr


def read_partition(path: str, p: int, header: dict | None = None) -> np.ndarray:
    header = header or read_header(path)
    dtype, counts = header["dtype"], header["counts"]
    start = header["data_start"] + sum(counts[:p]) * dtype.itemsize
    end = start + counts[p] * dtype.itemsize
    if end == start:
        return np.zeros(0, dtype)
    (data,) = storage.read_ranges(path, [start], [end])
    return np.frombuffer(data, dtype).copy()


def read_partition_of_all(paths: list[str], p: int) -> np.ndarray | None:
    """Segment p of every file, concatenated in file order (None when there are no files)."""
    parts = [read_partition(path, p) for path in paths]
    return np.concatenate(parts) if parts else None


def read_meta(path: str) -> dict:
    return read_header(path)["meta"]
