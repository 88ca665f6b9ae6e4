"""`scratchlm eval` arguments to an evaluation: which checkpoint, recipe, tasks and options."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from scratchlm.config import Recipe, load_recipe, save_recipe
from scratchlm.errors import UserError
from scratchlm.evaluate.run import evaluate_checkpoint, options_from, resolve_target
from scratchlm.loading import is_run_dir, latest_checkpoint_dir

DEFAULT_RECIPE = "recipes/tiny.toml"


def eval_command(args: argparse.Namespace) -> int:
    if args.write_harness_tasks is not None:
        return _write_harness_tasks(args)
    if args.run_dir is not None:
        run_dir: Path | None = args.run_dir
        if not run_dir.is_dir():
            raise UserError(f"run folder not found: {run_dir}")
        target = latest_checkpoint_dir(run_dir)
        recipe = _recipe(run_dir, args.target, args.set)
    elif args.target is not None:
        if args.target.endswith(".toml"):
            raise UserError("a recipe needs --run-dir: scratchlm eval RECIPE --run-dir DIR")
        target, run_dir = resolve_target(Path(args.target))
        recipe = _recipe(run_dir, None, args.set)
    else:
        raise UserError("scratchlm eval needs a run folder or a checkpoint (or --run-dir DIR)")
    explicit = args.tasks is not None
    tasks = [t for t in (args.tasks or "").split(",") if t] if explicit else recipe.eval.tasks
    if explicit and not tasks:
        raise UserError("--tasks is empty")
    if tasks == ["preference"] and args.run_dir is None and run_dir is not None:
        if is_run_dir(Path(args.target)):
            from scratchlm.align.evaluate import preference_target

            target = preference_target(run_dir)
    if args.device:
        recipe.pretrain.device = args.device
    options = options_from(
        recipe,
        shots=args.shots,
        limit=args.limit,
        batch_size=args.batch_size,
        data=args.data,
        data_dir=args.data_dir,
        chat=args.chat or None,
    )
    # The stage form runs the pipeline's evaluation; otherwise the run's own recipe has the
    # settings whose results the report shows.
    pipeline = None if args.run_dir is not None else options_from(_recipe(run_dir, None, []))
    result = evaluate_checkpoint(
        target,
        recipe,
        tasks,
        options,
        run_dir=run_dir,
        validation=not explicit and not args.harness,
        harness=args.harness,
        pipeline=pipeline,
    )
    if args.run_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        save_recipe(recipe, args.run_dir / "recipe.toml")  # only once the evaluation has run
    if args.json:
        scores = result.get("harness" if args.harness else "tasks", {})
        summary: dict[str, Any] = {k: result[k] for k in ("checkpoint", "stage", "step")}
        summary |= {k: result[k] for k in ("val_loss", "val_bpb") if k in result and not explicit}
        summary["tasks"] = {name: scores[name] for name in tasks}
        print(json.dumps(summary))
    return 0


def _recipe(run_dir: Path | None, path: str | None, overrides: list[str]) -> Recipe:
    """The recipe named, else the run's recipe.toml, else the default; with --set applied."""
    if path is None and run_dir is not None and (run_dir / "recipe.toml").is_file():
        path = str(run_dir / "recipe.toml")
    return load_recipe(Path(path or DEFAULT_RECIPE), overrides)


def _write_harness_tasks(args: argparse.Namespace) -> int:
    from scratchlm.evaluate.harness_yaml import write_task_files
    from scratchlm.paths import resolve

    data_dir = args.data_dir or "data/eval"
    out = write_task_files(args.write_harness_tasks, str(resolve(data_dir).resolve()))
    print(f"eval: wrote lm-evaluation-harness tasks for {data_dir} to {out}")
    print(f"  lm_eval --include_path {out} --tasks scratchlm_hellaswag ...")
    return 0
