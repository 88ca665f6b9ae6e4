"""A real full disk: a small tmpfs (mounting one needs root, which CI has; elsewhere these tests
skip and say why). The kernel's ENOSPC, as safetensors, torch's serializer, DCP and plain writes
report it, must become the one-line DiskFull with nothing partial left behind."""

import pytest
import torch
from fault_trials import make_corpus, reference
from tmpfs_trials import Unavailable, tmpfs, tmpfs_trials

from scratchlm import checkpoint as ckpt
from scratchlm import disk
from scratchlm.model import ModelConfig, Transformer
from scratchlm.train.metrics import MetricsLog

CFG = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs, and free_bytes made to report plenty, so that the writes themselves
    (not the checks before them) meet the full disk."""
    cm = tmpfs(tmp_path / "disk", 256 * 1024)
    try:
        cm.__enter__()
    except Unavailable as e:
        print(f"skipped: {e}")
        pytest.skip(str(e))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(disk, "free_bytes", lambda path: 1 << 40)
        yield tmp_path / "disk"
    cm.__exit__(None, None, None)


def _used(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_native_and_python_writers_meet_the_real_enospc(small_disk):
    model = Transformer(CFG)  # ~0.2M parameters: 0.8 MB of weights, more than the disk
    optimizer = torch.optim.AdamW(model.parameters())
    tensors = ckpt.model_tensors(model)
    with pytest.raises(disk.DiskFull, match="disk full writing checkpoint step-000001 to "):
        ckpt.save_checkpoint(small_disk / "pretrain", 1, tensors, CFG.to_dict(), {}, None)
    assert list((small_disk / "pretrain").iterdir()) == []
    # torch.save of the optimizer state, after weights that fit.
    small = {"w": torch.zeros(1000)}
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    with pytest.raises(disk.DiskFull):
        ckpt.save_checkpoint(small_disk / "pretrain", 2, small, {}, {}, optimizer.state_dict())
    assert list((small_disk / "pretrain").iterdir()) == []
    # metrics.jsonl: fill the disk to its last bytes, then append a row.
    log = MetricsLog(small_disk / "metrics.jsonl", "pretrain")
    log.write(1, loss=1.0)
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as f, pytest.raises(OSError):
        f.write(bytes(512 * 1024))
    with pytest.raises(disk.DiskFull, match="row of step 2 of metrics.jsonl"):
        log.write(2, loss=0.5, text="x" * 8192)
    assert (small_disk / "metrics.jsonl").read_text().count("\n") == 1
    ballast.unlink()
    assert _used(small_disk) < 4096


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_meets_the_real_enospc(small_disk):
    from scratchlm.checkpoint.sharded import save_sharded
    from scratchlm.parallel import DistInfo

    model = Transformer(CFG)
    optimizer = torch.optim.AdamW(model.parameters())
    dist = DistInfo(rank=0, world_size=1, dp_rank=0, dp_size=1)
    with pytest.raises(disk.DiskFull, match="disk full writing checkpoint step-000003"):
        save_sharded(small_disk / "pretrain", 3, {"model": (model, optimizer, {})}, {}, dist)
    assert list((small_disk / "pretrain").iterdir()) == []


@pytest.mark.slow
def test_a_run_on_a_small_tmpfs_stops_in_one_line_and_resumes_exactly(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    ref = reference(corpus, tmp_path / "reference")
    try:
        trials = tmpfs_trials(corpus, ref, tmp_path)
    except Unavailable as e:
        print(f"skipped: {e}")
        pytest.skip(str(e))
    for trial in trials:
        print(trial)
        assert trial.recovered, trial
    assert "needs " in trials[0].seen and " free; free some space, then continue" in trials[0].seen
    assert trials[1].seen.startswith("note: deleted step-000002 ")
