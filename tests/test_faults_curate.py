"""Curation and tokenization meet a full disk or a SIGKILL: one line, nothing half-written left,
and the same command run again ends with the output of an uninterrupted run.

`make test` runs the writers in-process and one killed curation; the slow test runs the trials of
bench/faults.py (10 kills and 4 full disks of each)."""

import random

import data_trials as dt
import pytest
from fault_inject import WriteBudget, install

from scratchlm import disk
from scratchlm.config import load_recipe
from scratchlm.curate.pipeline import run_curate
from scratchlm.documents import document_files
from scratchlm.shards import write_token_shards

CFG = load_recipe(None, ["curate.workers=1"]).curate


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    out = tmp_path_factory.mktemp("curated")
    run_curate(dt.INPUTS, out, CFG, progress=False)
    return out


@pytest.mark.parametrize("at", [20_000, 300_000, 700_000])
def test_curation_meets_a_full_disk(curated, tmp_path, monkeypatch, at):
    out = tmp_path / "out"
    install(WriteBudget(at), monkeypatch.setattr)
    with pytest.raises(disk.DiskFull) as caught:
        run_curate(dt.INPUTS, out, CFG, progress=False)
    assert str(caught.value).startswith("disk full writing ")
    assert "then run the same command again (finished work is kept)" in str(caught.value)
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    run_curate(dt.INPUTS, out, CFG, progress=False)
    assert dt.curated_differences(out, curated) == ""


def test_tokenization_meets_a_full_disk(curated, tmp_path, monkeypatch):
    corpus = dt.tokenize_corpus(curated, tmp_path / "corpus")
    files = document_files(corpus / "curated")
    reference = tmp_path / "reference"
    write_token_shards(files, corpus / "tokenizer.json", reference, 0.1, workers=1)
    tokens = tmp_path / "tokens"
    install(WriteBudget(30_000), monkeypatch.setattr)
    with pytest.raises(
        disk.DiskFull, match=r"writing token shard train-00000.bin to .*: needs more than "
    ):
        write_token_shards(files, corpus / "tokenizer.json", tokens, 0.1, workers=1)
    assert sorted(p.name for p in tokens.iterdir()) == []
    monkeypatch.undo()
    write_token_shards(files, corpus / "tokenizer.json", tokens, 0.1, workers=1)
    assert dt.tokens_differences(tokens, reference) == ""


def test_a_killed_curation_with_its_workers_reruns_to_the_same_output(tmp_path):
    ref = dt.curate_reference(tmp_path / "reference")
    trial = dt.kill_curate_trial(ref, tmp_path / "killed", random.Random(3), "time")
    assert trial.recovered, trial


@pytest.mark.slow
def test_curation_and_tokenization_over_many_trials(tmp_path):
    trials = dt.run_all(tmp_path, kills=10, disk_fulls=4)
    failed = [t for t in trials if not t.recovered]
    assert not failed, failed
    assert sum(t.fault == "SIGKILL, curate" for t in trials) == 10
    assert sum(t.fault == "SIGKILL, tokenize" for t in trials) == 10
