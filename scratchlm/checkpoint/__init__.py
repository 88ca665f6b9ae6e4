"""Checkpoints: their format, writing and reading them, at any layout, without unpickling.

    folder.py        a stage's step-NNNNNN folders: manifest, atomic rename, `latest`, keeping
                     the newest, room on the disk, finding the newest good one
    consolidated.py  the single-file format: model.safetensors, optimizer.pt (weights_only)
    sharded.py       the sharded format (torch.distributed.checkpoint): every rank its shards;
                     resharding on load, consolidation into full weights
    safe_dcp.py      DCP reads that never run code: the restricted metadata unpickler
    read.py          `load_checkpoint`: a verified checkpoint of either format
    manager.py       `CheckpointManager`, the training loop's `save` and `restore`

Everything that reads checkpoints (loading, evaluation, export, the stages) imports from here;
the package imports nothing above it but the parallel layout the manager saves from.
"""

from scratchlm.checkpoint.consolidated import load_weights, model_tensors, save_checkpoint
from scratchlm.checkpoint.folder import list_checkpoints, resolve_checkpoint, verify
from scratchlm.checkpoint.read import Checkpoint, load_checkpoint
from scratchlm.checkpoint.sharded import is_sharded

__all__ = [
    "Checkpoint",
    "is_sharded",
    "list_checkpoints",
    "load_checkpoint",
    "load_weights",
    "model_tensors",
    "resolve_checkpoint",
    "save_checkpoint",
    "verify",
]
