"""Fault trials of curation and tokenization, through the CLI: a SIGKILL of the whole job (the
command and its worker processes) at a random moment or inside a random write, and a disk that
fills up part-way. Each rerun of the same command must end with the output of an uninterrupted
run, file for file, with nothing half-written left. Shared by tests/test_faults_data_trials.py and
bench/faults.py.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import zstandard
from fault_trials import (
    ROOT,
    Reference,
    Trial,
    _random_byte,
    _write_at,
    injected,
    seen_line,
)

# Two shards (a gzip file is one), so that a rerun may find one finished and the other not.
INPUTS = [str(ROOT / "data/web" / name) for name in ("duplicates.jsonl.gz", "c4_demo.jsonl.gz")]
TIMING_KEYS = {"seconds", "wall_seconds", "execution"}


def curate_args(out: Path, workers: int) -> list[str]:
    return ["curate", *INPUTS, "--out", str(out), f"--set=curate.workers={workers}"]


def tokenize_args(run: Path) -> list[str]:
    return ["tokenize", "--run-dir", str(run), "--set=model.vocab_size=300"]


def _reference(dst: Path, args: list[str], timer: str) -> Reference:
    log = dst.parent / f"{dst.name}-writes.json"
    proc = injected(["--log-writes", str(log), "--timer", timer], args)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed: {proc.stderr[-2000:]}")
    record = json.loads(log.read_text())
    return Reference(dst, record["writes"], record["seconds"])


def curate_reference(dst: Path) -> Reference:
    """An uninterrupted curation (in one process, so that every write is logged)."""
    return _reference(dst, curate_args(dst, workers=1), "curate")


def tokenize_corpus(curated: Path, dst: Path) -> Path:
    """A run folder with curated documents and a tokenizer, ready to tokenize."""
    from scratchlm.config import load_recipe
    from scratchlm.pipeline import run_tokenizer

    dst.mkdir(parents=True)
    shutil.copytree(curated, dst / "curated", ignore=shutil.ignore_patterns(".work", ".lock"))
    run_tokenizer(load_recipe(None, ["model.vocab_size=300"]), dst)
    return dst


def tokenize_reference(corpus: Path, dst: Path) -> Reference:
    run = _copy_run(corpus, dst)
    return _reference(run / "tokens", tokenize_args(run), "tokenize")


def _copy_run(corpus: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(corpus / "curated", dst / "curated")
    shutil.copy(corpus / "tokenizer.json", dst / "tokenizer.json")
    return dst


def _documents(path: Path) -> bytes:
    with open(path, "rb") as raw:
        return zstandard.ZstdDecompressor().stream_reader(raw).read()


def _without_timings(data: object) -> object:
    if isinstance(data, dict):
        return {k: _without_timings(v) for k, v in data.items() if k not in TIMING_KEYS}
    if isinstance(data, list):
        return [_without_timings(v) for v in data]
    return data


def curated_differences(out: Path, ref: Path) -> str:
    """'' when `out` holds what `ref` holds: the same documents in the same parts, the same
    rejected records, the same stats (timings aside), and nothing half-written or locked."""
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    files = [f for f in files if f.parts[0] != ".work"]
    want = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    want = [f for f in want if f.parts[0] != ".work"]
    if files != want:
        return f"files differ: {sorted(set(map(str, files)) ^ set(map(str, want)))}"
    for name in files:
        if name.suffix == ".zst" and _documents(out / name) != _documents(ref / name):
            return f"{name} differs"
        if name.name == "stats.json":
            got, expected = (json.loads((d / name).read_text()) for d in (out, ref))
            if _without_timings(got) != _without_timings(expected):
                return "stats.json differs"
    left = [str(p.relative_to(out)) for p in out.rglob("*.tmp")]
    return f"left behind: {left}" if left else ""


def tokens_differences(tokens: Path, ref: Path) -> str:
    """'' when the token folders are the same: the shards byte for byte, meta.json but for the
    paths of its sources (each run folder has its own)."""
    names = sorted(p.name for p in tokens.iterdir())
    if names != sorted(p.name for p in ref.iterdir()):
        return f"files differ: {names}"
    for name in names:
        got, want = (tokens / name).read_bytes(), (ref / name).read_bytes()
        if name == "meta.json":
            got, want = (json.loads(m) for m in (got, want))
            for meta in (got, want):
                meta["sources"] = [Path(p).name for p in meta["sources"]]
        if got != want:
            return f"{name} differs"
    return ""


def _kill(args: list[str], output: Path, ref: Reference, rng: random.Random, by: str, timer: str):
    """SIGKILL the command at a random moment or write; a run that ends first is tried again,
    from nothing (a rerun over its finished output would end at once), and earlier."""
    for attempt in range(4):
        shutil.rmtree(output, ignore_errors=True)
        if by == "time":
            at = rng.uniform(0, ref.seconds) / 2**attempt
            flags = ["--kill-at-seconds", f"{at:.3f}", "--timer", timer]
            point = f"{at:.2f} s into {timer}"
        else:
            at = _random_byte(ref, rng)
            flags = ["--kill-after", str(at), "--timer", timer]
            point = f"writing {_write_at(ref, at)}"
        proc = injected(flags, args)
        if proc.returncode == -9:
            return point, ""
        if proc.returncode != 0:
            return point, f"exit {proc.returncode}: {seen_line(proc)}"
    return point, "the run ended before the kill"


def kill_curate_trial(ref: Reference, dst: Path, rng: random.Random, by: str) -> Trial:
    """SIGKILL of `scratchlm curate` (with 2 worker processes when by="time"), then the same
    command again."""
    workers = 2 if by == "time" else 1
    point, problem = _kill(curate_args(dst, workers), dst, ref, rng, by, "curate")
    if problem:
        return Trial("SIGKILL, curate", point, False, "", problem)
    again = injected([], curate_args(dst, workers))
    notes = [line for line in again.stdout.splitlines() if "left half-written" in line]
    problem = f"the rerun failed: {seen_line(again)}" if again.returncode else ""
    problem = problem or curated_differences(dst, ref.run)
    return Trial("SIGKILL, curate", point, not problem, (notes or [""])[0], problem)


def kill_tokenize_trial(
    corpus: Path, ref: Reference, dst: Path, rng: random.Random, by: str
) -> Trial:
    """SIGKILL of `scratchlm tokenize`, then the same command again."""
    run = _copy_run(corpus, dst)
    point, problem = _kill(tokenize_args(run), run / "tokens", ref, rng, by, "tokenize")
    if problem:
        return Trial("SIGKILL, tokenize", point, False, "", problem)
    again = injected([], tokenize_args(run))
    notes = [line for line in again.stdout.splitlines() if "left half-written" in line]
    problem = f"the rerun failed: {seen_line(again)}" if again.returncode else ""
    problem = problem or tokens_differences(run / "tokens", ref.run)
    return Trial("SIGKILL, tokenize", point, not problem, (notes or [""])[0], problem)


def disk_full_curate_trial(ref: Reference, dst: Path, rng: random.Random) -> Trial:
    at = _random_byte(ref, rng)
    point = f"writing {_write_at(ref, at)}"
    proc = injected(["--enospc-after", str(at)], curate_args(dst, workers=1))
    line = seen_line(proc)
    problems = []
    if proc.returncode != 1 or not line.startswith("error: disk full writing "):
        problems.append(f"exit {proc.returncode}")
    if "Traceback" in proc.stderr:
        problems.append("a traceback was printed")
    if left := [str(p) for p in dst.rglob("*.tmp")]:
        problems.append(f"partial files left: {left}")
    if not problems:
        again = injected([], curate_args(dst, workers=1))
        problems.append(f"the rerun failed: {seen_line(again)}" if again.returncode else "")
        problems.append(curated_differences(dst, ref.run))
    problem = "; ".join(p for p in problems if p)
    return Trial("disk full, curate", point, not problem, line, problem)


def disk_full_tokenize_trial(corpus: Path, ref: Reference, dst: Path, rng: random.Random) -> Trial:
    run = _copy_run(corpus, dst)
    at = _random_byte(ref, rng)
    point = f"writing {_write_at(ref, at)}"
    proc = injected(["--enospc-after", str(at)], tokenize_args(run))
    line = seen_line(proc)
    problems = []
    if proc.returncode != 1 or not line.startswith("error: disk full writing "):
        problems.append(f"exit {proc.returncode}")
    if "Traceback" in proc.stderr:
        problems.append("a traceback was printed")
    tokens = run / "tokens"
    left = [str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name]
    if tokens.is_dir():
        left += [p.name for p in tokens.iterdir() if p.name.startswith(".")]
    if left:
        problems.append(f"partial files left: {left}")
    if not problems:
        again = injected([], tokenize_args(run))
        problems.append(f"the rerun failed: {seen_line(again)}" if again.returncode else "")
        problems.append(tokens_differences(tokens, ref.run))
    problem = "; ".join(p for p in problems if p)
    return Trial("disk full, tokenize", point, not problem, line, problem)


def run_all(workdir: Path, kills: int = 10, disk_fulls: int = 4, seed: int = 0, say=print):
    """`kills` SIGKILLs of curation and of tokenization each (half at random moments with the
    worker processes, half inside random writes), `disk_fulls` full disks of each."""
    rng = random.Random(seed)
    trials: list[Trial] = []

    def add(trial: Trial) -> None:
        say(f"{trial.fault:>30} | {trial.point:<52} | {'ok' if trial.recovered else 'FAILED'}")
        trials.append(trial)

    ref = curate_reference(workdir / "curate-reference")
    for i in range(kills):
        add(kill_curate_trial(ref, workdir / f"curate-kill-{i}", rng, "time" if i % 2 else "bytes"))
    for i in range(disk_fulls):
        add(disk_full_curate_trial(ref, workdir / f"curate-full-{i}", rng))
    corpus = tokenize_corpus(ref.run, workdir / "tokenize-corpus")
    tref = tokenize_reference(corpus, workdir / "tokenize-reference")
    for i in range(kills):
        by = "time" if i % 2 else "bytes"
        add(kill_tokenize_trial(corpus, tref, workdir / f"tokenize-kill-{i}", rng, by))
    for i in range(disk_fulls):
        add(disk_full_tokenize_trial(corpus, tref, workdir / f"tokenize-full-{i}", rng))
    return trials
