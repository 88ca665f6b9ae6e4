"""Reading a checkpoint: verified against its manifest, single-file or sharded alike."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from scratchlm.checkpoint import sharded
from scratchlm.checkpoint.folder import MODEL_FILE, resolve_checkpoint
from scratchlm.checkpoint.safe_dcp import DCP_METADATA, read_metadata_file
from scratchlm.errors import UserError


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    trainer_state: dict[str, Any]

    def optimizer_state(self, name: str = "model") -> dict[str, Any] | None:
        p = self.path / ("optimizer.pt" if name == "model" else f"{name}.optimizer.pt")
        return torch.load(p, map_location="cpu", weights_only=True) if p.exists() else None

    def part(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and config of a trained model stored beside the main one (none if sharded)."""
        if name == "model":
            return self.tensors, self.model_config
        config = json.loads((self.path / f"{name}.config.json").read_text())
        weights = self.path / f"{name}.safetensors"
        return (load_file(str(weights)) if weights.exists() else {}), config


def load_checkpoint(path: Path, consolidate: bool = True) -> Checkpoint:
    """A verified checkpoint. A sharded (DCP) one is consolidated into full weights, or, with
    consolidate=False, comes with no tensors (the trainer loads it shard by shard)."""
    ckpt = resolve_checkpoint(path)
    tensors: dict[str, torch.Tensor] = {}
    if (ckpt / MODEL_FILE).exists():
        tensors = load_file(str(ckpt / MODEL_FILE))
    elif not (ckpt / DCP_METADATA).is_file():
        raise UserError(f"checkpoint {ckpt} has neither {MODEL_FILE} nor {DCP_METADATA}")
    elif consolidate:
        tensors = sharded.consolidate(ckpt)
    else:  # every rank refuses a crafted index here, before DCP reads it on resume
        read_metadata_file(ckpt)
    return Checkpoint(
        path=ckpt,
        tensors=tensors,
        model_config=json.loads((ckpt / "config.json").read_text()),
        trainer_state=json.loads((ckpt / "trainer_state.json").read_text()),
    )
