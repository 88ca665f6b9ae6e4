"""The stages of a run and `pipeline`, which runs them in order and skips what is up to date.

Each stage reads only what earlier stages wrote. Its fingerprint hashes the recipe sections it
uses and the fingerprint of the stage before it (the first stage hashes its input files), so a
change anywhere reruns that stage and everything after it. Fingerprints live in RUN/stages.json.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
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

# The recipe sections each stage depends on (besides the stage before it).
STAGE_SECTIONS: dict[str, list[str]] = {
    "curate": ["data", "curate"],
    "tokenizer": ["tokenizer", "model.vocab_size"],
    "tokenize": ["tokens"],
    "pretrain": ["model", "pretrain", "parallel"],
    "eval": ["sample", "eval"],
    "report": [],
}


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
        node = node[part]
    return node


def fingerprint(stage: str, recipe: Recipe, upstream: str) -> str:
    data = recipe.to_dict()
    parts: dict[str, Any] = {s: _section(data, s) for s in STAGE_SECTIONS[stage]}
    parts["upstream"] = upstream
    if stage == "curate":
        parts["files"] = [
            (str(p), p.stat().st_size, p.stat().st_mtime_ns)
            for p in input_files(recipe.data.inputs)
        ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def run_curate(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    from scratchlm.curate.pipeline import run_curate as curate

    return curate(recipe.data.inputs, run_dir / "curated", recipe.curate)


def run_tokenizer(
    recipe: Recipe, run_dir: Path, texts: Iterable[str] | None = None
) -> dict[str, Any]:
    """Train the BPE tokenizer on the curated documents (or on `texts`), up to max_chars."""
    from scratchlm.documents import iter_texts
    from scratchlm.tokenizer import train_tokenizer

    budget = recipe.tokenizer.max_chars
    source = iter_texts(run_dir / "curated") if texts is None else texts

    def limited() -> Iterator[str]:
        used = 0
        for text in source:
            if used >= budget:
                return
            used += len(text)
            yield text

    tok = train_tokenizer(
        limited(),
        recipe.model.vocab_size,
        run_dir / "tokenizer.json",
        min_frequency=recipe.tokenizer.min_frequency,
    )
    return {"vocab_size": tok.vocab_size, "sha256": tok.sha256}


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
    return {k: v for k, v in meta.items() if not isinstance(v, (list, dict))}


def run_pretrain(
    recipe: Recipe, run_dir: Path, resume: bool = False, fingerprint: str = ""
) -> dict[str, Any]:
    """Pretrain; a fresh start moves earlier checkpoints to pretrain.prev instead of mixing in."""
    from scratchlm.train.metrics import drop_rows
    from scratchlm.train.pretrain import pretrain

    stage_dir = run_dir / "pretrain"
    # Under torchrun only rank 0 touches the folder; the others wait for it in the process group.
    if int(os.environ.get("RANK", "0")) == 0:
        if not resume and stage_dir.exists() and any(stage_dir.iterdir()):
            previous = run_dir / "pretrain.prev"
            shutil.rmtree(previous, ignore_errors=True)
            stage_dir.rename(previous)
            print(f"pretrain: starting afresh; earlier checkpoints moved to {previous}")
        if not resume:
            drop_rows(run_dir / "metrics.jsonl", "pretrain")
        stage_dir.mkdir(parents=True, exist_ok=True)
        if fingerprint:
            write_atomic(stage_dir / "fingerprint", fingerprint.encode())
    return pretrain(recipe, run_dir, resume=resume)


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


def _pretrain_finished(run_dir: Path, recipe: Recipe) -> bool | None:
    """True: the last checkpoint reached max_steps; False: it stopped early; None: no checkpoint."""
    latest = run_dir / "pretrain" / "latest" / "trainer_state.json"
    if not latest.is_file():
        return None
    state = json.loads(latest.read_text())
    return state["step"] >= recipe.pretrain.max_steps


def run_pipeline(recipe: Recipe, run_dir: Path, until: str | None = None) -> dict[str, Any]:
    """Run the stages in order up to `until`, skipping those whose fingerprint is unchanged."""
    if until is not None and until not in STAGES:
        raise UserError(f"--until {until!r}: expected one of {', '.join(STAGES)}")
    log = StageLog(run_dir)
    upstream = ""
    results: dict[str, Any] = {}
    last = STAGES.index(until) if until else len(STAGES) - 1
    for index, stage in enumerate(itertools.islice(STAGES, last + 1)):
        fp = fingerprint(stage, recipe, upstream)
        up_to_date = log.fingerprint(stage) == fp and stage != "report"
        if up_to_date:
            print(f"== {stage}: up to date, skipped")
            results[stage] = log.entries[stage]["result"]
        else:
            print(f"== {stage}")
            log.forget(STAGES[index:])
            if stage == "pretrain":
                results[stage] = _pipeline_pretrain(recipe, run_dir, fp)
            else:
                results[stage] = RUNNERS[stage](recipe, run_dir)
            log.record(stage, fp, results[stage])
        upstream = fp
    return results


def _pipeline_pretrain(recipe: Recipe, run_dir: Path, fp: str) -> dict[str, Any]:
    """Resume a pretraining that was stopped with the same config; start afresh otherwise."""
    marker = run_dir / "pretrain" / "fingerprint"
    same_config = marker.is_file() and marker.read_text().strip() == fp
    resume = same_config and _pretrain_finished(run_dir, recipe) is False
    return run_pretrain(recipe, run_dir, resume=resume, fingerprint=fp)
