"""Faults met by a real `scratchlm pretrain`, each followed by the run continuing once the cause is
gone (tests/fault_trials.py): SIGKILL at random moments and inside random writes, a disk that
fills up part-way, a double launch, damaged token shards, non-finite losses, out of memory.

`make test` runs a few; the slow test runs the full count (20 kills, 10 full disks, ...) and
prints the table of docs/faults.md (also printed by `python bench/faults.py`).
"""

import random

import fault_trials as ft
import pytest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return ft.make_corpus(tmp_path_factory.mktemp("corpus"))


def test_kills_a_full_disk_and_a_double_launch(corpus, tmp_path):
    ref = ft.reference(corpus, tmp_path / "reference")
    rng = random.Random(1)
    trials = [
        ft.kill_trial(corpus, ref, tmp_path / "kill-time", rng, "time"),
        ft.kill_trial(corpus, ref, tmp_path / "kill-bytes", rng, "bytes"),
        ft.disk_full_trial(corpus, ref, tmp_path / "full", rng),
        ft.double_launch_trial(corpus, tmp_path / "double"),
    ]
    for trial in trials:
        assert trial.recovered, trial
    assert trials[2].seen.startswith("error: disk full writing ")
    assert " free; free some space, then continue with --resume" in trials[2].seen
    assert trials[3].seen.startswith(f"error: run folder {tmp_path / 'double'} is in use by PID")


@pytest.mark.slow
def test_every_fault_over_many_trials(corpus, tmp_path):
    trials = ft.run_all(corpus, tmp_path, kills=20, disk_fulls=10)
    print("\n" + ft.table(trials, tmp_path))
    failed = [t for t in trials if not t.recovered]
    assert not failed, failed
    assert sum(t.fault == "SIGKILL, pretrain" for t in trials) >= 20
    assert sum(t.fault == "disk full, pretrain" for t in trials) >= 10
