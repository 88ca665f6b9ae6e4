"""The stages of a run and `pipeline`, which runs them in order and skips what is up to date.

Each stage reads only what earlier stages wrote. Its fingerprint hashes the recipe sections it
uses and the fingerprint of the stage before it (the first stage hashes its input files), so a
change anywhere reruns that stage and everything after it. Fingerprints live in RUN/stages.json.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from scratchlm.config import Recipe
from scratchlm.disk import write_atomic
from scratchlm.errors import UserError
from scratchlm.paths import resolve

STAGES = ["curate", "tokenizer", "tokenize", "pretrain", "eval", "report"]

ALIGN_STAGES = ["sft", "reward", "dpo", "ppo", "grpo"]
"""The stages a recipe's align.stages may list; each is the module scratchlm.align.<name> with a
`run(recipe, run_dir, resume)` function, imported only when the stage runs."""

# The recipe sections each stage depends on (besides the stage before it).
STAGE_SECTIONS: dict[str, list[str]] = {
    "curate": ["data", "curate"],
    "tokenizer": ["tokenizer", "model.vocab_size"],
    "tokenize": ["tokens"],
    "pretrain": ["model", "pretrain", "parallel"],
    **{stage: [stage, "parallel"] for stage in ALIGN_STAGES},
    "eval": ["sample", "eval"],
    "report": [],
}


def run_stages(recipe: Recipe) -> list[str]:
    """The recipe's stages in order: pretraining's, then align.stages, then eval and report."""
    return [*STAGES[:4], *recipe.align.stages, *STAGES[4:]]


def input_files(patterns: list[str]) -> list[Path]:
    """Files named by the inputs (files, folders or globs); an error for one that is absent."""
    files: list[Path] = []
    for pattern in patterns:
        path = resolve(pattern)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                raise UserError(f"input not found: {pattern}")
            files += [p for p in matches if p.is_file()]
    return files


def _section(recipe: dict[str, Any], dotted: str) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def fingerprint(stage: str, recipe: Recipe, upstream: str) -> str:
    data = recipe.to_dict()
    parts: dict[str, Any] = {s: _section(data, s) for s in STAGE_SECTIONS[stage]}
    parts["upstream"] = upstream
    if stage == "curate":
        parts["files"] = _file_stats(input_files(recipe.data.inputs))
    elif stage in ALIGN_STAGES and isinstance(parts[stage], dict) and "data" in parts[stage]:
        parts["files"] = _file_stats(input_files(parts[stage]["data"]))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_stats(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


class StageLog:
    """RUN/stages.json: each finished stage's fingerprint and result."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.entries: dict[str, Any] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {}
        )

    def fingerprint(self, stage: str) -> str | None:
        return self.entries.get(stage, {}).get("fingerprint")

    def record(self, stage: str, fp: str, result: dict[str, Any]) -> None:
        self.entries[stage] = {"fingerprint": fp, "result": result}
        self._write()

    def forget(self, stages: list[str]) -> None:
        for stage in stages:
            self.entries.pop(stage, None)
        self._write()

    def _write(self) -> None:  # in one step: a killed run leaves the old file, never half of it
        write_atomic(self.path, json.dumps(self.entries, indent=2, default=str).encode())


def curate_summary(stats: dict[str, Any]) -> str:
    """'curate: 4,512 documents in, 4,100 kept (90.9%), 21.3 MB; removed: dedup 300, ...'."""
    steps = stats["steps"]
    docs_in = steps[0]["docs_in"] if steps else 0
    kept = stats["output"]["docs"]
    top = sorted((s for s in steps if s["docs_removed"]), key=lambda s: -s["docs_removed"])[:3]
    removed = ", ".join(f"{s['step']} {s['docs_removed']:,}" for s in top) or "none"
    share = 100 * kept / docs_in if docs_in else 0.0
    return (
        f"curate: {docs_in:,} documents in, {kept:,} kept ({share:.1f}%), "
        f"{stats['output']['bytes'] / 1e6:.1f} MB; most removed by: {removed}"
    )


def run_curate(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    from scratchlm.curate.pipeline import run_curate as curate

    stats = curate(recipe.data.inputs, run_dir / "curated", recipe.curate)
    print(curate_summary(stats))
    return stats


def run_tokenizer(
    recipe: Recipe, run_dir: Path, texts: Iterable[str] | None = None
) -> dict[str, Any]:
    """Train the BPE tokenizer on the curated documents (or on `texts`), up to max_chars."""
    from scratchlm.documents import iter_texts
    from scratchlm.tokenizer import train_tokenizer

    budget = recipe.tokenizer.max_chars
    source = iter_texts(run_dir / "curated") if texts is None else texts
    sample: list[str] = []  # the first million characters, for the bytes-per-token figure

    def limited() -> Iterator[str]:
        used = 0
        for text in source:
            if used >= budget:
                return
            if used < 1_000_000:
                sample.append(text)
            used += len(text)
            yield text

    tok = train_tokenizer(
        limited(),
        recipe.model.vocab_size,
        run_dir / "tokenizer.json",
        min_frequency=recipe.tokenizer.min_frequency,
    )
    n_bytes = sum(len(t.encode()) for t in sample)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(sample))
    bytes_per_token = n_bytes / max(n_tokens, 1)
    print(
        f"tokenizer: vocabulary of {tok.vocab_size:,} tokens, {bytes_per_token:.2f} bytes per "
        f"token on {n_bytes / 1e6:.1f} MB of its training text -> {run_dir / 'tokenizer.json'}"
    )
    return {
        "vocab_size": tok.vocab_size,
        "sha256": tok.sha256,
        "bytes_per_token": round(bytes_per_token, 3),
    }


