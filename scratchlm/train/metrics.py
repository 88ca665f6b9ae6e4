"""metrics.jsonl: one JSON object per logged step, every stage appending to the same file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path, stage: str, enabled: bool = True):
        self.path = path
        self.stage = stage
        self.enabled = enabled
        self.start = time.time()

    def write(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, **values, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


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


def drop_rows(path: Path, stage: str, after_step: int = -1) -> None:
    """Remove a stage's rows past a step: a fresh start (-1) or a resume must not log twice."""
    rows = read_metrics(path)
    kept = [r for r in rows if not (r.get("stage") == stage and r.get("step", 0) > after_step)]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
