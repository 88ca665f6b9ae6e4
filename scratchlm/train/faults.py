"""What the training loop does about the faults a long run meets, for every stage alike.

- The run folder: writable, locked against a second writer (scratchlm.runlock), and cleared of
  what a killed run left half-written, before anything is written.
- A non-finite loss or gradient norm: the update is never applied. With on_nonfinite = "stop" the
  run stops at once; with "skip" the step is counted and skipped, and after nonfinite_limit such
  steps in a row the run stops with a checkpoint. Either way one line names the step and what to
  change.
- Out of GPU memory: one line suggesting a smaller micro-batch or activation checkpointing.
A full disk is the checkpoint writer's (scratchlm/checkpoint/, scratchlm.disk).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from scratchlm import disk, runlock
from scratchlm.checkpoint.folder import TMP_PREFIX, list_checkpoints, remove_stale
from scratchlm.config import TrainConfig
from scratchlm.errors import RunFault


def take_run_folder(owner: object, stage: str, run_dir: Path, stage_dir: Path) -> Callable:
    """Rank 0, before a stage writes anything: check the folders, hold the run lock (until the
    returned callable runs, or `owner` is gone) and remove what an interrupted run left."""
    disk.check_writable(run_dir, "run folder", files=["metrics.jsonl"])
    disk.check_writable(stage_dir, "checkpoint folder")
    runlock.acquire(run_dir)
    unlock = weakref.finalize(owner, runlock.release, run_dir)
    names, freed = remove_stale(stage_dir)
    run_names, run_freed = disk.remove_stale(run_dir, [f"{TMP_PREFIX}*"])
    disk.say_removed(stage, names + run_names, freed + run_freed)
    return unlock


class NonFinitePolicy:
    """Counts the steps whose update was held back for a non-finite value and decides, after each
    step, whether the run goes on."""

    def __init__(self, stage: str, cfg: TrainConfig, skipped_steps: int = 0) -> None:
        self.stage, self.cfg = stage, cfg
        self.skipped_steps = skipped_steps
        self.in_a_row = 0

    def check(self, step: int, bad: dict[str, dict[str, float]], stage_dir: Path) -> str:
        """ "ok", "skip" (the step is counted as skipped) or "stop" (save a checkpoint, then raise
        `limit_reached`); with on_nonfinite="stop" a bad step raises RunFault here.

        `bad` maps each trained model whose update was held back to its loss and gradient norm.
        """
        if not bad:
            self.in_a_row = 0
            return "ok"
        self.in_a_row += 1
        self.skipped_steps += 1
        self._values = self._describe(bad)
        if self.cfg.on_nonfinite == "stop":
            latest = list_checkpoints(stage_dir)
            then = f"continue from {latest[-1].name} with --resume" if latest else "start again"
            raise RunFault(
                f"{self.stage}: non-finite values at step {step} ({self._values}); the update "
                f"was not applied and the run stopped. {self._advice()}, then {then}; or set "
                f"{self.stage}.on_nonfinite='skip' to skip such steps"
            )
        if self.in_a_row >= self.cfg.nonfinite_limit:
            return "stop"
        print(
            f"{self.stage}: skipped the update of step {step}: {self._values} "
            f"({self.in_a_row} in a row, {self.skipped_steps} in all; the run stops at "
            f"{self.cfg.nonfinite_limit} in a row)",
            flush=True,
        )
        return "skip"

    def limit_reached(self, step: int, saved: Path) -> RunFault:
        first = step - self.in_a_row + 1
        return RunFault(
            f"{self.stage}: non-finite values at steps {first}-{step}, {self.in_a_row} in a row "
            f"(last: {self._values}); their updates were skipped and the run stopped with a "
            f"checkpoint at {saved.name}. {self._advice()}, then continue with --resume"
        )

    def _advice(self) -> str:
        s = self.stage
        return f"Lower {s}.lr, raise {s}.warmup_steps or lower {s}.grad_clip"

    @staticmethod
    def _describe(bad: dict[str, dict[str, float]]) -> str:
        parts = []
        for name, v in bad.items():
            whose = "" if name == "model" else f"{name}: "
            parts.append(f"{whose}loss {v['loss']:g}, gradient norm {v['grad_norm']:g}")
        return "; ".join(parts)


def nonfinite_updates(trainers: Iterable[Any], metrics: dict[str, float]) -> dict[str, dict]:
    """The trainers whose update of this step was held back, by name. A stage that reports a
    non-finite loss of its own counts as its model's."""
    bad = {t.name: t.nonfinite for t in trainers if t.nonfinite is not None}
    loss = metrics.get("loss", 0.0)
    if not bad and not math.isfinite(loss):
        bad["model"] = {"loss": loss, "grad_norm": math.nan}
    return bad


@contextlib.contextmanager
def out_of_memory(session: Any) -> Iterator[None]:
    """CUDA out of memory inside the block (a session's steps and evaluations) as one line
    saying what to lower."""
    try:
        yield
    except torch.OutOfMemoryError:
        stage, device = session.stage, session.runtime.device
        micro = next(iter(session.trainers.values())).micro if session.trainers else 0
        use = ""
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            peak = torch.cuda.max_memory_allocated(device)
            use = f", {disk.format_bytes(peak)} allocated at peak of {disk.format_bytes(total)}"
        raise RunFault(
            f"{stage}: out of memory on {device} after step {session.step} (micro-batches of "
            f"{micro} rows{use}); lower {stage}.micro_batch_size (more micro-batches are "
            "accumulated, so the step stays the same) or set parallel.activation_checkpointing=true"
        ) from None
