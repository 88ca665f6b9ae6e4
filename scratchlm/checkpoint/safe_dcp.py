"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP keeps a sharded checkpoint's index in `.metadata`, which torch's FileSystemReader reads with
plain `pickle.load`, and the non-tensor values of a state dict (an optimizer's learning rates and
betas) as `torch.save` pickles that its DefaultLoadPlanner reads with `weights_only=False`. Either
runs whatever a crafted file names, and a manifest listing the file with its true sha256 does not
stop that. Every DCP read in scratchlm goes through `SafeReader` and `SafeLoadPlanner` instead:

- `.metadata` is unpickled by `MetadataUnpickler`, which resolves only the classes DCP's metadata
  is made of (below) and refuses any other name with one line;
- the index may name only shard files inside the checkpoint folder;
- non-tensor values are read with `torch.load(weights_only=True)`, as tensors already are.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from scratchlm.errors import UserError

DCP_METADATA = ".metadata"

_DCP_METADATA_CLASSES = (
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("torch.distributed.checkpoint.metadata", name) for name in _DCP_METADATA_CLASSES}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        # torch.layout pickles as _get_layout("torch.strided"), a lookup in torch's own layouts.
        ("torch.serialization", "_get_layout"),
        # StorageMeta.checkpoint_id: the folder the checkpoint was written to.
        ("pathlib", "PosixPath"),
        ("pathlib._local", "PosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
)
"""(module, name) of every global a genuine DCP `.metadata` pickle refers to."""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only METADATA_GLOBALS: a pickle naming anything else (os.system,
    builtins.eval, a class with side effects) is refused before that thing is looked up."""

    def __init__(self, file: Any, checkpoint: Path) -> None:
        super().__init__(file)
        self.checkpoint = checkpoint

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in METADATA_GLOBALS:
            raise UserError(
                f"checkpoint {self.checkpoint} is refused: its {DCP_METADATA} names "
                f"{module}.{name}, which DCP metadata never holds (loading it could run code)"
            )
        return super().find_class(module, name)


def read_metadata_file(checkpoint: Path) -> Metadata:
    """The DCP index of a sharded checkpoint folder, read by MetadataUnpickler and checked to name
    only shard files inside the folder."""
    try:
        with open(checkpoint / DCP_METADATA, "rb") as f:
            metadata = MetadataUnpickler(f, checkpoint).load()
    except UserError:
        raise
    except Exception as e:  # a truncated or garbled pickle raises almost anything
        raise UserError(
            f"checkpoint {checkpoint} is damaged: {DCP_METADATA} is not DCP metadata "
            f"({type(e).__name__}: {e})"
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UserError(f"checkpoint {checkpoint} is damaged: {DCP_METADATA} is not DCP metadata")
    for info in metadata.storage_data.values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or Path(relative).name != relative or relative == "..":
            raise UserError(
                f"checkpoint {checkpoint} is refused: its {DCP_METADATA} points outside the "
                f"checkpoint folder ({relative!r})"
            )
    return metadata


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata comes through `read_metadata_file`."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # rank-local metadata: scratchlm never writes it
            raise UserError(f"checkpoint {self.checkpoint} has no {DCP_METADATA}")
        metadata = read_metadata_file(self.checkpoint)
        # As FileSystemReader.read_metadata does: tag the metadata with this load.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor values with weights_only=True."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        self.checkpoint = checkpoint

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # a refused global (UnpicklingError) or garbled bytes
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"checkpoint {self.checkpoint} is refused: its value {read_item.dest_index.fqn} "
                f"is not plain data ({first_line})"
            ) from None
        # The parent unpickles with weights_only=False: it gets the admitted value pickled afresh,
        # which names nothing beyond what weights_only allowed.
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def load(state: dict[str, Any], checkpoint: Path, no_dist: bool) -> None:
    """dcp.load through SafeReader and SafeLoadPlanner; a refusal on any rank is raised as its
    UserError (DCP wraps each rank's errors in a CheckpointException)."""
    reader, planner = SafeReader(checkpoint), SafeLoadPlanner(checkpoint)
    try:
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except dcp.CheckpointException as e:
        refusals = [exc for exc, _ in e.failures.values() if isinstance(exc, UserError)]
        if refusals:
            raise refusals[0] from None
        raise
