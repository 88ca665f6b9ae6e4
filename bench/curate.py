"""End-to-end curation speed on the bundled web sample: documents/s, MB/s and time per step.

    python bench/curate.py [--workers N] [--json]

Runs the default steps over data/web (plus the TinyStories file with the demo's separator when
--with-tinystories) into a temporary folder. Step times are CPU seconds summed over workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratchlm.curate.config import CurateConfig  # noqa: E402
from scratchlm.curate.pipeline import run_curate  # noqa: E402

TINYSTORIES_SEPARATOR = "(?<!\n)\n(?!\n)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--with-tinystories", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    inputs = [str(ROOT / "data" / "web")]
    cfg = CurateConfig(workers=args.workers)
    if args.with_tinystories:
        inputs.append(str(ROOT / "data" / "tinystories"))
        cfg.text_separator = TINYSTORIES_SEPARATOR
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        stats = run_curate(inputs, Path(tmp) / "out", cfg, progress=False)
        wall = time.perf_counter() - t0
    read = stats["steps"][0]
    print(f"{'step':18} {'docs in':>8} {'docs out':>9} {'MB in':>7} {'cpu s':>7}")
    for s in stats["steps"]:
        print(
            f"{s['step']:18} {s['docs_in']:8d} {s['docs_out']:9d} "
            f"{s['bytes_in'] / 1e6:7.2f} {s['seconds']:7.2f}"
        )
    docs_per_s = read["docs_in"] / wall
    mb_per_s = read["bytes_in"] / 1e6 / wall
    print(f"wall {wall:.1f} s: {docs_per_s:.0f} documents/s, {mb_per_s:.2f} MB/s")
    if args.json:
        result = {
            "docs_in": read["docs_in"],
            "bytes_in": read["bytes_in"],
            "docs_out": stats["output"]["docs"],
            "wall_s": round(wall, 2),
            "docs_per_s": round(docs_per_s, 1),
            "mb_per_s": round(mb_per_s, 3),
            "step_seconds": {s["step"]: s["seconds"] for s in stats["steps"]},
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
