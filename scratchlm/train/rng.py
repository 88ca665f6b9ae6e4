"""Torch random-number-generator states as JSON, for checkpoints that resume exactly.

The data loader and sampling carry their own seeded generators; these are the global torch ones
(CPU and every CUDA device) that anything else may draw from.
"""

from __future__ import annotations

import base64
from typing import Any

import torch


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": _encode(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode(s) for s in state["cuda"]])
