"""The state of a run folder, to assert that a refused command left it as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under folder with the sha256 of its bytes (folders as 'dir'); {} if absent."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else _sha256(p)
        for p in sorted(folder.rglob("*"))
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
