"""metrics.jsonl: one JSON object per logged step, every stage appending to the same file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from scratchlm import disk


class MetricsLog:
    def __init__(self, path: Path, stage: str, enabled: bool = True):
        self.path = path
        self.stage = stage
        self.enabled = enabled
        self.start = time.time()

    def write(self, step: int, **values: Any) -> None:
        """Append one row. On a full disk the row's partial bytes are cut off again, so the file
        stays whole lines, and the run stops with DiskFull."""
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, **values, "time": round(time.time(), 3)}
        line = (json.dumps(row) + "\n").encode()
        size = self.path.stat().st_size if self.path.exists() else 0

        def cut() -> None:
            with open(self.path, "r+b") as f:
                f.truncate(size)

        what = f"the {self.stage} row of step {step} of {self.path.name}"
        with disk.writing(
            what, self.path.parent, len(line), cleanup=cut, then="continue with --resume"
        ):
            with disk.open_file(self.path, "ab") as f:
                f.write(line)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash; the rest is still good
    return rows


def drop_rows(path: Path, stage: str, after_step: int = -1, evaluation_too: bool = False) -> None:
    """Remove a stage's rows past a step: a fresh start (-1) or a resume must not log twice;
    with `evaluation_too`, also the evaluation rows at that step (a finished run resumed
    evaluates again). A line cut short by a killed process goes too, so the next row starts on a
    line of its own. The file is replaced in one step: a crash meanwhile leaves the old one."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    rows = read_metrics(path)

    def dropped(r: dict[str, Any]) -> bool:
        if r.get("stage") != stage:
            return False
        step = r.get("step", 0)
        return step > after_step or (evaluation_too and step == after_step and "loss" not in r)

    kept = [r for r in rows if not dropped(r)]
    if len(kept) != len(lines) or (lines and not lines[-1].endswith("\n")):
        data = "".join(json.dumps(r) + "\n" for r in kept).encode()
        disk.write_atomic(path, data, what=path.name)
