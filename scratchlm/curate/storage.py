"""Where curation reads and writes: local paths, or fsspec URLs (s3://, gs://, ...).

Paths are plain strings. Local paths (and file:// URLs) use the os module, so the local executor
needs nothing beyond the standard library; any other URL goes through fsspec, whose settings
(endpoint, credentials) come from its usual places: FSSPEC_* environment variables, its config
files, or the cloud SDK's own (AWS_* variables, instance roles).

A file written through `open_write` appears under its name only once complete: locally it is
written under a .tmp name and renamed; on object storage an upload is committed on close, and an
upload that fails half-way is discarded.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import os
import posixpath
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from scratchlm import disk

FILE_PREFIX = "file://"
TMP_SUFFIX = ".tmp"
"""A local file being written (open_write) is NAME.tmp until complete."""
RERUN = "run the same command again (finished work is kept)"


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith(FILE_PREFIX)


def local_path(path: str) -> str:
    return path[len(FILE_PREFIX) :] if path.startswith(FILE_PREFIX) else path


def _fs(path: str):
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        from scratchlm.errors import UserError

        raise UserError(
            f"{path}: object storage needs fsspec; install the extra: pip install 'scratchlm[ray]'"
        ) from None
    try:
        return url_to_fs(path)
    except (ImportError, ValueError) as e:
        from scratchlm.errors import UserError

        raise UserError(f"{path}: {e}") from None


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(local_path(base), *parts)


def name_of(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def exists(path: str) -> bool:
    if is_remote(path):
        fs, p = _fs(path)
        return fs.exists(p)
    return os.path.exists(local_path(path))


def is_dir(path: str) -> bool:
    if is_remote(path):
        fs, p = _fs(path)
        return fs.isdir(p)
    return os.path.isdir(local_path(path))


def is_file(path: str) -> bool:
    if is_remote(path):
        fs, p = _fs(path)
        return fs.isfile(p)
    return os.path.isfile(local_path(path))


def why_unreadable(path: str) -> str | None:
    """Why a listed entry cannot be read as a file ("dangling symlink", "not a regular file":
    a FIFO, a socket, a device; "unreadable": no permission, a symlink loop), or None. Object
    stores list only objects, which are files."""
    if is_remote(path):
        return None
    local = local_path(path)
    try:
        mode = os.stat(local).st_mode
    except FileNotFoundError:
        return "dangling symlink" if os.path.islink(local) else "unreadable"
    except OSError:
        return "unreadable"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None if os.access(local, os.R_OK) else "unreadable"


def size(path: str) -> int:
    if is_remote(path):
        fs, p = _fs(path)
        return int(fs.size(p))
    return os.path.getsize(local_path(path))


def version(path: str) -> tuple[int, str]:
    """(size, a token that changes when the file does): mtime locally, ETag or mtime remotely."""
    if is_remote(path):
        fs, p = _fs(path)
        info = fs.info(p)
        tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
        return int(info.get("size") or 0), str(tag)
    st = os.stat(local_path(path))
    return st.st_size, str(st.st_mtime_ns)


def glob(pattern: str) -> list[str]:
    if is_remote(pattern):
        fs, p = _fs(pattern)
        return sorted(fs.unstrip_protocol(m) for m in fs.glob(p))
    return sorted(globlib.glob(local_path(pattern), recursive=True))


def list_files(folder: str) -> list[str]:
    """Every file under folder, recursively, sorted."""
    if is_remote(folder):
        fs, p = _fs(folder)
        return sorted((fs.unstrip_protocol(m) for m in fs.find(p)), key=lambda p: p.split("/"))
    root = local_path(folder)
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
    return sorted(files, key=lambda p: p.split(os.sep))  # a folder's files before its subfolders'


def relative_parts(path: str, folder: str) -> list[str]:
    if is_remote(path):
        return path[len(folder.rstrip("/")) + 1 :].split("/")
    return list(os.path.normpath(os.path.relpath(path, local_path(folder))).split(os.sep))


def parent(path: str) -> str:
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def open_read(path: str) -> IO[bytes]:
    if is_remote(path):
        fs, p = _fs(path)
        return fs.open(p, "rb")
    return open(local_path(path), "rb")


@contextlib.contextmanager
def open_write(path: str) -> Iterator[IO[bytes]]:
    if is_remote(path):
        fs, p = _fs(path)
        f = fs.open(p, "wb")
        try:
            yield f
        except BaseException:
            discard = getattr(f, "discard", None)
            if discard is not None:
                discard()
            raise
        f.close()
        return
    path = local_path(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = path + TMP_SUFFIX
    # A full disk is one line naming the file (a DiskFull, raised in the task's process too).
    with disk.writing(os.path.basename(path), Path(folder), None, [Path(tmp)], then=RERUN):
        with disk.open_file(Path(tmp)) as f:
            yield f
        os.replace(tmp, path)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with open_write(path) as f:
        f.write(data)


def read_ranges(path: str, starts: list[int], ends: list[int]) -> list[bytes]:
    """The bytes [start, end) of each range; remotely, fetched concurrently."""
    if not starts:
        return []
    if is_remote(path):
        fs, p = _fs(path)
        return fs.cat_ranges([p] * len(starts), list(starts), list(ends))
    out = []
    with open(local_path(path), "rb") as f:
        for start, end in zip(starts, ends, strict=True):
            f.seek(start)
            out.append(f.read(end - start))
    return out


def remove(path: str) -> None:
    if is_remote(path):
        fs, p = _fs(path)
        if fs.exists(p):
            fs.rm(p)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(local_path(path))


def remove_tree(path: str) -> None:
    if is_remote(path):
        fs, p = _fs(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        return
    shutil.rmtree(local_path(path), ignore_errors=True)


def make_dirs(path: str) -> None:
    """Folders exist only locally; object storage has none to make."""
    if not is_remote(path):
        os.makedirs(local_path(path), exist_ok=True)
