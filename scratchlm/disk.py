"""Writing files on disks that fill up and processes that die: free-space checks, one-line errors,
no partial files left behind, and the leftovers of crashed runs cleaned away.

Every writer of the project opens its files through `open_file`, so a full disk surfaces as an
OSError with its errno (torch's serializer, given a file name instead, reports only "unexpected
pos"), and a test can make any writer hit a full disk part-way by wrapping that one function.
`writing` turns a full disk met inside it into `DiskFull`, one line naming what was being written,
where, the bytes needed and the bytes free, after removing the partial files.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from scratchlm.errors import RunFault, UserError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How libraries that write from native code (safetensors, DCP's threads) word the same errno.
FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class DiskFull(RunFault):
    """A write ran out of space; its partial files are gone. `needed` is None for a file written
    as a stream, whose size is not known ahead: the message then gives the bytes it had reached."""

    def __init__(
        self,
        what: str,
        where: Path,
        needed: int | None,
        free: int,
        then: str = "",
        written: int = 0,
    ) -> None:
        self.what, self.where, self.needed, self.free = what, where, needed, free
        self.then, self.written = then, written
        size = f"more than {format_bytes(written)}" if needed is None else format_bytes(needed)
        advice = "free some space" + (f", then {then}" if then else "")
        super().__init__(
            f"disk full writing {what} to {where}: needs {size}, {format_bytes(free)} free; "
            f"{advice}"
        )

    def __reduce__(self):  # raised in worker processes, re-raised in the driver
        args = (self.what, self.where, self.needed, self.free, self.then, self.written)
        return (DiskFull, args)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def open_file(path: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """A file opened for writing; on a clean exit its data is flushed to the disk, where a full
    disk on a network filesystem may only then show."""
    with open(path, mode) as f:
        yield f
        if not f.closed:  # DCP closes (and syncs) its files itself
            f.flush()
            os.fsync(f.fileno())


def free_bytes(path: Path) -> int:
    """Free bytes for this user on the filesystem of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tree_bytes(path: Path) -> int:
    """Bytes of the files in a folder (or of one file), links not followed."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if path.exists() or path.is_symlink() else 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from, or one rank's error inside a DCP
    CheckpointException) is a full disk or an exceeded quota."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        if any(m in str(e) for m in FULL_MESSAGES):
            return True
        failures = getattr(e, "failures", None)  # DCP: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def remove(path: Path) -> None:
    """Remove a file, link or folder if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def writing(
    what: str,
    where: Path,
    needed: int | None,
    partial: Iterable[Path] = (),
    cleanup: Callable[[], None] | None = None,
    then: str = "",
) -> Iterator[None]:
    """Write `what` into `where`. On any error the `partial` paths are removed and `cleanup` runs;
    a full disk becomes DiskFull (the free space measured after the cleanup), anything else goes
    on as it was. `needed` is the size to write (None: not known ahead, a stream); `then` says how
    to continue once space is freed."""
    try:
        yield
    except DiskFull:
        for path in partial:
            remove(path)
        raise
    except BaseException as e:
        written = sum(tree_bytes(path) for path in partial)
        for path in partial:
            remove(path)
        if cleanup is not None:
            cleanup()
        if is_disk_full(e):
            raise DiskFull(what, where, needed, free_bytes(where), then, written) from None
        raise


def check_room(what: str, where: Path, needed: int, then: str = "") -> None:
    """DiskFull before writing anything when `needed` bytes will not fit."""
    free = free_bytes(where)
    if free < needed:
        raise DiskFull(what, where, needed, free, then)


def write_atomic(path: Path, data: bytes, what: str | None = None) -> None:
    """Replace `path` by `data` in one step: a reader (or a crash) sees the old or the new file,
    never a mix; on a full disk the old file stays."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with writing(what or path.name, path.parent, len(data), partial=[tmp]):
        with open_file(tmp) as f:
            f.write(data)
        os.replace(tmp, path)


def remove_stale(folder: Path, patterns: Iterable[str]) -> tuple[list[str], int]:
    """Remove what crashed runs left in `folder` (names matching `patterns`); returns the names
    removed and the bytes freed. Call it only while holding the folder's run lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], 0
    names, freed = [], 0
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            freed += tree_bytes(path)
            remove(path)
            names.append(path.name)
    return names, freed


def say_removed(who: str, names: list[str], freed: int) -> None:
    """One line for what `remove_stale` removed (nothing when it removed nothing)."""
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    print(
        f"{who}: removed what an interrupted run left half-written ({shown}), "
        f"freeing {format_bytes(freed)}",
        flush=True,
    )


def check_writable(path: Path, what: str, files: Iterable[str] = ()) -> None:
    """UserError unless files can be created in the folder `path` (made if missing) and the named
    existing `files` in it can be appended to, so that a read-only run folder or output path stops
    a command before it does any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is not a folder")
    target = path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
        for name in files:
            target = path / name
            if target.exists():
                with open(target, "ab"):
                    pass
    except OSError as e:
        raise UserError(
            f"{what} {target} is not writable ({e.strerror or e}); fix its permissions or "
            "choose another"
        ) from None


def save_safetensors(tensors: dict, path: Path) -> None:
    """model.safetensors-style file through the safetensors library, which writes from native code
    without a copy of the tensors; its full-disk error is recognised by `is_disk_full`."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
