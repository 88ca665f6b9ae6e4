"""Single-file checkpoints: the whole model in `model.safetensors`, its optimizer in `optimizer.pt`.

    STAGE_DIR/step-000500/  model.safetensors  config.json  trainer_state.json  optimizer.pt
                            manifest.json (size and sha256 of every other file)
                            critic.safetensors  critic.config.json  critic.optimizer.pt  (PPO)

`model` is the stage's result (what `load`, `generate` and `export` read); a stage that trains
more than one model (PPO's value model) stores each other one under its own name. Tensors are
safetensors and the optimizer state is read back with `weights_only=True`: nothing is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from scratchlm import disk
from scratchlm.checkpoint.folder import (
    MODEL_FILE,
    RESUME,
    TMP_PREFIX,
    estimate_bytes,
    finish_checkpoint,
    last_checkpoint_bytes,
    make_room,
    write_json,
    write_manifest,
)
from scratchlm.errors import UserError

Part = tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]
"""A trained model in a checkpoint: its tensors, its config and its optimizer state."""


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied weights stored once (safetensors refuses shared storage)."""
    seen: dict[int, str] = {}
    tensors = {}
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load saved tensors; a weight stored once for tied parameters fills all its names."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    shared = {name for name, p in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    if unexpected or set(missing) - shared:
        raise UserError(
            f"checkpoint weights do not fit the model: missing {sorted(set(missing) - shared)}, "
            f"unexpected {sorted(unexpected)}"
        )


def save_checkpoint(
    stage_dir: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    trainer_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    keep: int = 2,
    others: dict[str, Part] | None = None,
) -> Path:
    """Write step-NNNNNN atomically, point `latest` at it and keep the newest `keep` checkpoints.
    `others` are further trained models, by name.

    Free space is checked first against this checkpoint's size (the larger of the last one's and
    the tensors'); a full disk met anyway leaves no partial folder behind."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    parts = [(tensors, optimizer_state), *((t, o) for t, _, o in (others or {}).values())]
    needed = max(estimate_bytes(parts), last_checkpoint_bytes(stage_dir))
    make_room(stage_dir, f"checkpoint {name}", needed, keep)
    tmp = stage_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    disk.remove(tmp)
    with disk.writing(f"checkpoint {name}", stage_dir, needed, partial=[tmp], then=RESUME):
        tmp.mkdir()
        disk.save_safetensors(tensors, tmp / MODEL_FILE)
        write_json(tmp / "config.json", model_config)
        write_json(tmp / "trainer_state.json", trainer_state)
        if optimizer_state is not None:
            write_torch(optimizer_state, tmp / "optimizer.pt")
        for part_name, (part_tensors, part_config, part_optimizer) in (others or {}).items():
            disk.save_safetensors(part_tensors, tmp / f"{part_name}.safetensors")
            write_json(tmp / f"{part_name}.config.json", part_config)
            if part_optimizer is not None:
                write_torch(part_optimizer, tmp / f"{part_name}.optimizer.pt")
        write_manifest(tmp)
    return finish_checkpoint(tmp, stage_dir, name, keep)


def write_torch(obj: Any, path: Path) -> None:
    # Through a Python file, so that a full disk reaches us as an OSError with its errno.
    with disk.open_file(path) as f:
        torch.save(obj, f)
