import ast
import json

import pytest
import torch
from conftest import ROOT

from scratchlm import checkpoint as ckpt
from scratchlm.errors import UserError


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.out = torch.nn.Linear(4, 8, bias=False)
        self.out.weight = self.embed.weight


def _save(stage, step, value=1.0, keep=3):
    tensors = {"w": torch.full((3,), value)}
    return ckpt.save_checkpoint(
        stage,
        step,
        tensors,
        {"dim": 4},
        {"step": step},
        {"state": {}, "param_groups": []},
        keep=keep,
    )


def test_save_writes_manifest_and_moves_latest(tmp_path):
    path = _save(tmp_path, 5)
    assert path.name == "step-000005"
    assert (tmp_path / "latest").resolve() == path.resolve()
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) == {
        "model.safetensors",
        "config.json",
        "trainer_state.json",
        "optimizer.pt",
    }
    assert ckpt.verify(path) is None
    assert not list(tmp_path.glob(".tmp-*"))


def test_keeps_only_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_truncated_checkpoint_falls_back_with_a_warning(tmp_path, capsys):
    _save(tmp_path, 1, value=1.0)
    bad = _save(tmp_path, 2, value=2.0)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.path.name == "step-000001"
    assert torch.equal(loaded.tensors["w"], torch.full((3,), 1.0))
    err = capsys.readouterr().err
    assert "step-000002 is damaged" in err and "using step-000001 instead" in err


def test_named_corrupt_checkpoint_is_an_error(tmp_path):
    bad = _save(tmp_path, 1)
    state = bad / "trainer_state.json"
    state.write_text(state.read_text().replace("1", "7"))
    with pytest.raises(
        UserError, match="step-000001 is damaged: trainer_state.json does not match"
    ):
        ckpt.load_checkpoint(bad)
    with pytest.raises(UserError, match="every checkpoint"):
        ckpt.load_checkpoint(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path)


def test_tied_weights_stored_once_and_restored(tmp_path):
    model = Tied()
    tensors = ckpt.model_tensors(model)
    assert list(tensors) == ["embed.weight"]
    ckpt.save_checkpoint(tmp_path, 1, tensors, {}, {"step": 1})
    fresh = Tied()
    ckpt.load_weights(fresh, ckpt.load_checkpoint(tmp_path).tensors)
    assert torch.equal(fresh.out.weight, model.embed.weight)
    with pytest.raises(UserError, match="do not fit"):
        ckpt.load_weights(fresh, {"other": torch.zeros(1)})


def test_the_checkpoint_package_sits_below_what_reads_checkpoints():
    """It imports none of its readers (so no cycle to hide), at module level only (type-only
    imports aside), and no private names of other modules."""
    readers = {"train", "align", "evaluate", "export", "infer", "serve", "loading", "cli"}
    for path in sorted((ROOT / "scratchlm" / "checkpoint").glob("*.py")):
        tree = ast.parse(path.read_text())
        allowed = [n for n in tree.body if isinstance(n, ast.ImportFrom)] + [
            n
            for block in tree.body
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for n in block.body
        ]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom):
                    modules = [f"{node.module}.{a.name}" for a in node.names]
                ours = [m.split(".") for m in modules if m.startswith("scratchlm.")]
                where = f"{path.name}:{node.lineno}"
                assert not any(parts[1] in readers for parts in ours), where
                assert not any(parts[-1].startswith("_") for parts in ours), where
                assert not ours or node in allowed, f"{where}: an import inside a function"
