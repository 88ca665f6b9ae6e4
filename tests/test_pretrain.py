"""The pretraining loop: exact resume, clean stop on SIGTERM, global-batch arithmetic."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from scratchlm.config import load_recipe
from scratchlm.documents import write_documents
from scratchlm.errors import UserError
from scratchlm.pipeline import run_tokenize, run_tokenizer
from scratchlm.train.metrics import read_metrics
from scratchlm.train.pretrain import pretrain

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.max_seq_len=32",
    "model.vocab_size=300",
    "pretrain.tokens_per_step=256",
    "pretrain.micro_batch_size=4",
    "pretrain.warmup_steps=2",
    "pretrain.eval_every=3",
    "pretrain.eval_tokens=256",
    "pretrain.save_every=3",
    "pretrain.keep_checkpoints=5",
    "pretrain.lr=1e-2",
    "pretrain.device=cpu",
    # The command line reads recipes/tiny.toml (Muon) where load_recipe(None) has the defaults.
    "pretrain.optimizer=adamw",
    "sample.max_new_tokens=8",
]


def make_corpus_run(run_dir, overrides=()):
    """A run folder with curated documents, a tokenizer and token shards."""
    import gzip

    with gzip.open(ROOT / "data/tinystories/tinystories_train_head_lowercase.txt.gz", "rt") as f:
        text = f.read(120_000)
    stories = [s for s in text.split("\n") if s.strip()]
    write_documents(
        run_dir / "curated" / "part-00000.jsonl.zst",
        ({"id": f"s{i}", "text": s, "meta": {}} for i, s in enumerate(stories)),
    )
    recipe = load_recipe(None, [*TINY, *overrides])
    run_tokenizer(recipe, run_dir)
    run_tokenize(recipe, run_dir)
    return recipe


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    make_corpus_run(run_dir)
    return run_dir


def _fresh_copy(src, dst):
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    shutil.copytree(src / "tokens", dst / "tokens")
    return dst


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_micro_batches_are_derived_from_the_global_batch(tmp_path, capsys):
    from scratchlm.config import ParallelConfig
    from scratchlm.train.loop import Session

    session = Session("pretrain", tmp_path, load_recipe(None, TINY).pretrain, ParallelConfig())
    assert session.batch_layout(8, 4) == (4, 2)
    # A rank's share smaller than the micro-batch (a small recipe on more ranks) shrinks it.
    session.dist.dp_size = 4
    assert session.batch_layout(8, 4) == (2, 1)
    assert "micro_batch_size=4 does not divide this rank's 2 rows per step; using 2" in (
        capsys.readouterr().out
    )
    session.dist.dp_size = 3
    with pytest.raises(UserError, match="a step of 8 rows does not split evenly over 3"):
        session.batch_layout(8, 4)


def test_resume_continues_exactly(corpus_run, tmp_path):
    recipe = load_recipe(None, [*TINY, "pretrain.max_steps=6"])
    full = _fresh_copy(corpus_run, tmp_path / "full")
    result = pretrain(recipe, full, progress=False)
    assert result["step"] == 6 and result["val_bpb"] > 0
    # A crash right after step 3's checkpoint: keep only that one and resume.
    cut = _fresh_copy(corpus_run, tmp_path / "cut")
    shutil.copytree(full / "pretrain" / "step-000003", cut / "pretrain" / "step-000003")
    (cut / "pretrain" / "latest").symlink_to("step-000003")
    # The crashed run had logged steps 1..6; the resume logs 4..6 again, and only once.
    shutil.copy(full / "metrics.jsonl", cut / "metrics.jsonl")
    pretrain(recipe, cut, resume=True, progress=False)
    before, after = _losses(full), _losses(cut)
    logged = [r["step"] for r in read_metrics(cut / "metrics.jsonl") if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(before[step], rel=1e-6)
    state = json.loads((cut / "pretrain/latest/trainer_state.json").read_text())
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 256


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus_run, tmp_path):
    run = _fresh_copy(corpus_run, tmp_path / "sig")
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [
        f"--set={s}"
        for s in [
            *TINY,
            "pretrain.max_steps=100000",
            "pretrain.save_every=0",
            "pretrain.eval_every=0",
        ]
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scratchlm", "pretrain", "--run-dir", str(run), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(metrics)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err and "continue with --resume" in err
    state = json.loads((run / "pretrain/latest/trainer_state.json").read_text())
    assert state["step"] == max(_losses(run))


def test_max_seconds_stops_by_the_clock_and_still_evaluates(corpus_run, tmp_path):
    run = _fresh_copy(corpus_run, tmp_path / "clock")
    recipe = load_recipe(None, [*TINY, "pretrain.max_steps=100000", "pretrain.max_seconds=1.5"])
    result = pretrain(recipe, run, progress=False)
    assert 0 < result["step"] < 100000
    assert result["val_bpb"] > 0
    lrs = [r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r]
    assert lrs[-1] < lrs[2]  # the cosine decays over the time budget, not over max_steps


def test_fresh_start_moves_earlier_checkpoints_aside(corpus_run, tmp_path):
    from scratchlm.pipeline import run_pretrain

    run = _fresh_copy(corpus_run, tmp_path / "again")
    run_pretrain(load_recipe(None, [*TINY, "pretrain.max_steps=6"]), run)
    run_pretrain(load_recipe(None, [*TINY, "pretrain.max_steps=3"]), run)
    assert [p.name for p in (run / "pretrain").glob("step-*")] == ["step-000003"]
    assert (run / "pretrain/latest").resolve().name == "step-000003"
    assert (run / "pretrain.prev/step-000006").is_dir()
    assert sorted(_losses(run)) == [1, 2, 3]


def test_shards_of_another_tokenizer_are_refused(corpus_run, tmp_path):
    run = _fresh_copy(corpus_run, tmp_path / "mismatch")
    recipe = load_recipe(None, [*TINY, "model.vocab_size=280"])
    # A new tokenizer, the old shards.
    run_tokenizer(recipe, run, texts=["a different corpus for a different tokenizer"] * 50)
    with pytest.raises(UserError, match="another tokenizer"):
        pretrain(recipe, run, progress=False)


def test_init_from_starts_from_another_checkpoint(corpus_run, tmp_path):
    from safetensors.torch import load_file

    source = _fresh_copy(corpus_run, tmp_path / "source")
    pretrain(load_recipe(None, [*TINY, "pretrain.max_steps=2"]), source, progress=False)
    run = _fresh_copy(corpus_run, tmp_path / "continued")
    # A zero learning rate leaves the weights where they started: the source's.
    frozen = ["pretrain.max_steps=1", "pretrain.lr=0", "pretrain.min_lr=0", "model.dim=64"]
    recipe = load_recipe(None, [*TINY, *frozen, f"pretrain.init_from={source}"])
    pretrain(recipe, run, progress=False)
    start = load_file(source / "pretrain/latest/model.safetensors")
    end = load_file(run / "pretrain/latest/model.safetensors")
    assert start.keys() == end.keys()
    for name, tensor in start.items():
        torch.testing.assert_close(end[name], tensor, msg=name)
    missing = load_recipe(None, [*TINY, f"pretrain.init_from={tmp_path / 'nowhere'}"])
    with pytest.raises(UserError, match="not found"):
        pretrain(missing, _fresh_copy(corpus_run, tmp_path / "missing"), progress=False)
