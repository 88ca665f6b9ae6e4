"""RUN/.lock: one writing process per run folder.

A double launch, or a requeued job started while the old one still runs, would interleave two
processes' rows in metrics.jsonl and overwrite each other's checkpoints. Every command that writes
into a run folder holds its lock (under torchrun, rank 0 does); a second one stops before it
writes anything, with one line naming the holder, and exits 2. Read-only commands (generate, eval,
export, serve) take no lock, so a run can be watched while it trains.

The lock is an flock on RUN/.lock, which the kernel drops when its process dies, however it dies.
The file names the holder (PID, host, command, start time) for the message. A lock file left by a
process that is gone from this host is taken over with a note. One left by another host is not
(its process cannot be seen from here): the message says to delete it once that process is gone.
Within one process the lock is re-entrant, so `pipeline` holds it across the stages it runs.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError

LOCK_FILE = ".lock"
COMMAND_SHOWN = 80


class RunLocked(UserError):
    """Another process writes into this run folder."""


@dataclass
class _Held:
    fd: int
    inode: int
    count: int


_held: dict[Path, _Held] = {}


def _describe(info: dict[str, Any]) -> str:
    started = info.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    command = str(info.get("command", "?"))
    if len(command) > COMMAND_SHOWN:
        command = command[: COMMAND_SHOWN - 3] + "..."
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')} since {since} ({command})"


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def holder(run_dir: Path) -> dict[str, Any] | None:
    """What RUN/.lock says about its holder, or None when there is no lock file."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def acquire(run_dir: Path, command: str | None = None) -> None:
    """Hold RUN/.lock (RUN must exist), or raise RunLocked naming the process that holds it."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key].count += 1
        return
    path = key / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kernel_lock = True
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                kernel_lock = False  # a filesystem without flock: the file's PID decides
            else:
                info = _read(fd)
                os.close(fd)
                raise RunLocked(_in_use(key, info)) from None
        # The holder may have released (and removed) the file between our open and our flock.
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)
    info = _read(fd)
    host = socket.gethostname()
    if info.get("pid") not in (None, os.getpid()):
        other_host = info.get("host") != host
        if other_host or (not kernel_lock and process_alive(int(info["pid"]))):
            os.close(fd)
            message = _in_use(key, info)
            if other_host:
                message += f"; if that process is gone, delete {path}"
            raise RunLocked(message)
        print(
            f"note: took over the lock of {key} from {_describe(info)}, which is no longer running",
            flush=True,
        )
    mine = {
        "pid": os.getpid(),
        "host": host,
        "command": command or " ".join(["scratchlm", *sys.argv[1:]]),
        "started": round(time.time(), 3),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
    os.fsync(fd)
    _held[key] = _Held(fd, os.fstat(fd).st_ino, 1)


def _in_use(key: Path, info: dict[str, Any]) -> str:
    who = _describe(info) if info else "another process"
    return f"run folder {key} is in use by {who}; wait for it to finish, or stop it"


def release(run_dir: Path) -> None:
    """Let go of a lock taken by `acquire` (the last release of a re-entrant one removes it)."""
    key = Path(run_dir).resolve()
    held = _held.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _held[key]
    path = key / LOCK_FILE
    try:
        if os.stat(path).st_ino == held.inode:
            path.unlink()
    except FileNotFoundError:
        pass
    os.close(held.fd)  # drops the flock


def holds(run_dir: Path) -> bool:
    return Path(run_dir).resolve() in _held


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        _held[key].count = 1
        release(key)
