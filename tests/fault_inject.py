"""Fault injection: a disk that fills up, or a SIGKILL, part-way through any write of scratchlm.

Every writer of scratchlm opens its files through `scratchlm.disk.open_file` (and writes
safetensors through `disk.save_safetensors`). `install` wraps both: the writes go to the real
files, byte for byte, until a budget of bytes is spent; the write that crosses it writes its part
within the budget and then raises ENOSPC (and every later write too, as a full disk does), or kills
the process and its workers with SIGKILL on the spot (run it in a session of its own).

Run as a script, it installs the wrapper in a fresh process and runs the scratchlm CLI:

    python tests/fault_inject.py --enospc-after 300000 -- pretrain --run-dir R ...
    python tests/fault_inject.py --kill-after 300000 -- pretrain --run-dir R ...
    python tests/fault_inject.py --kill-at-seconds 0.4 -- pretrain ...   # into the training loop
    python tests/fault_inject.py --kill-at-seconds 0.4 --timer curate -- curate ...
    python tests/fault_inject.py --log-writes W.json -- pretrain ...    # record what is written
    python tests/fault_inject.py --nan-at-steps 5,6 -- pretrain ...     # a diverging loss
    python tests/fault_inject.py --oom-at-step 3 -- pretrain ...        # out of memory
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class WriteBudget:
    """Bytes that may still be written; what happens when they run out ("enospc" or "kill")."""

    def __init__(self, limit: int | None = None, action: str = "enospc") -> None:
        self.limit, self.action = limit, action
        self.written = 0
        self.log: list[tuple[str, int, int]] = []
        """(path, offset of the first byte in the whole run's writes, bytes) of every write."""

    def write(self, real: Any, path: str, data: Any) -> int:
        data = memoryview(data).cast("B")
        allowed = len(data) if self.limit is None else max(0, self.limit - self.written)
        part = data[: min(allowed, len(data))]
        if len(part):
            real.write(part)
        self.log.append((path, self.written, len(part)))
        self.written += len(part)
        if len(part) < len(data):
            real.flush()
            if self.action == "kill":
                kill_everything()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return len(data)


class BudgetFile:
    """A real file whose writes draw on a WriteBudget."""

    def __init__(self, real: Any, path: Path, budget: WriteBudget) -> None:
        self._real, self._path, self._budget = real, str(path), budget

    def write(self, data: Any) -> int:
        return self._budget.write(self._real, self._path, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install(budget: WriteBudget, setattr_=setattr) -> WriteBudget:
    """Route scratchlm's writes through `budget`; `setattr_` may be pytest's
    monkeypatch.setattr, which undoes it after the test."""
    from safetensors.torch import save

    from scratchlm import disk

    @contextlib.contextmanager
    def open_file(path: Path, mode: str = "wb"):
        with open(path, mode) as f:
            yield BudgetFile(f, path, budget)

    def save_safetensors(tensors: dict, path: Path) -> None:
        data = save(tensors, metadata={"format": "pt"})
        with disk.open_file(path) as f:
            f.write(data)

    setattr_(disk, "open_file", open_file)
    setattr_(disk, "save_safetensors", save_safetensors)
    return budget


TIMED = {
    "training": ("scratchlm.train.loop", "Session", "run"),
    "curate": ("scratchlm.curate.pipeline", None, "run_curate"),
    "tokenize": ("scratchlm.shards", None, "write_token_shards"),
}
"""What a timer counts from: the training loop, a curation run, a tokenization."""


def time_stage(stage: str, record: dict[str, float], kill_at: float | None = None) -> None:
    """Record how long `stage` (a key of TIMED) runs; with `kill_at`, SIGKILL this process and
    its workers that many seconds after it starts."""
    import importlib

    module_name, class_name, name = TIMED[stage]
    owner = importlib.import_module(module_name)
    if class_name is not None:
        owner = getattr(owner, class_name)
    run = getattr(owner, name)

    def timed(*args, **kwargs):
        if kill_at is not None:
            timer = threading.Timer(kill_at, kill_everything)
            timer.daemon = True
            timer.start()
        start = time.time()
        try:
            return run(*args, **kwargs)
        finally:
            record["seconds"] = record.get("seconds", 0.0) + time.time() - start

    setattr(owner, name, timed)


def kill_everything() -> None:
    """SIGKILL this process and every process it started (its worker pool), as a scheduler or
    the OOM killer ends a job. The caller runs it in a session of its own."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


def bad_steps(steps: set[int], fault: str) -> None:
    """At these training steps (1-based), the loss becomes NaN ("nan") or the forward pass runs
    out of memory ("oom"), as a diverging run or a too-large micro-batch would."""
    import torch

    from scratchlm.train.loop import Trainer

    step = Trainer.step

    def faulty_step(self, batch, loss_fn):
        if self.session.step + 1 not in steps:
            return step(self, batch, loss_fn)

        def faulty_loss(model, micro):
            loss, metrics = loss_fn(model, micro)
            if fault == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return loss * float("nan"), metrics

        return step(self, batch, faulty_loss)

    Trainer.step = faulty_step


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--enospc-after", type=int)
    p.add_argument("--kill-after", type=int)
    p.add_argument("--kill-at-seconds", type=float)
    p.add_argument("--timer", choices=sorted(TIMED), default="training", help="counted from")
    p.add_argument("--nan-at-steps", help="comma-separated training steps whose loss is NaN")
    p.add_argument("--oom-at-step", type=int, help="a training step that runs out of memory")
    p.add_argument("--log-writes", type=Path, help="write [path, offset, bytes] rows here")
    p.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the scratchlm arguments")
    args = p.parse_args(argv)
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    sys.path.insert(0, str(ROOT))
    if args.kill_after is not None:
        budget = install(WriteBudget(args.kill_after, "kill"))
    else:
        budget = install(WriteBudget(args.enospc_after, "enospc"))
    timing: dict[str, float] = {}
    time_stage(args.timer, timing, args.kill_at_seconds)
    if args.nan_at_steps:
        bad_steps({int(s) for s in args.nan_at_steps.split(",")}, "nan")
    if args.oom_at_step is not None:
        bad_steps({args.oom_at_step}, "oom")

    def save_log() -> None:
        if args.log_writes:
            args.log_writes.write_text(json.dumps({"writes": budget.log, **timing}))

    from scratchlm.cli import main as cli_main

    try:
        return cli_main(cli_args)
    finally:
        save_log()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
