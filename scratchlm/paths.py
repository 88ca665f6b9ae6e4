"""Where relative paths in recipes and on the command line are looked up."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve(path: str | Path) -> Path:
    """A path as given if it exists (relative to the working directory), else under the project.

    This lets `scratchlm pipeline` find recipes/tiny.toml and data/ from any directory.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = PROJECT_ROOT / p
    return candidate if candidate.exists() else p
