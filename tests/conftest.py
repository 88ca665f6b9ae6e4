import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests run the CLI in subprocesses; one thread each keeps two xdist workers off each other's cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """`python -m scratchlm ARGS` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "scratchlm", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def cli():
    return run_cli
