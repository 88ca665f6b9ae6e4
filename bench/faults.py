"""The faults a long run meets, staged on a real `scratchlm pretrain` of the tiny model: each one
how many times, how many recovered exactly (the run, continued once the cause was gone, ended with
the losses and checkpoints of an uninterrupted run), where it struck and the line the user saw.

    python bench/faults.py [--kills 20] [--disk-fulls 10] [--data-kills 10] [--data-disk-fulls 4]
                           [--seed 0] [--quick] [--json]

Curation (`scratchlm curate` of two bundled web files: 2 shards, with duplicates and rejections)
and tokenization (`scratchlm tokenize` of the result) are killed and run out of disk too; their
rerun must give the files of an uninterrupted run.

The trials are those of tests/fault_trials.py (the slow test runs the same). The real-tmpfs rows
need root to mount a tmpfs; elsewhere they are left out, with the reason printed. --quick checks
the script: one trial of each kind (the kills strike inside writes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import data_trials  # noqa: E402
import fault_trials  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILL trials")
    p.add_argument("--disk-fulls", type=int, default=10, help="full-disk trials")
    p.add_argument("--data-kills", type=int, default=10, help="kills of curate and of tokenize")
    p.add_argument("--data-disk-fulls", type=int, default=4, help="full disks of each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one trial of each kind")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = p.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        p.set_defaults(kills=1, disk_fulls=1, data_kills=1, data_disk_fulls=1)
        args = p.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = fault_trials.make_corpus(work / "corpus")
        trials = fault_trials.run_all(
            corpus, work, kills=args.kills, disk_fulls=args.disk_fulls, seed=args.seed
        )
        trials += data_trials.run_all(
            work, kills=args.data_kills, disk_fulls=args.data_disk_fulls, seed=args.seed
        )
        shown = fault_trials.table(trials, work)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.time() - start:.0f} s\n")
    print(shown)
    failed = [t for t in trials if not t.recovered]
    for trial in failed:
        print(f"FAILED: {trial.fault} at {trial.point}: {trial.problem}")
    if args.json:
        summary: dict[str, dict[str, int]] = {}
        for t in trials:
            row = summary.setdefault(t.fault, {"trials": 0, "recovered": 0})
            row["trials"] += 1
            row["recovered"] += t.recovered
        print(json.dumps({"faults": summary, "failed": len(failed)}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
