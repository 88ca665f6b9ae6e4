"""Faults under torchrun (2 CPU processes, gloo): rank 0 holds the run lock for all ranks, and a
sharded checkpoint that meets a full disk stops every rank with the same line, leaving nothing
partial, and resumes exactly."""

import subprocess
import sys

import fault_trials as ft
import pytest
from test_faults_lock import held_by_another_process

from scratchlm.train.metrics import read_metrics

FSDP = ("parallel.dp_shard=2",)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args],
        capture_output=True,
        text=True,
        env=ft.ENV,
        timeout=600,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return ft.make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.slow
def test_a_locked_run_folder_stops_every_rank(corpus, tmp_path):
    run = ft.copy_corpus(corpus, tmp_path / "run")
    with held_by_another_process(run) as holder:
        proc = torchrun("-m", "scratchlm", *ft.pretrain_args(run, extra=FSDP))
    assert proc.returncode != 0
    assert f"error: run folder {run} is in use by PID {holder.pid}" in proc.stderr
    assert not read_metrics(run / "metrics.jsonl")
    assert not (run / "pretrain").exists()


@pytest.mark.slow
def test_a_sharded_checkpoint_meets_a_full_disk_on_every_rank(corpus, tmp_path):
    reference = ft.copy_corpus(corpus, tmp_path / "reference")
    done = torchrun("-m", "scratchlm", *ft.pretrain_args(reference, extra=FSDP))
    assert done.returncode == 0, done.stderr[-3000:]
    run = ft.copy_corpus(corpus, tmp_path / "run")
    # Each rank's budget runs out inside the step-4 checkpoint's shards (the step-2 checkpoint
    # and the rows before it take about 0.4 MB per rank).
    args = ft.pretrain_args(run, extra=FSDP)
    full = torchrun(str(ft.INJECT), "--enospc-after", "600000", "--", *args)
    # One line from each rank (the two share stderr, so a line may follow rank 0's progress bar).
    assert full.stderr.count("error: ") == 2, full.stderr[-3000:]
    assert full.stderr.count("error: disk full writing checkpoint step-") == 2
    assert not ft.leftovers(run)
    resumed = torchrun("-m", "scratchlm", *ft.pretrain_args(run, "--resume", extra=FSDP))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ft.differences(run, reference) == ""
