"""Finding and loading trained models: `from scratchlm import load`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch

from scratchlm.checkpoint import Checkpoint, load_checkpoint, load_weights
from scratchlm.errors import UserError
from scratchlm.model import ModelConfig, Transformer
from scratchlm.tokenizer import Tokenizer

# Later stages refine earlier ones; a run's model is the newest stage that has a checkpoint
# ("imported": a Hugging Face model brought in by `scratchlm import-hf`).
CHECKPOINT_STAGES = ["ppo", "grpo", "dpo", "sft", "pretrain", "imported"]
NOT_GENERATORS = {"reward"}
"""Stages whose model scores text instead of writing it."""


def is_run_dir(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or (path / "recipe.toml").exists()


def generator_stages(run_dir: Path) -> list[str]:
    """The stages whose model can write, in the order they are looked for: the run recipe's
    align.stages (less the reward model) last first, then stages run outside the recipe's path,
    then pretrain; without a readable recipe, CHECKPOINT_STAGES."""
    try:
        recipe = tomllib.loads((run_dir / "recipe.toml").read_text())
        stages = recipe.get("align", {}).get("stages", [])
    except (OSError, tomllib.TOMLDecodeError):
        return CHECKPOINT_STAGES
    if not isinstance(stages, list):
        return CHECKPOINT_STAGES
    path = [s for s in reversed(stages) if isinstance(s, str) and s not in NOT_GENERATORS]
    return [*path, *(s for s in CHECKPOINT_STAGES if s not in path)]


def latest_checkpoint_dir(run_dir: Path) -> Path:
    """The stage folder holding the run's newest model: the last stage of the recipe's path that
    has a checkpoint."""
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    for stage in generator_stages(run_dir):
        folder = run_dir / stage
        if folder.is_dir() and any(folder.glob("step-*")):
            return folder
    raise UserError(f"no checkpoint in {run_dir}; run `scratchlm pretrain --run-dir {run_dir}`")


def find_tokenizer(checkpoint: Path) -> Path:
    """tokenizer.json beside the checkpoint, or in the run folder above it."""
    for folder in [checkpoint, *checkpoint.resolve().parents][:4]:
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    raise UserError(f"no tokenizer.json found for {checkpoint}")


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """The model (in eval mode) and tokenizer of a run folder, a stage folder or a checkpoint.

    `model(token_ids)` returns logits of shape [batch, time, vocab].
    """
    return from_checkpoint(read_checkpoint(path), device)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The verified checkpoint of a run folder (its newest model, see latest_checkpoint_dir), a
    stage folder (its newest step) or a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"not found: {path}")
    return load_checkpoint(latest_checkpoint_dir(path) if is_run_dir(path) else path)


def describe_checkpoint(ckpt: Checkpoint, given: Path) -> str:
    """'runs/tiny/ppo/step-000030 (ppo, step 30: the newest stage of the run ...)': which model
    a command loaded, and for a run folder how it was chosen."""
    step = ckpt.trainer_state.get("step", "?")
    text = f"{ckpt.path} ({ckpt.path.parent.name}, step {step}"
    if is_run_dir(Path(given)):
        text += (
            ": the run's last stage with a checkpoint; give a stage folder such as "
            f"{Path(given) / 'pretrain'} to choose another"
        )
    return text + ")"


def load_model(path: Path) -> tuple[Transformer, Path]:
    """The model (in eval mode, on the CPU) of a run folder, a stage folder or a checkpoint, and
    the checkpoint it came from; no tokenizer needed."""
    if not path.exists():
        raise UserError(f"not found: {path}")
    ckpt = load_checkpoint(latest_checkpoint_dir(path) if is_run_dir(path) else path)
    return _model_of(ckpt, "cpu"), ckpt.path


def _model_of(ckpt: Checkpoint, device: str | torch.device) -> Transformer:
    model = Transformer(ModelConfig.from_dict(ckpt.model_config))
    load_weights(model, ckpt.tensors)
    return model.to(device).eval()


def from_checkpoint(
    ckpt: Checkpoint, device: str | torch.device = "cpu"
) -> tuple[Transformer, Tokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint already read and verified."""
    return _model_of(ckpt, device), Tokenizer.load(find_tokenizer(ckpt.path))
