"""A stage's checkpoint folders: one per step, written atomically, verified on load.

    STAGE_DIR/step-000500/  the checkpoint's files (consolidated.py or sharded.py)
                            manifest.json (size and sha256 of every other file)
    STAGE_DIR/latest -> step-000500

A checkpoint is written to a temporary folder and renamed into place, and `latest` moves last, so a
crash never leaves a half-written checkpoint behind `latest`. On load the manifest is checked; a
damaged checkpoint found through `latest` falls back to the newest good one, with a warning.

A full disk is checked for before writing (against the last checkpoint's size) and, met anyway,
ends the run with one line and no partial folder; the `.tmp-*` folders of runs killed while
writing are removed when the next run of the stage starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from scratchlm import disk
from scratchlm.errors import UserError

MODEL_FILE = "model.safetensors"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
SMALL_FILES_BYTES = 1 << 16
RESUME = "continue with --resume"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    with disk.open_file(path) as f:
        f.write(json.dumps(data, indent=2).encode())


def write_manifest(folder: Path) -> None:
    manifest = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())
    }
    write_json(folder / MANIFEST, manifest)


def estimate_bytes(parts: list[tuple[Any, Any]]) -> int:
    """Bytes the tensors in these (nested) states take on disk, plus room for the small files."""

    def tensor_bytes(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensor_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(v) for v in obj)
        return 0

    return tensor_bytes(parts) + SMALL_FILES_BYTES


def last_checkpoint_bytes(stage_dir: Path) -> int:
    existing = list_checkpoints(stage_dir)
    return disk.tree_bytes(existing[-1]) if existing else 0


def make_room(stage_dir: Path, what: str, needed: int, keep: int) -> None:
    """Make sure `needed` bytes fit before a checkpoint is written, or raise DiskFull.

    When they do not, the checkpoints that keep_checkpoints would delete after this write are
    deleted first, oldest first, but only while a newer complete checkpoint remains to resume
    from."""
    if disk.free_bytes(stage_dir) >= needed:
        return
    existing = list_checkpoints(stage_dir)
    latest = (stage_dir / "latest").resolve() if (stage_dir / "latest").exists() else None
    doomed = existing[: len(existing) - keep + 1] if keep > 0 else []
    for old in doomed:
        newer = [c for c in existing if c.name > old.name]
        if old.resolve() == latest or not any(verify(c, hashes=False) is None for c in newer):
            break
        freed = disk.tree_bytes(old)
        remove_checkpoint(old)
        existing.remove(old)
        print(
            f"note: deleted {old.name} ({disk.format_bytes(freed)}) before writing {what}, "
            f"to make room; keep_checkpoints={keep} would have deleted it after",
            flush=True,
        )
        if disk.free_bytes(stage_dir) >= needed:
            return
    disk.check_room(what, stage_dir, needed, then=RESUME)


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint folder: renamed out of sight first, so a crash half-way never leaves a
    partial step-* folder that looks like a checkpoint."""
    doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}-{os.getpid()}")
    path.rename(doomed)
    disk.remove(doomed)


def remove_stale(stage_dir: Path) -> tuple[list[str], int]:
    """Remove the unfinished checkpoint folders and links that crashed runs left in a stage
    folder; returns their names and the bytes freed. Only under the run lock."""
    return disk.remove_stale(stage_dir, [f"{TMP_PREFIX}*", ".latest-*"])


def finish_checkpoint(tmp: Path, stage_dir: Path, name: str, keep: int) -> Path:
    """Rename a complete temporary folder (with its manifest) into place, move `latest` and keep
    the newest `keep` checkpoints."""
    final = stage_dir / name
    if final.exists():  # the same step saved again: the old one goes once the new one is there
        replaced = final.with_name(f"{TMP_PREFIX}replaced-{name}-{os.getpid()}")
        final.rename(replaced)
        tmp.rename(final)
        disk.remove(replaced)
    else:
        tmp.rename(final)
    _point_latest(stage_dir, name)
    for old in list_checkpoints(stage_dir)[:-keep] if keep > 0 else []:
        remove_checkpoint(old)
    return final


def _point_latest(stage_dir: Path, name: str) -> None:
    link = stage_dir / "latest"
    tmp_link = stage_dir / f".latest-{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(name)
    os.replace(tmp_link, link)


def list_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first."""
    if not stage_dir.is_dir():
        return []
    return sorted(p for p in stage_dir.glob("step-*") if p.is_dir())


def verify(ckpt: Path, hashes: bool = True) -> str | None:
    """None when every file matches the manifest, else what is wrong. hashes=False checks only
    that the checkpoint is complete (every file there, at its size)."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest.json is corrupt"
    for fname, want in manifest.items():
        p = ckpt / fname
        if not p.is_file():
            return f"{fname} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"{fname} has {p.stat().st_size} bytes, expected {want['bytes']}"
        if hashes and _sha256(p) != want["sha256"]:
            return f"{fname} does not match its recorded sha256"
    return None


def resolve_checkpoint(path: Path) -> Path:
    """A verified checkpoint folder for a checkpoint path, a stage folder or its `latest` link.

    An explicitly named checkpoint that is damaged is an error naming it; through a stage folder or
    `latest`, the newest good checkpoint is used instead, with a warning.
    """
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / MANIFEST).exists() or (path / MODEL_FILE).exists():
        if path.name != "latest":
            problem = verify(path)
            if problem:
                raise UserError(f"checkpoint {path} is damaged: {problem}")
            return path
        path = path.resolve().parent
    candidates = list_checkpoints(path)
    if not candidates:
        raise UserError(f"no checkpoint in {path}")
    latest = (path / "latest").resolve() if (path / "latest").exists() else candidates[-1]
    ordered = [latest] + [c for c in reversed(candidates) if c != latest]
    for ckpt in ordered:
        problem = verify(ckpt)
        if problem is None:
            if ckpt != ordered[0]:
                print(f"warning: using {ckpt.name} instead", file=sys.stderr)
            return ckpt
        print(f"warning: checkpoint {ckpt} is damaged ({problem})", file=sys.stderr)
    raise UserError(f"every checkpoint in {path} is damaged")
