"""One writer per run folder (RUN/.lock), read-only commands beside it, and run folders or output
paths that cannot be written: one line and exit 2 before any work."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_cli

from scratchlm import checkpoint as ckpt
from scratchlm import runlock
from scratchlm.config import ParallelConfig, TrainConfig
from scratchlm.model import ModelConfig, Transformer
from scratchlm.tokenizer import train_tokenizer
from scratchlm.train.loop import Session

HOLD = """
import sys, time
from scratchlm import runlock
runlock.acquire(sys.argv[1], command="scratchlm pretrain --run-dir " + sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def held_by_another_process(run_dir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_names_its_holder_and_is_reentrant(tmp_path):
    runlock.acquire(tmp_path, command="scratchlm pipeline --run-dir x")
    runlock.acquire(tmp_path)  # the pipeline's stages, in the same process
    info = json.loads((tmp_path / ".lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["command"] == "scratchlm pipeline --run-dir x" and info["started"] <= time.time()
    runlock.release(tmp_path)
    assert (tmp_path / ".lock").exists()
    runlock.release(tmp_path)
    assert not (tmp_path / ".lock").exists() and not runlock.holds(tmp_path)


def test_a_second_writer_is_refused_and_a_dead_holder_taken_over(tmp_path, capsys):
    with held_by_another_process(tmp_path) as holder:
        with pytest.raises(runlock.RunLocked) as caught:
            runlock.acquire(tmp_path)
        assert f"is in use by PID {holder.pid} on {socket.gethostname()} since " in str(
            caught.value
        )
        assert "(scratchlm pretrain --run-dir " in str(caught.value)
    # Killed: the kernel dropped its flock, the file still names it.
    assert runlock.holder(tmp_path)["pid"] == holder.pid
    runlock.acquire(tmp_path)
    try:
        out = capsys.readouterr().out
        assert f"note: took over the lock of {tmp_path.resolve()} from PID {holder.pid}" in out
        assert "which is no longer running" in out
        assert runlock.holder(tmp_path)["pid"] == os.getpid()
    finally:
        runlock.release(tmp_path)


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    record = {"pid": 1, "host": "node-17", "command": "scratchlm pretrain", "started": 0}
    (tmp_path / ".lock").write_text(json.dumps(record))
    with pytest.raises(runlock.RunLocked, match=r"in use by PID 1 on node-17 .*delete .*\.lock"):
        runlock.acquire(tmp_path)


def test_every_training_stage_holds_the_lock_through_its_session(tmp_path):
    cfg = TrainConfig(device="cpu")
    session = Session("toy", tmp_path, cfg, ParallelConfig(), progress=False)
    assert runlock.holder(tmp_path)["pid"] == os.getpid()
    session.close()
    assert runlock.holder(tmp_path) is None
    with held_by_another_process(tmp_path), pytest.raises(runlock.RunLocked):
        Session("toy", tmp_path, cfg, ParallelConfig(), progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder with a tokenizer and a checkpoint, as `pretrain` leaves it."""
    run = tmp_path_factory.mktemp("trained")
    tok = train_tokenizer(["once upon a time there was a cat"] * 30, 300, run / "tokenizer.json")
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ckpt.save_checkpoint(run / "pretrain", 1, ckpt.model_tensors(model), cfg.to_dict(), {"step": 1})
    return run


def test_writers_stop_and_readers_go_on_beside_a_running_stage(trained_run, tmp_path):
    with held_by_another_process(trained_run) as holder:
        refused = run_cli("report", "--run-dir", str(trained_run))
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            f"error: run folder {trained_run} is in use by PID {holder.pid} on "
            + refused.stderr.split(" on ", 1)[1].strip()
        ]
        assert not (trained_run / "report.html").exists()
        out = tmp_path / "hf"
        export = run_cli("export", str(trained_run), "--format", "hf", "--out", str(out))
        assert export.returncode == 0, export.stderr
        generate = run_cli(
            "generate", str(trained_run), "--prompt", "once", "--max-new-tokens", "3"
        )
        assert generate.returncode == 0, generate.stderr


def _read_only(path):
    """Make `path` read-only for this process: by its mode, or (as root, whom modes do not stop)
    by a read-only bind mount. None when neither works here, with the reason."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    mount = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mount.returncode != 0:
        return mount.stderr.decode().strip() or "mount --bind failed"
    remount = subprocess.run(
        ["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True
    )
    if remount.returncode != 0:
        subprocess.run(["umount", str(path)])
        return remount.stderr.strip() or "remount read-only failed"
    return lambda: subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_run_folder_or_output_is_one_line_before_any_work(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_bytes((trained_run / "tokenizer.json").read_bytes())
    (run / "curated").mkdir()  # what tokenize reads: it checks its inputs before the folder
    out = tmp_path / "out"
    out.mkdir()
    undo_run, undo_out = _read_only(run), _read_only(out)
    for undo in (undo_run, undo_out):
        if isinstance(undo, str):
            print(f"skipped: cannot make a folder read-only here: {undo}")
            pytest.skip(f"cannot make a folder read-only here: {undo}")
    try:
        proc = run_cli("tokenize", "--run-dir", str(run))
        assert proc.returncode == 2
        assert proc.stderr.splitlines() == [
            f"error: run folder {run} is not writable ("
            + proc.stderr.split(" is not writable (", 1)[1].strip()
        ]
        assert "fix its permissions or choose another" in proc.stderr
        proc = run_cli("export", str(trained_run), "--format", "hf", "--out", str(out / "hf"))
        assert proc.returncode == 2
        assert proc.stderr.startswith(f"error: export folder {out / 'hf'} is not writable")
        assert len(proc.stderr.splitlines()) == 1
    finally:
        undo_run()
        undo_out()
    assert sorted(p.name for p in run.iterdir()) == ["curated", "tokenizer.json"]
