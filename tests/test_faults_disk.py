"""A full disk at each writer: one line naming what, where, bytes needed and free; no partial file
left; what was there before intact; the leftovers of killed runs removed at the next start."""

import json
import random

import pytest
import torch
from fault_inject import WriteBudget, install
from safetensors.torch import load_file

from scratchlm import checkpoint as ckpt
from scratchlm import disk
from scratchlm.config import ParallelConfig, TrainConfig, load_recipe, save_recipe
from scratchlm.model import ModelConfig, Transformer
from scratchlm.pipeline import StageLog
from scratchlm.train.loop import Session
from scratchlm.train.metrics import MetricsLog, drop_rows, read_metrics

CFG = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8)


def _model_state(seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(CFG)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    return ckpt.model_tensors(model), optimizer.state_dict()


def _save(stage_dir, step, keep=2, seed=0):
    tensors, optimizer = _model_state(seed)
    return ckpt.save_checkpoint(
        stage_dir, step, tensors, CFG.to_dict(), {"step": step}, optimizer, keep
    )


def _bytes_of_a_checkpoint(tmp_path) -> int:
    budget = WriteBudget()
    with pytest.MonkeyPatch.context() as mp:
        install(budget, mp.setattr)
        _save(tmp_path / "measure", 1)
    return budget.written


@pytest.mark.parametrize("trial", range(4))
def test_checkpoint_write_meets_a_full_disk(tmp_path, monkeypatch, trial):
    stage_dir = tmp_path / "pretrain"
    _save(stage_dir, 2)
    before = {p.name: p.read_bytes() for p in (stage_dir / "step-000002").iterdir()}
    # The disk fills up at a random byte of the next checkpoint (model, optimizer, json files).
    at = random.Random(trial).randrange(_bytes_of_a_checkpoint(tmp_path))
    install(WriteBudget(at), monkeypatch.setattr)
    with pytest.raises(disk.DiskFull) as caught:
        _save(stage_dir, 4)
    message = str(caught.value)
    assert message.startswith(f"disk full writing checkpoint step-000004 to {stage_dir}: needs ")
    assert " free; free some space, then continue with --resume" in message
    assert caught.value.needed >= disk.tree_bytes(stage_dir / "step-000002")
    assert sorted(p.name for p in stage_dir.iterdir()) == ["latest", "step-000002"]
    assert (stage_dir / "latest").resolve().name == "step-000002"
    assert {p.name: p.read_bytes() for p in (stage_dir / "step-000002").iterdir()} == before


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_write_meets_a_full_disk(tmp_path, monkeypatch):
    from scratchlm.checkpoint.sharded import save_sharded
    from scratchlm.parallel import DistInfo

    stage_dir = tmp_path / "pretrain"
    model = Transformer(CFG)
    optimizer = torch.optim.AdamW(model.parameters())
    parts = {"model": (model, optimizer, CFG.to_dict())}
    dist = DistInfo(rank=0, world_size=1, dp_rank=0, dp_size=1)
    save_sharded(stage_dir, 2, parts, {"step": 2}, dist)
    install(WriteBudget(5000), monkeypatch.setattr)
    with pytest.raises(disk.DiskFull, match="disk full writing checkpoint step-000004 to "):
        save_sharded(stage_dir, 4, parts, {"step": 4}, dist)
    assert sorted(p.name for p in stage_dir.iterdir()) == ["latest", "step-000002"]
    assert ckpt.verify(stage_dir / "step-000002") is None


def test_a_checkpoint_that_will_not_fit_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    stage_dir = tmp_path / "pretrain"
    _save(stage_dir, 2, keep=1)
    size = disk.tree_bytes(stage_dir / "step-000002")
    monkeypatch.setattr(disk, "free_bytes", lambda path: size // 2)
    budget = install(WriteBudget(), monkeypatch.setattr)
    # keep_checkpoints=1 would delete step-2 after writing step-4, but not before: it is the
    # only checkpoint to resume from.
    with pytest.raises(disk.DiskFull, match=f"needs .*, {disk.format_bytes(size // 2)} free"):
        _save(stage_dir, 4, keep=1)
    assert budget.written == 0
    assert sorted(p.name for p in stage_dir.iterdir()) == ["latest", "step-000002"]


def test_the_oldest_checkpoint_goes_first_while_a_newer_one_remains(tmp_path, monkeypatch, capsys):
    stage_dir = tmp_path / "pretrain"
    _save(stage_dir, 2)
    _save(stage_dir, 4)
    size = disk.tree_bytes(stage_dir / "step-000004")
    frees = iter([0, 10**12])  # full until step-2 is gone
    monkeypatch.setattr(disk, "free_bytes", lambda path: next(frees))
    _save(stage_dir, 6)
    assert sorted(p.name for p in stage_dir.glob("step-*")) == ["step-000004", "step-000006"]
    assert "note: deleted step-000002" in capsys.readouterr().out
    # Not when the newer checkpoint is incomplete: it could not be resumed from.
    (stage_dir / "step-000006" / "optimizer.pt").unlink()
    monkeypatch.setattr(disk, "free_bytes", lambda path: size // 2)
    with pytest.raises(disk.DiskFull):
        _save(stage_dir, 8)
    assert (stage_dir / "step-000004").is_dir()


def test_metrics_row_meets_a_full_disk(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl", "pretrain")
    log.write(1, loss=2.5)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    install(WriteBudget(10), monkeypatch.setattr)
    with pytest.raises(disk.DiskFull, match="writing the pretrain row of step 2 of metrics.jsonl"):
        log.write(2, loss=2.4)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_metrics_rewrite_meets_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, "pretrain")
    for step in range(1, 6):
        log.write(step, loss=1.0 / step)
    before = path.read_bytes()
    install(WriteBudget(100), monkeypatch.setattr)
    with pytest.raises(disk.DiskFull, match="metrics.jsonl"):
        drop_rows(path, "pretrain", after_step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_line_cut_by_a_kill_is_dropped_before_the_next_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path, "pretrain").write(1, loss=2.0)
    with open(path, "a") as f:
        f.write('{"stage": "pretrain", "step": 2, "lo')
    drop_rows(path, "pretrain", after_step=1)
    MetricsLog(path, "pretrain").write(2, loss=1.5)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_recipe_and_stage_log_meet_a_full_disk(tmp_path, monkeypatch):
    recipe = load_recipe(None)
    save_recipe(recipe, tmp_path / "recipe.toml")
    StageLog(tmp_path).record("curate", "abc", {"documents": 3})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    install(WriteBudget(50), monkeypatch.setattr)
    with pytest.raises(disk.DiskFull, match="recipe.toml"):
        save_recipe(load_recipe(None, ["pretrain.lr=0.5"]), tmp_path / "recipe.toml")
    with pytest.raises(disk.DiskFull, match="stages.json"):
        StageLog(tmp_path).record("tokenizer", "def", {})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_export_meets_a_full_disk(tmp_path, monkeypatch):
    from scratchlm.export.hf import export_hf
    from scratchlm.tokenizer import ASSISTANT, BOS, EOS, PAD, train_tokenizer

    tok = train_tokenizer(["a tiny corpus of words"] * 20, 300, tmp_path / "tokenizer.json")
    model = Transformer(ModelConfig(**{**CFG.to_dict(), "vocab_size": tok.vocab_size}))
    special = {"bos": BOS, "eos": EOS, "pad": PAD, "assistant": ASSISTANT}
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("mine")
    install(WriteBudget(20_000), monkeypatch.setattr)
    with pytest.raises(disk.DiskFull, match=f"writing the Hugging Face export to {out}: needs"):
        export_hf(model, tmp_path / "tokenizer.json", out, special)
    assert [p.name for p in out.iterdir()] == ["README.md"]
    monkeypatch.undo()
    export_hf(model, tmp_path / "tokenizer.json", out, special)
    assert load_file(out / "model.safetensors").keys()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_leftovers_of_a_killed_run_are_removed_at_the_start(tmp_path, capsys):
    stage_dir = tmp_path / "toy"
    _save(stage_dir, 2)
    partial = stage_dir / ".tmp-step-000004-4242"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(bytes(3000))
    (tmp_path / ".tmp-metrics.jsonl-4242").write_bytes(bytes(100))
    session = Session("toy", tmp_path, TrainConfig(device="cpu"), ParallelConfig(), progress=False)
    session.close()
    out = capsys.readouterr().out
    assert "toy: removed what an interrupted run left half-written (.tmp-step-000004-4242, " in out
    assert "freeing 3.0 KiB" in out
    assert sorted(p.name for p in stage_dir.iterdir()) == ["latest", "step-000002"]
    assert not (tmp_path / ".tmp-metrics.jsonl-4242").exists()


def test_disk_full_is_recognised_in_the_libraries_words():
    assert disk.is_disk_full(OSError(28, "No space left on device"))
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = OSError(28, "No space left on device")
    assert disk.is_disk_full(wrapped)
    assert disk.is_disk_full(Exception("Error while serializing: I/O error: os error 28"))
    assert not disk.is_disk_full(OSError(13, "Permission denied"))
