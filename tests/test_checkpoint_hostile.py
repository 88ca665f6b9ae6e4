"""A downloaded run folder never runs code: crafted DCP files in a sharded checkpoint, listed in its
manifest with their true sha256, are refused with one line by `load`, `generate`, `export` and a
resumed run, and nothing they name is called; genuine sharded checkpoints load as before."""

import ast
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, run_cli
from tiny_run import make_tokenizer
from torch.distributed.checkpoint.state_dict import get_state_dict

from scratchlm import load
from scratchlm.checkpoint.folder import MANIFEST, verify, write_manifest
from scratchlm.checkpoint.safe_dcp import MetadataUnpickler
from scratchlm.checkpoint.sharded import save_sharded
from scratchlm.config import ParallelConfig, TrainConfig
from scratchlm.errors import UserError
from scratchlm.model import ModelConfig, Transformer
from scratchlm.parallel import DistInfo
from scratchlm.train.loop import Session
from scratchlm.train.optim import build_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
TRAIN = TrainConfig(device="cpu")


class RunsCommand:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    return folder, make_tokenizer(folder).vocab_size


def _trained(vocab_size: int) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1)
    model = Transformer(config)
    optimizer = build_optimizer(model, TRAIN)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    return model, optimizer


def _sharded_run(tokenizer: tuple[Path, int], run: Path) -> tuple[Path, Transformer, Any]:
    """A run folder whose pretrain checkpoint is sharded (DCP), saved by the training code, with
    the model and optimizer it holds."""
    folder, vocab_size = tokenizer
    run.mkdir()
    shutil.copy(folder / "tokenizer.json", run / "tokenizer.json")
    model, optimizer = _trained(vocab_size)
    dist = DistInfo(rank=0, world_size=1, dp_rank=0, dp_size=1)
    parts = {"model": (model, optimizer, model.config.to_dict())}
    step = save_sharded(run / "pretrain", 2, parts, {"step": 2}, dist)
    assert (step / ".metadata").is_file() and not (step / "model.safetensors").exists()
    return step, model, optimizer


def _rewrite_manifest(step: Path) -> None:
    """As an attacker would: the manifest lists every file with its true size and sha256."""
    (step / MANIFEST).unlink()
    write_manifest(step)
    assert verify(step) is None


def _genuine_metadata(step: Path):
    with open(step / ".metadata", "rb") as f:
        return MetadataUnpickler(f, step).load()


def _plant_metadata(step: Path, payload) -> None:
    (step / ".metadata").write_bytes(pickle.dumps(payload))
    _rewrite_manifest(step)


def _one_line_refusal(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]


def _resume(run: Path) -> None:
    session = Session("pretrain", run, TRAIN, ParallelConfig(), resume=True, progress=False)
    try:
        model = Transformer(ModelConfig.from_dict(session.restored.model_config))
        session.trainer(model)
    finally:
        session.close()


def test_genuine_sharded_checkpoint_loads_and_resumes_with_identical_tensors(tokenizer, tmp_path):
    step, model, optimizer = _sharded_run(tokenizer, tmp_path / "run")
    loaded, _ = load(tmp_path / "run")
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    session = Session("pretrain", tmp_path / "run", TRAIN, ParallelConfig(), resume=True)
    trainer = session.trainer(Transformer(model.config))
    session.close()
    assert session.step == 2
    for name, tensor in want.items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    got, saved = trainer.optimizer.state_dict(), optimizer.state_dict()
    assert got["state"].keys() == saved["state"].keys()
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(got["state"][index][key], value), (index, key)
    assert [g["lr"] for g in got["param_groups"]] == [g["lr"] for g in saved["param_groups"]]


@pytest.mark.parametrize("where", ["whole file", "inside genuine metadata"])
def test_metadata_that_runs_code_is_refused_by_load_and_resume(where, tokenizer, tmp_path):
    step, _, _ = _sharded_run(tokenizer, tmp_path / "run")
    marker = tmp_path / "pwned"
    payload = RunsCommand(f"touch {marker}")
    if where == "inside genuine metadata":
        metadata = _genuine_metadata(step)
        metadata.storage_meta = payload
        payload = metadata
    _plant_metadata(step, payload)
    with pytest.raises(UserError) as caught:
        load(tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message
    assert f"checkpoint {step} is refused: its .metadata names posix.system" in message
    with pytest.raises(UserError, match="is refused: its .metadata names posix.system"):
        _resume(tmp_path / "run")
    assert not marker.exists()


def test_generate_and_export_refuse_metadata_that_runs_code(tokenizer, tmp_path):
    step, _, _ = _sharded_run(tokenizer, tmp_path / "run")
    marker = tmp_path / "pwned"
    _plant_metadata(step, RunsCommand(f"touch {marker}"))
    before = sorted(p.name for p in step.iterdir())
    generate = run_cli("generate", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "2")
    assert generate.returncode == 2
    _one_line_refusal(generate.stderr, "is refused", "posix.system")
    out = tmp_path / "hf"
    export = run_cli("export", str(step), "--format", "hf", "--out", str(out))
    assert export.returncode == 2
    _one_line_refusal(export.stderr, "is refused", "posix.system")
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())  # the CLI checks it is writable first
    assert sorted(p.name for p in step.iterdir()) == before