def run_tokenize(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    from scratchlm.documents import document_files
    from scratchlm.shards import write_token_shards

    meta = write_token_shards(
        document_files(run_dir / "curated"),
        run_dir / "tokenizer.json",
        run_dir / "tokens",
        val_fraction=recipe.tokens.val_fraction,
        workers=recipe.tokens.workers,
        executor=recipe.curate.executor,
        ray_address=recipe.curate.ray_address,
    )
    print(
        f"tokenize: {meta['train_tokens']:,} train tokens ({meta['train_documents']:,} documents), "
        f"{meta['val_tokens']:,} validation tokens ({meta['val_documents']:,} documents), "
        f"{meta['bytes'] / max(meta['tokens'], 1):.2f} bytes per token -> {run_dir / 'tokens'}"
    )
    return {k: v for k, v in meta.items() if not isinstance(v, (list, dict))}


def run_pretrain(
    recipe: Recipe, run_dir: Path, resume: bool = False, fingerprint: str = ""
) -> dict[str, Any]:
    """Pretrain; a fresh start moves earlier checkpoints to pretrain.prev instead of mixing in."""
    from scratchlm.train.pretrain import pretrain

    prepare_stage_dir(run_dir, "pretrain", resume, fingerprint)
    return pretrain(recipe, run_dir, resume=resume)


def prepare_stage_dir(run_dir: Path, stage: str, resume: bool, fingerprint: str = "") -> None:
    """A fresh start of a training stage moves its earlier checkpoints to <stage>.prev and drops
    its metrics rows, instead of mixing in; a resume keeps both."""
    from scratchlm.train.metrics import drop_rows

    stage_dir = run_dir / stage
    # Under torchrun only rank 0 touches the folder; the others wait for it in the process group.
    if int(os.environ.get("RANK", "0")) == 0:
        if not resume and stage_dir.exists() and any(stage_dir.iterdir()):
            previous = run_dir / f"{stage}.prev"
            shutil.rmtree(previous, ignore_errors=True)
            stage_dir.rename(previous)
            print(f"{stage}: starting afresh; earlier checkpoints moved to {previous}")
        if not resume:
            drop_rows(run_dir / "metrics.jsonl", stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        if fingerprint:
            write_atomic(stage_dir / "fingerprint", fingerprint.encode())


def run_align_stage(
    stage: str, recipe: Recipe, run_dir: Path, resume: bool = False, fingerprint: str = ""
) -> dict[str, Any]:
    """Run an alignment stage: scratchlm.align.<stage>.run (every name in ALIGN_STAGES has one)."""
    module = importlib.import_module(f"scratchlm.align.{stage}")
    prepare_stage_dir(run_dir, stage, resume, fingerprint)
    return module.run(recipe, run_dir, resume=resume)


def run_eval(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    from scratchlm.evaluate.run import evaluate_run

    return evaluate_run(recipe, run_dir)


def run_report(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    from scratchlm.report import write_report

    return {"report": str(write_report(recipe, run_dir))}


RUNNERS: dict[str, Callable[[Recipe, Path], dict[str, Any]]] = {
    "curate": run_curate,
    "tokenizer": run_tokenizer,
    "tokenize": run_tokenize,
    "pretrain": run_pretrain,
    "eval": run_eval,
    "report": run_report,
}


def _stage_finished(run_dir: Path, stage: str, max_steps: int) -> bool | None:
    """True: the last checkpoint reached max_steps; False: it stopped early; None: no checkpoint."""
    latest = run_dir / stage / "latest" / "trainer_state.json"
    if not latest.is_file():
        return None
    state = json.loads(latest.read_text())
    return state["step"] >= max_steps


def run_pipeline(recipe: Recipe, run_dir: Path, until: str | None = None) -> dict[str, Any]:
    """Run the stages in order up to `until`, skipping those whose fingerprint is unchanged."""
    stages = run_stages(recipe)
    if until is not None and until not in stages:
        raise UserError(f"--until {until!r}: expected one of {', '.join(stages)}")
    log = StageLog(run_dir)
    upstream = ""
    results: dict[str, Any] = {}
    last = stages.index(until) if until else len(stages) - 1
    for index, stage in enumerate(stages[: last + 1]):
        fp = fingerprint(stage, recipe, upstream)
        up_to_date = log.fingerprint(stage) == fp and stage != "report"
        if up_to_date:
            print(f"== {stage}: up to date, skipped")
            results[stage] = log.entries[stage]["result"]
        else:
            print(f"== {stage}")
            log.forget(stages[index:])
            if stage == "pretrain" or stage in ALIGN_STAGES:
                results[stage] = _pipeline_training(stage, recipe, run_dir, fp)
            else:
                results[stage] = RUNNERS[stage](recipe, run_dir)
            log.record(stage, fp, results[stage])
        upstream = fp
    return results


def _pipeline_training(stage: str, recipe: Recipe, run_dir: Path, fp: str) -> dict[str, Any]:
    """Resume a training stage that was stopped with the same config; start afresh otherwise."""
    marker = run_dir / stage / "fingerprint"
    same_config = marker.is_file() and marker.read_text().strip() == fp
    section = getattr(recipe, stage, None)
    max_steps = getattr(section, "max_steps", None)
    resume = (
        same_config
        and max_steps is not None
        and _stage_finished(run_dir, stage, max_steps) is False
    )
    if stage == "pretrain":
        return run_pretrain(recipe, run_dir, resume=resume, fingerprint=fp)
    return run_align_stage(stage, recipe, run_dir, resume=resume, fingerprint=fp)
