"""The [curate] section of a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CurateConfig:
    steps: list[str] = field(default_factory=lambda: ["read", "normalize"])
    """The curation steps, in order."""