def test_optimizer_value_that_runs_code_is_refused_on_resume(tokenizer, tmp_path):
    """DCP keeps non-tensor values (learning rates, betas) as torch.save pickles; a resume reads
    them, consolidation does not."""
    step, model, optimizer = _sharded_run(tokenizer, tmp_path / "run")
    marker = tmp_path / "pwned"
    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state["param_groups"][0]["lr"] = RunsCommand(f"touch {marker}")
    for shard in step.glob("*.distcp"):
        shard.unlink()
    (step / ".metadata").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=step, no_dist=True)
    _rewrite_manifest(step)
    with pytest.raises(UserError) as caught:
        _resume(tmp_path / "run")
    assert "\n" not in str(caught.value)
    assert f"checkpoint {step} is refused: its value optim.param_groups.0.lr" in str(caught.value)
    loaded, _ = load(tmp_path / "run")  # the weights alone are plain tensors
    assert torch.equal(loaded.state_dict()["norm.weight"], model.state_dict()["norm.weight"])
    assert not marker.exists()


def test_metadata_pointing_outside_the_folder_is_refused(tokenizer, tmp_path):
    step, _, _ = _sharded_run(tokenizer, tmp_path / "run")
    metadata = _genuine_metadata(step)
    for info in metadata.storage_data.values():
        info.relative_path = "../../secret.distcp"
    _plant_metadata(step, metadata)
    with pytest.raises(UserError, match=r"points outside the checkpoint folder \('../../secret"):
        load(tmp_path / "run")


def test_metadata_sizes_beyond_the_shards_are_refused_before_allocating(tokenizer, tmp_path):
    step, _, _ = _sharded_run(tokenizer, tmp_path / "run")
    metadata = _genuine_metadata(step)
    metadata.state_dict_metadata["model.norm.weight"].size = torch.Size([1 << 40, 1 << 20])
    _plant_metadata(step, metadata)
    with pytest.raises(UserError, match=r"describes [\d,]+ bytes of weights, its shards hold"):
        load(tmp_path / "run")


def test_garbled_metadata_is_one_line(tokenizer, tmp_path):
    step, _, _ = _sharded_run(tokenizer, tmp_path / "run")
    (step / ".metadata").write_bytes(b"\x80\x05not a pickle")
    _rewrite_manifest(step)
    with pytest.raises(UserError, match=r"is damaged: \.metadata is not DCP metadata") as caught:
        load(tmp_path / "run")
    assert "\n" not in str(caught.value)


def _unsafe_loads(path: Path) -> list[str]:
    """Calls in a source file that could unpickle what they read."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = ast.unparse(node.func.value)
        name = f"{owner}.{node.func.attr}"
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name == "torch.load" and keywords.get("weights_only") != "True":
            found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
        elif owner in ("pickle", "dill", "cloudpickle", "joblib") and "load" in node.func.attr:
            found.append(f"{path}:{node.lineno}: {name}")
        elif name == "np.load" and keywords.get("allow_pickle") not in (None, "False"):
            found.append(f"{path}:{node.lineno}: np.load with allow_pickle")
        elif node.func.attr == "load_checkpoint" and "engine" in owner:
            found.append(f"{path}:{node.lineno}: DeepSpeed's load_checkpoint unpickles")
    return found


def test_nothing_in_the_package_unpickles_what_it_reads():
    package = ROOT / "scratchlm"
    found = [line for path in sorted(package.rglob("*.py")) for line in _unsafe_loads(path)]
    assert found == []
    # The one unpickler is the restricted one, and all DCP reads go through its module.
    sources = {path: path.read_text() for path in package.rglob("*.py")}
    safe = package / "checkpoint" / "safe_dcp.py"
    reads = ("Unpickler", "FileSystemReader", r"\bdcp\.load\(", r"\.read_metadata\(")
    for path, text in sources.items():
        if path != safe:
            for pattern in reads:
                assert not re.search(pattern, text), f"{path} uses {pattern}"


def test_the_unsafe_load_check_finds_what_it_looks_for(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text(
        "import pickle, torch\n"
        "torch.load(f)\n"
        "torch.load(f, weights_only=False)\n"
        "pickle.load(f)\n"
        "torch.load(f, map_location='cpu', weights_only=True)\n"
        "engine.load_checkpoint(d)\n"
    )
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in _unsafe_loads(source)] == [
        "2",
        "3",
        "4",
        "6",
    ]
