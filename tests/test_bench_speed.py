"""The speed benchmarks run end to end on CPU (figures are not asserted: they depend on the
machine; the benchmarks themselves compare both sides in one run)."""

import json
import subprocess
import sys

from conftest import ROOT


def _run(*args, timeout=300):
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpu_bench_runs_on_cpu():
    """bench/gpu.py's whole path (one-device FSDP2 mesh, the recipe's optimizer, transformers
    beside) on the demo recipe, as `--device cpu --steps 2` checks it where no GPU is."""
    result = _run(
        "bench/gpu.py",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--optimizer",
        "muon",
        "--json",
    )
    rows = {r["model"]: r for r in result["results"]}
    assert set(rows) == {"scratchlm", "transformers"}
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 for r in rows.values())
    assert rows["scratchlm"]["params"] == rows["transformers"]["params"]
    assert result["ratios"]["tiny"] > 0
