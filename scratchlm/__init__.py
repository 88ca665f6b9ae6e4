"""scratchlm: build a large language model from scratch, end to end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scratchlm.loading import load

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    # `import scratchlm` stays light (no torch) until the API is used.
    if name == "load":
        from scratchlm.loading import load

        return load
    raise AttributeError(name)
