"""`scratchlm eval`: a checkpoint on benchmark tasks, the validation split and samples.

Results of a checkpoint under the pipeline's settings (the run recipe's [eval]) go to
RUN/eval/<stage>-<step>.json (tasks evaluated later are merged in while the weights are the same)
and are copied to RUN/eval/results.json; the report reads only these. An evaluation with other
settings (--limit 50, --shots 0, --data F...) goes to RUN/eval/<stage>-<step>.<key>.json, the key
naming the settings that differ (limit-50.shots-0), so it never mixes into the pipeline's scores.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from scratchlm.checkpoint import list_checkpoints, load_checkpoint
from scratchlm.config import Recipe
from scratchlm.device import Runtime, pick_runtime
from scratchlm.disk import write_atomic
from scratchlm.errors import UserError
from scratchlm.evaluate.bpb import evaluate_bpb
from scratchlm.evaluate.tasks import EvalOptions, get_task
from scratchlm.infer.generate import generate
from scratchlm.loading import from_checkpoint, is_run_dir, latest_checkpoint_dir
from scratchlm.shards import check_tokenizer, read_meta


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    task_names: list[str],
    limit: int = 0,
    batch_size: int = 32,
    runtime: Runtime | None = None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Scores of `model` on each task: metric values, `<metric>_stderr`, `n`, `chance`...

    Other EvalOptions (shots, data, data_dir, chat, max_gen_toks) pass as keywords. The model
    is left in the train/eval mode it came in. This is what a training loop calls to score a
    cheap task every few steps (see in_loop_metrics).
    """
    runtime = runtime or pick_runtime("cpu", "fp32")
    settings = EvalOptions(limit=limit, batch_size=batch_size, runtime=runtime, **options)
    tasks = [get_task(name) for name in task_names]  # an unknown name fails before any work
    if settings.data and len(tasks) != 1:
        raise UserError("--data points one task at another file: give exactly one task with it")
    if settings.limit < 0 or settings.batch_size < 1:
        raise UserError("--limit must be >= 0 and --batch-size >= 1")
    was_training = model.training
    try:
        return {task.name: task.run(model, tokenizer, settings) for task in tasks}
    finally:
        model.train(was_training)


