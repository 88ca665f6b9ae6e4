"""The run folder on a real small tmpfs: a disk that is really full (mounting one needs root,
which CI has; elsewhere `Unavailable` says why not)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from fault_trials import (
    Reference,
    Trial,
    copy_corpus,
    differences,
    leftovers,
    pretrain_args,
    scratchlm,
    seen_line,
)


class Unavailable(Exception):
    """A fault this machine cannot stage (mounting a tmpfs needs root)."""


PAGE = 4096


def _pages(path: Path) -> int:
    """Bytes the files under `path` take on a tmpfs (whole pages)."""
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: int):
    """A real tmpfs of `size` bytes at `mount_point`; yields a function that resizes it."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise Unavailable(f"mount -t tmpfs: {done.stderr.strip() or 'not allowed here'}")

    def resize(new_size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(mount_point)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def tmpfs_trials(corpus: Path, ref: Reference, workdir: Path) -> list[Trial]:
    """The run folder on a real small tmpfs (as root). (a) keep_checkpoints=1 and room for one
    checkpoint and a half: step 2 fits, step 4 is refused before it is written; the tmpfs is then
    enlarged and --resume must end as the reference. (b) keep_checkpoints=2 and room for two and
    a half: the oldest checkpoint goes first, with a note, and the run ends as the reference."""
    checkpoint = _pages(ref.run / "pretrain" / "step-000008")
    base = _pages(ref.run) - _pages(ref.run / "pretrain") + 4 * PAGE
    trials = []
    for keep, room, fault in [
        (1, 1.5, "disk full, real tmpfs"),
        (2, 2.5, "disk full, real tmpfs, keep=2"),
    ]:
        size = base + int(room * checkpoint) + 8 * PAGE
        with tmpfs(workdir / f"tmpfs-keep{keep}", size) as resize:
            run = copy_corpus(corpus, workdir / f"tmpfs-keep{keep}" / "run")
            keep_set = (f"pretrain.keep_checkpoints={keep}",)
            first = scratchlm(*pretrain_args(run, extra=keep_set))
            point = f"a {size / 2**20:.2f} MiB tmpfs, checkpoints of {checkpoint / 2**20:.2f} MiB"
            problems = []
            if keep == 1:
                line = seen_line(first)
                if first.returncode != 1 or not line.startswith(
                    "error: disk full writing checkpoint step-000004"
                ):
                    problems.append(f"exit {first.returncode}: {line}")
                if left := leftovers(run):
                    problems.append(f"left behind: {left}")
                resize(size + 4 * checkpoint)
                resumed = scratchlm(*pretrain_args(run, "--resume", extra=keep_set))
                if resumed.returncode != 0:
                    problems.append(f"the resume failed: {seen_line(resumed)}")
            else:
                notes = [ln for ln in first.stdout.splitlines() if ln.startswith("note: deleted")]
                line = (notes or [seen_line(first)])[0]
                if first.returncode != 0 or len(notes) != 2:
                    problems.append(f"exit {first.returncode}, notes {notes}")
            if not problems:
                problems.append(differences(run, ref.run, all_checkpoints=keep == 2))
        problem = "; ".join(p for p in problems if p)
        trials.append(Trial(fault, point, not problem, line, problem))
    return trials
