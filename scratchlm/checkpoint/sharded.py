"""Sharded checkpoints with torch.distributed.checkpoint (DCP), for layouts that split parameters.

    STAGE_DIR/step-000500/  .metadata  __0_0.distcp  __1_0.distcp ...   (model + optimizer, DCP)
                            config.json  trainer_state.json  manifest.json

Every rank writes its own shards in parallel. Keys are the plain model's parameter names (through
`get_state_dict`), and DCP reshards on load, so a checkpoint saved at one world size or layout
resumes at another, down to one process without a process group. `consolidate` reads the full
weights back without a model, which is how `load` and `scratchlm export` read a sharded
checkpoint. The folder is written under a temporary name and renamed, as single-file ones are.
Every read goes through `scratchlm.checkpoint.safe_dcp`, which never unpickles code.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from scratchlm import disk
from scratchlm.checkpoint import folder, safe_dcp
from scratchlm.checkpoint.safe_dcp import DCP_METADATA
from scratchlm.errors import UserError

if TYPE_CHECKING:
    from scratchlm.parallel import DistInfo


def is_sharded(path: Path) -> bool:
    return (path / DCP_METADATA).is_file()


def save_sharded(
    stage_dir: Path,
    step: int,
    parts: dict[str, tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]],
    trainer_state: dict[str, Any],
    dist: DistInfo,
    keep: int = 2,
) -> Path:
    """Collective: every rank writes its shards; rank 0 writes the rest and moves it in place.
    `parts` maps each trained model's name ("model" first) to (model, optimizer, config).

    Rank 0 checks the free space first (against the last checkpoint's size and the full state's)
    and every rank stops with the same DiskFull when it will not fit."""
    name = f"step-{step:06d}"
    what = f"checkpoint {name}"
    tmp = stage_dir / f"{folder.TMP_PREFIX}{name}"
    state: dict[str, Any] = {}
    for part, (model, optimizer, _) in parts.items():
        model_state, optim_state = get_state_dict(model, optimizer)
        _state_slot(state, part).update(model=model_state, optim=optim_state)
    needed, free = 0, 0
    if dist.is_main:
        needed = max(folder.estimate_bytes([state]), folder.last_checkpoint_bytes(stage_dir))
        try:
            folder.make_room(stage_dir, what, needed, keep)
            free = needed
        except disk.DiskFull as e:
            free = e.free
        disk.remove(tmp)
        tmp.mkdir(parents=True)
    needed, free = int(dist.from_rank0(needed)), int(dist.from_rank0(free))
    if free < needed:
        if dist.is_main:
            disk.remove(tmp)
        raise disk.DiskFull(what, stage_dir, needed, free, then=folder.RESUME)
    dist.barrier()
    with disk.writing(what, stage_dir, needed, [tmp] if dist.is_main else [], then=folder.RESUME):
        dcp.save(state, storage_writer=_writer(tmp))
        if dist.is_main:
            for part, (_, _, config) in parts.items():
                config_file = "config.json" if part == "model" else f"{part}.config.json"
                folder.write_json(tmp / config_file, config)
            folder.write_json(tmp / "trainer_state.json", trainer_state)
            folder.write_manifest(tmp)
    final = stage_dir / name
    if dist.is_main:
        folder.finish_checkpoint(tmp, stage_dir, name, keep)
    dist.barrier()
    return final


class _DiskFileSystem(FileSystem):
    """DCP's local filesystem, with files written through `disk.open_file` like every other."""

    @contextmanager
    def create_stream(self, path: str | Path, mode: str) -> Iterator[Any]:
        if "r" in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with disk.open_file(Path(path), mode) as stream:
            try:
                yield stream
            except Exception as e:
                # DCP sends each rank's error to the others pickled, which drops what it was
                # raised from (torch.save's "unexpected pos" hides the full disk): name it.
                if disk.is_disk_full(e) and not isinstance(e, OSError):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
                raise


def _writer(path: Path) -> dcp.FileSystemWriter:
    writer = dcp.FileSystemWriter(str(path))
    writer.fs = _DiskFileSystem()
    return writer


def _state_slot(state: dict[str, Any], part: str) -> dict[str, Any]:
    """Where a part's "model" and "optim" entries live: at the top for the stage's model (so its
    keys read "model.<param>", which `consolidate` takes), under the part's name for others."""
    return state if part == "model" else state.setdefault(part, {})


def load_sharded(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, part: str = "model"
) -> None:
    """Fill a (parallelised) model and its optimizer from a sharded checkpoint, resharding it to
    this rank's part."""
    model_state, optim_state = get_state_dict(model, optimizer)
    # The saved param_groups are one rank's (a pipeline stage's names, say); this layout's own
    # groups name its parameters, and their hyper-parameters come from the recipe.
    groups = copy.deepcopy(optim_state["param_groups"])
    state: dict[str, Any] = {}
    slot = _state_slot(state, part)
    slot.update(model=model_state, optim=optim_state)
    _dcp_load(state, path)
    slot["optim"]["param_groups"] = groups
    set_state_dict(model, optimizer, model_state_dict=slot["model"], optim_state_dict=slot["optim"])


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """dcp.load (through safe_dcp), also on one process without a process group (DCP warns that
    it assumes so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        safe_dcp.load(state, path, no_dist=not torch.distributed.is_initialized())


def consolidate(path: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint, read on one process without a model."""
    metadata = safe_dcp.read_metadata_file(path)
    shapes = {
        key.removeprefix("model."): meta
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    # The index's sizes are allocated before any shard is read: they must fit in the shards.
    needed = sum(math.prod(m.size) * m.properties.dtype.itemsize for m in shapes.values())
    shard_bytes = sum(p.stat().st_size for p in path.glob("*.distcp"))
    if needed > shard_bytes:
        raise UserError(
            f"checkpoint {path} is damaged: its {DCP_METADATA} describes {needed:,} bytes of "
            f"weights, its shards hold {shard_bytes:,}"
        )
    model_state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in shapes.items()}
    _dcp_load({"model": model_state}, path)
    config = json.loads((path / "config.json").read_text())
    if config.get("tie_embeddings") and "tok_embeddings.weight" in model_state:
        model_state.pop("output.weight", None)  # stored once, as single-file checkpoints do
    return model_state


def parameter_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of `model`'s parameters in `optimizer`'s order: what the positions in its state
    dict stand for."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def load_full_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    ordered: list[str],
) -> None:
    """Resume a parallelised optimizer from a single-file checkpoint's optimizer.pt, whose state
    is keyed by position in the unsplit model's optimizer: `ordered` names the positions (see
    `parameter_order`), then each rank takes its part."""
    by_name = {
        "state": {ordered[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [ordered[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
    )