def in_loop_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Task scores as flat `eval/<task>/<metric>` numbers for a metrics.jsonl line."""
    flat = {}
    for task, scores in results.items():
        for name, value in scores.items():
            if _is_score(name, value):
                flat[f"eval/{task}/{name}"] = value
    return flat


def in_loop_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    task_names: list[str],
    limit: int,
    runtime: Runtime,
) -> dict[str, float]:
    """What a training loop logs at an evaluation step: `eval/<task>/<metric>` of each task on
    the first `limit` examples ({} without tasks). The model may be wrapped (DDP, DeepSpeed,
    torch.compile): the plain module underneath is scored, on every rank alike."""
    if not task_names:
        return {}
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return in_loop_metrics(run_tasks(model, tokenizer, task_names, limit=limit, runtime=runtime))


def check_task_names(task_names: list[str]) -> None:
    """A UserError for an unknown task, before any training or loading starts."""
    for name in task_names:
        get_task(name)


def _is_score(name: str, value: Any) -> bool:
    skip = ("n", "chance", "shots", "seconds", "max_gen_toks")
    return isinstance(value, float) and name not in skip and not name.endswith("_stderr")


def sample_texts(model: torch.nn.Module, tokenizer: Any, recipe: Recipe, device: Any) -> list[dict]:
    s = recipe.sample
    samples = []
    for i, prompt in enumerate(s.prompts):
        ids = tokenizer.encode(prompt, add_bos=True)
        new = list(
            generate(
                model,
                ids,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                seed=s.seed + i,
                stop_ids=(tokenizer.eos_id,),
            )
        )
        samples.append({"prompt": prompt, "completion": tokenizer.decode(new, skip_special=True)})
    return samples


def options_from(recipe: Recipe, **overrides: Any) -> EvalOptions:
    e = recipe.eval
    options = EvalOptions(
        limit=e.limit,
        batch_size=e.batch_size,
        data_dir=e.data_dir,
        chat=e.chat,
        max_gen_toks=e.max_gen_toks,
        runtime=pick_runtime(recipe.pretrain.device, recipe.pretrain.precision),
    )
    return replace(options, **{k: v for k, v in overrides.items() if v is not None})


def evaluate_run(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """The eval stage: the pretrained model on the validation split, the recipe's samples and
    tasks (eval.tasks); when the run went on to alignment, its newest aligned model on the same
    tasks too (under "aligned"), so the report shows what alignment did to the scores."""
    newest = latest_checkpoint_dir(run_dir)
    base = run_dir / "pretrain" if list_checkpoints(run_dir / "pretrain") else newest
    options = options_from(recipe)
    result = evaluate_checkpoint(
        base, recipe, recipe.eval.tasks, options, run_dir=run_dir, validation=True
    )
    if newest != base and recipe.eval.tasks:
        result["aligned"] = evaluate_checkpoint(
            newest, recipe, recipe.eval.tasks, options, run_dir=run_dir
        )
    return result


SCORE_SETTINGS = ("limit", "shots", "data", "data_dir", "chat", "max_gen_toks")
"""The evaluation options that change scores (batch size and device do not)."""


def settings_of(options: EvalOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in SCORE_SETTINGS}


def settings_key(options: EvalOptions, pipeline: EvalOptions) -> str:
    """'' under the pipeline's settings; else the ones that differ, as 'limit-50.shots-0' (a
    file or folder as a hash of its path: 'data-1a2b3c4d')."""
    parts = []
    for name in SCORE_SETTINGS:
        value = getattr(options, name)
        if value == getattr(pipeline, name):
            continue
        if name in ("data", "data_dir"):
            text = hashlib.sha256(str(value).encode()).hexdigest()[:8]
        elif isinstance(value, bool):
            text = "on" if value else "off"
        else:
            text = str(value)
        parts.append(f"{name.replace('_', '')}-{text}")
    return ".".join(parts)


def evaluate_checkpoint(
    path: Path,
    recipe: Recipe,
    task_names: list[str],
    options: EvalOptions,
    run_dir: Path | None = None,
    validation: bool = False,
    harness: bool = False,
    pipeline: EvalOptions | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint (or a stage folder's newest) and record it under run_dir/eval;
    `pipeline`: the run's own evaluation settings, when they are not those of `options`."""
    check_task_names(task_names)  # an unknown task fails before the checkpoint is read
    loaded = load_checkpoint(path)  # read and verified once: the manifest hashes every file
    ckpt = loaded.path
    model, tokenizer = from_checkpoint(loaded, device=options.runtime.device)
    stage, step = ckpt.parent.name, int(loaded.trainer_state.get("step", 0))
    weights = _weights_id(ckpt)
    key = settings_key(options, pipeline or options)
    name = f"{stage}-{ckpt.name}" + (f".{key}" if key else "")
    out = run_dir / "eval" / f"{name}.json" if run_dir else None
    settings = settings_of(options)
    result: dict[str, Any] = {}
    if out is not None and out.is_file():
        earlier = json.loads(out.read_text())
        if earlier.get("weights") == weights:
            result = earlier
        if earlier.get("settings", settings) != settings:  # the run's [eval] changed since
            result = {k: v for k, v in result.items() if k not in ("tasks", "harness")}
    result |= {"checkpoint": str(ckpt), "stage": stage, "step": step, "weights": weights}
    result |= {"settings": settings, "settings_key": key}
    if validation and run_dir is not None and (run_dir / "tokens" / "meta.json").is_file():
        check_tokenizer(read_meta(run_dir / "tokens"), tokenizer)
        result |= evaluate_bpb(
            model,
            run_dir / "tokens",
            tokenizer.token_bytes(),
            model.config.max_seq_len,
            recipe.pretrain.micro_batch_size,
            # The whole validation split (up to 4M tokens), not the trainer's quick estimate.
            max_tokens=4_000_000,
            runtime=options.runtime,
        )
        result["samples"] = sample_texts(model, tokenizer, recipe, options.runtime.device)
        print(f"eval: {ckpt}: val_loss {result['val_loss']:.4f}, val_bpb {result['val_bpb']:.4f}")
        for s in result["samples"]:
            print(f"--- sample: {s['prompt']}{s['completion']}")
    if task_names:
        if harness:
            from scratchlm.evaluate.harness import ScratchLM, run_harness

            scores, _ = run_harness(ScratchLM(model, tokenizer, options), task_names, options)
            result.setdefault("harness", {}).update(scores)
        else:
            settings = replace(options, checkpoint=str(ckpt))
            scores = run_tasks(
                model,
                tokenizer,
                task_names,
                **{k: getattr(settings, k) for k in EvalOptions.__dataclass_fields__},
            )
            result.setdefault("tasks", {}).update(scores)
        print(format_table(scores, f"{stage} step {step}" + (" (lm-eval)" if harness else "")))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=2)
        write_atomic(out, text.encode())
        if key:
            print(
                f"eval: -> {out} (settings other than the run's [eval]: {key}; not in the report)"
            )
        else:
            write_atomic(out.parent / "results.json", text.encode())
    return result


def _weights_id(ckpt: Path) -> str:
    """Identifies the weights, so scores of an earlier model at the same step are not merged."""
    manifest = ckpt / "manifest.json"
    data = (
        manifest.read_bytes() if manifest.is_file() else (ckpt / "model.safetensors").read_bytes()
    )
    return hashlib.sha256(data).hexdigest()[:16]


def format_table(scores: dict[str, dict[str, Any]], title: str) -> str:
    lines = [
        f"eval: {title}",
        f"{'task':<16} {'metric':<22} {'value':>9} {'stderr':>8} {'chance':>7} {'n':>6}",
    ]
    for task, values in scores.items():
        for name, value in values.items():
            if not _is_score(name, value):
                continue
            error = values.get(f"{name}_stderr")
            chance = values.get("chance") if name.startswith(("acc", "exact_match")) else None
            lines.append(
                f"{task:<16} {name:<22} {_fmt(value):>9} {_fmt(error):>8} {_fmt(chance):>7} "
                f"{values.get('n', ''):>6}"
            )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def resolve_target(path: Path) -> tuple[Path, Path | None]:
    """(what to load, the run folder it belongs to) for a run folder, a stage folder or a
    checkpoint folder."""
    if not path.exists():
        raise UserError(f"not found: {path}")
    if is_run_dir(path):
        return latest_checkpoint_dir(path), path
    for run in (path.parent, path.parent.parent):
        if is_run_dir(run):
            return path, run
    return path, None
