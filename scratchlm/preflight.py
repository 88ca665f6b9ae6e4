"""What a stage command checks before it changes the run folder.

A stage that starts afresh moves its earlier checkpoints aside, and every stage command saves the
recipe into RUN/recipe.toml; a command refused after that would leave the run changed (or broken
for later commands). So the inputs a stage reads are checked first: the outputs of the stages
before it, the checkpoint it starts from and its data files (that they exist and hold usable
records). The recipe itself is validated when it is read (scratchlm.config).
"""

from __future__ import annotations

from pathlib import Path

from scratchlm.checkpoint import list_checkpoints
from scratchlm.config import Recipe
from scratchlm.errors import UserError
from scratchlm.paths import resolve

STARTS_FROM = {"sft": "pretrain", "reward": "sft", "dpo": "sft", "ppo": "sft", "grpo": "sft"}
"""The stage whose newest checkpoint an alignment stage starts from (unless init_from is set)."""

NEEDS: dict[str, list[tuple[str, str]]] = {
    "tokenizer": [("curated", "curate")],
    "tokenize": [("curated", "curate"), ("tokenizer.json", "tokenizer")],
    "pretrain": [("tokens/meta.json", "tokenize")],
}
"""(path in the run folder, the command that writes it) each stage reads."""


def check_stage(stage: str, recipe: Recipe, run_dir: Path) -> None:
    """A UserError for what would stop `stage` after it has begun: a missing upstream output
    or start checkpoint, absent data files, or data with no usable record."""
    for name, command in NEEDS.get(stage, []):
        if not (run_dir / name).exists():
            raise UserError(
                f"{stage} reads {run_dir / name}, which is missing: run "
                f"`scratchlm {command} --run-dir {run_dir}` first"
            )
    if stage == "curate":
        check_curate(recipe)
    if stage == "pretrain":
        _check_init_from("pretrain", recipe.pretrain.init_from)
        _check_tasks(recipe.pretrain.eval_tasks)
    if stage in STARTS_FROM:
        _check_start(stage, recipe, run_dir)
        check_stage_data(stage, recipe)


def check_pipeline(recipe: Recipe, stages: list[str], until: str | None) -> None:
    """What `pipeline` checks before its first stage: --until names one of its stages, and the
    inputs and data files of every stage exist and hold usable records."""
    if until is not None and until not in stages:
        raise UserError(f"--until {until!r}: expected one of {', '.join(stages)}")
    check_curate(recipe)
    _check_tasks(recipe.pretrain.eval_tasks + recipe.eval.tasks)
    _check_init_from("pretrain", recipe.pretrain.init_from)
    for stage in stages:
        if stage in STARTS_FROM:
            _check_init_from(stage, getattr(recipe, stage).init_from)
            check_stage_data(stage, recipe)
    if "ppo" in stages and not recipe.ppo.reward_fn and "reward" not in stages:
        _check_reward_model(recipe, None)


def check_curate(recipe: Recipe) -> None:
    """The curation inputs exist, curate.steps names known steps in a valid order, and the
    quality step has its classifier."""
    from scratchlm.curate.pipeline import resolve_steps
    from scratchlm.pipeline import input_files

    input_files(recipe.data.inputs)
    steps = resolve_steps(recipe.curate.steps, None)
    if "quality" in steps and not resolve(recipe.curate.quality_model).is_file():
        raise UserError(
            "the quality step needs curate.quality_model (a model from `scratchlm curate "
            f"train-quality`); got {recipe.curate.quality_model!r}"
        )


def check_stage_data(stage: str, recipe: Recipe) -> None:
    """The stage's data files exist and hold at least one usable record (or prompt)."""
    from scratchlm.align import data, prompts

    paths = getattr(recipe, stage).data
    if stage in ("ppo", "grpo"):
        if not paths:
            raise UserError(f"{stage}.data is empty: set data = [files...] in [{stage}]")
        if prompts.count_prompts(paths) == 0:
            raise UserError(f"{stage}.data: no usable prompts in {', '.join(paths)}")
        return
    dataset = data.read_chat(paths) if stage == "sft" else data.read_preferences(paths)
    if not dataset.records:
        unit = "conversations" if stage == "sft" else "preference pairs"
        raise UserError(
            f"{stage}.data: no usable {unit} in {', '.join(paths) or 'no files'} "
            f"({dataset.describe()})"
        )


def _check_start(stage: str, recipe: Recipe, run_dir: Path) -> None:

    section = getattr(recipe, stage)
    previous = STARTS_FROM[stage]
    if section.init_from:
        _check_init_from(stage, section.init_from)
    elif not list_checkpoints(run_dir / previous):
        raise UserError(
            f"{stage} starts from the {previous} model, but {run_dir / previous} has no "
            f"checkpoint: run `scratchlm {previous} --run-dir {run_dir}` first"
        )
    if stage == "ppo" and not recipe.ppo.reward_fn:
        _check_reward_model(recipe, run_dir)
    reward_fn = getattr(section, "reward_fn", "")
    if reward_fn:
        from scratchlm.align.tasks import load_reward_fn

        load_reward_fn(reward_fn, f"{stage}.reward_fn")


def _check_reward_model(recipe: Recipe, run_dir: Path | None) -> None:
    """PPO's reward model: ppo.reward_model, else RUN/reward (when run_dir is given)."""
    from scratchlm.loading import is_run_dir

    if not recipe.ppo.reward_model and run_dir is None:
        raise UserError(
            "ppo scores answers with a reward model: add reward to align.stages, or set "
            "ppo.reward_model or ppo.reward_fn"
        )
    path = resolve(recipe.ppo.reward_model) if recipe.ppo.reward_model else run_dir / "reward"
    if is_run_dir(path):
        path = path / "reward"
    if not (path / "config.json").is_file() and not list_checkpoints(path):
        raise UserError(
            f"ppo scores answers with the reward model, but {path} has no checkpoint: run "
            "`scratchlm reward` first, or set ppo.reward_model or ppo.reward_fn"
        )


def _check_init_from(stage: str, init_from: str) -> None:
    if init_from and not resolve(init_from).exists():
        raise UserError(f"{stage}.init_from = {init_from!r}: not found")


def _check_tasks(tasks: list[str]) -> None:
    if tasks:
        from scratchlm.evaluate.tasks import get_task

        for name in tasks:
            get_task(name)
