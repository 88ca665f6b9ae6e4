"""Fault trials on the tiny training run, through the CLI as a user runs it: each trial injects
one fault, shows what the user saw, lets the cause go (space freed, the data rebuilt, the other
process gone) and checks that the run then ends exactly as an uninterrupted one.

Shared by tests/test_faults_*.py (a few trials in `make test`, the full count behind the slow
marker) and bench/faults.py, which prints the table of all of them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from scratchlm.checkpoint import load_checkpoint
from scratchlm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
INJECT = Path(__file__).resolve().parent / "fault_inject.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# The tiny model of test_pretrain, for 8 steps with a checkpoint every 2 (the newest 2 kept).
TRAIN = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.max_seq_len=32",
    "model.vocab_size=300",
    "pretrain.tokens_per_step=256",
    "pretrain.micro_batch_size=4",
    "pretrain.warmup_steps=2",
    "pretrain.lr=1e-2",
    "pretrain.device=cpu",
    "pretrain.max_steps=8",
    "pretrain.save_every=2",
    "pretrain.eval_every=4",
    "pretrain.eval_tokens=256",
    "pretrain.keep_checkpoints=2",
]


@dataclass
class Trial:
    fault: str
    point: str
    """Where the fault struck."""
    recovered: bool
    """The run, continued once the cause was gone, ended exactly as an uninterrupted one."""
    seen: str
    """The line the user saw."""
    problem: str = ""


@dataclass
class Reference:
    run: Path
    writes: list
    """[path, offset, bytes] of every write of the uninterrupted run."""
    seconds: float
    """How long the stage itself ran (not the start-up)."""


def scratchlm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scratchlm", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def injected(flags: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """The CLI under the fault injector, in a session of its own: its kills end it and its
    workers, not the caller."""
    return subprocess.run(
        [sys.executable, str(INJECT), *flags, "--", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        start_new_session=True,
    )


def pretrain_args(run: Path, *flags: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["pretrain", "--run-dir", str(run), *flags, *(f"--set={s}" for s in [*TRAIN, *extra])]


def make_corpus(dst: Path, chars: int = 40_000) -> Path:
    """A run folder with curated TinyStories documents, a tokenizer and token shards."""
    import gzip

    from scratchlm.config import load_recipe
    from scratchlm.documents import write_documents
    from scratchlm.pipeline import run_tokenize, run_tokenizer

    with gzip.open(ROOT / "data/tinystories/tinystories_train_head_lowercase.txt.gz", "rt") as f:
        stories = [s for s in f.read(chars).split("\n") if s.strip()]
    write_documents(
        dst / "curated" / "part-00000.jsonl.zst",
        ({"id": f"s{i}", "text": s, "meta": {}} for i, s in enumerate(stories)),
    )
    recipe = load_recipe(None, TRAIN)
    run_tokenizer(recipe, dst)
    run_tokenize(recipe, dst)
    return dst


def copy_corpus(corpus: Path, dst: Path) -> Path:
    """A run folder with the corpus's tokenizer and token shards (and curated documents)."""
    dst.mkdir(parents=True)
    shutil.copy(corpus / "tokenizer.json", dst / "tokenizer.json")
    shutil.copytree(corpus / "tokens", dst / "tokens")
    shutil.copytree(corpus / "curated", dst / "curated")
    return dst


def reference(corpus: Path, dst: Path) -> Reference:
    run = copy_corpus(corpus, dst)
    log = dst.parent / f"{dst.name}-writes.json"
    proc = injected(["--log-writes", str(log)], pretrain_args(run))
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed: {proc.stderr[-2000:]}")
    record = json.loads(log.read_text())
    return Reference(run, record["writes"], record["seconds"])


def seen_line(proc: subprocess.CompletedProcess) -> str:
    """The line a user reads: the error line, else the last line of stderr."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1]


def _tensors_equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_tensors_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def leftovers(run: Path) -> list[str]:
    """What a run must never leave behind once it has ended: temporary files and its lock."""
    found = [p for p in run.glob(".tmp-*")] + [p for p in run.glob("pretrain/.tmp-*")]
    found += [p for p in run.glob("pretrain/.latest-*")] + [p for p in run.glob(".lock")]
    return sorted(str(p.relative_to(run)) for p in found)


def differences(run: Path, ref: Path, all_checkpoints: bool = True) -> str:
    """'' when `run` ended exactly as `ref`: the same loss and validation rows, each step once,
    the same checkpoints (or, all_checkpoints=False, the same last one: weights, optimizer
    moments, trainer state) and nothing left over."""
    rows, want = (read_metrics(r / "metrics.jsonl") for r in (run, ref))
    keys = ("step", "loss", "val_loss", "val_bpb")
    got_rows = [{k: r[k] for k in keys if k in r} for r in rows if r.get("stage") == "pretrain"]
    want_rows = [{k: r[k] for k in keys if k in r} for r in want if r.get("stage") == "pretrain"]
    if got_rows != want_rows:
        return f"metrics differ: {got_rows} != {want_rows}"
    names = sorted(p.name for p in (run / "pretrain").glob("step-*"))
    want_names = sorted(p.name for p in (ref / "pretrain").glob("step-*"))
    if not all_checkpoints:
        names, want_names = names[-1:], want_names[-1:]
    if names != want_names:
        return f"checkpoints differ: {names}"
    if (run / "pretrain/latest").resolve().name != names[-1]:
        return "latest does not point at the newest checkpoint"
    for name in names:
        a, b = run / "pretrain" / name, ref / "pretrain" / name
        weights = [load_checkpoint(c).tensors for c in (a, b)]  # sharded ones consolidated
        if not _tensors_equal(*weights):
            return f"{name}: weights differ"
        if (a / "optimizer.pt").exists():
            opt = [torch.load(c / "optimizer.pt", weights_only=True) for c in (a, b)]
        else:  # sharded: each rank's file of parameters and optimizer moments
            opt = [[p.read_bytes() for p in sorted(c.glob("*.distcp"))] for c in (a, b)]
        if not _tensors_equal(*opt):
            return f"{name}: optimizer state differs"
        states = [json.loads((c / "trainer_state.json").read_text()) for c in (a, b)]
        for state in states:
            state.pop("elapsed")
        if states[0] != states[1]:
            return f"{name}: trainer state differs"
    left = leftovers(run)
    return f"left behind: {left}" if left else ""


def _resume(run: Path) -> tuple[subprocess.CompletedProcess, str]:
    proc = scratchlm(*pretrain_args(run, "--resume"))
    if proc.returncode != 0:
        return proc, f"the resume failed: {seen_line(proc)}"
    return proc, ""


def _file_name(ref: Reference, path: str) -> str:
    """A written file's path in the run folder, without the writer's PID or .tmp suffix."""
    name = re.sub(r"-\d+(?=/|$)", "", os.path.relpath(path, ref.run))
    while name.startswith("../"):
        name = name[3:]
    return re.sub(r"(^|/)\.tmp-", r"\1", name).removesuffix(".tmp")


def _write_at(ref: Reference, offset: int) -> str:
    """The file the reference run was writing at byte `offset` of all its writes."""
    for path, start, n in ref.writes:
        if start <= offset < start + n:
            return _file_name(ref, path)
    return "after the last write"


def _random_byte(ref: Reference, rng: random.Random) -> int:
    """A byte of the run's writes: a file picked at random (so that the small ones, a metrics
    row, a manifest, are hit as often as the large), then a byte of it."""
    by_file: dict[str, list[tuple[int, int]]] = {}
    for path, start, n in ref.writes:
        if n:
            by_file.setdefault(_file_name(ref, path), []).append((start, n))
    ranges = by_file[rng.choice(sorted(by_file))]
    offset = rng.randrange(sum(n for _, n in ranges))
    for start, n in ranges:
        if offset < n:
            return start + offset
        offset -= n
    raise AssertionError("unreachable")


def kill_trial(corpus: Path, ref: Reference, dst: Path, rng: random.Random, by: str) -> Trial:
    """SIGKILL at a random moment of the training loop (by="time") or at a random byte of
    everything the run writes (by="bytes": inside checkpoints, metrics, the recipe), then
    `--resume`."""
    run = copy_corpus(corpus, dst)
    for attempt in range(4):
        if by == "time":
            at = rng.uniform(0, ref.seconds) / 2**attempt
            flags, point = ["--kill-at-seconds", f"{at:.3f}"], f"{at:.2f} s into training"
        else:
            at = _random_byte(ref, rng)
            flags, point = ["--kill-after", str(at)], f"writing {_write_at(ref, at)}"
        killed = injected(flags, pretrain_args(run))
        if killed.returncode == -signal.SIGKILL:
            break
        if killed.returncode != 0:
            return Trial("SIGKILL, pretrain", point, False, seen_line(killed), "the run failed")
    else:
        return Trial("SIGKILL, pretrain", point, False, "", "the run ended before the kill")
    resumed, problem = _resume(run)
    problem = problem or differences(run, ref.run)
    notes = [line for line in resumed.stdout.splitlines() if "resumed from" in line]
    notes += [line for line in resumed.stdout.splitlines() if "no checkpoint" in line]
    return Trial("SIGKILL, pretrain", point, not problem, (notes or [""])[0], problem)


def disk_full_trial(corpus: Path, ref: Reference, dst: Path, rng: random.Random) -> Trial:
    """The disk fills up at a random byte of everything the run writes; the run must stop with one
    line and no partial file, and `--resume` once there is space must end as the reference."""
    run = copy_corpus(corpus, dst)
    at = _random_byte(ref, rng)
    point = f"writing {_write_at(ref, at)}"
    proc = injected(["--enospc-after", str(at)], pretrain_args(run))
    line = seen_line(proc)
    if proc.returncode != 1 or not line.startswith("error: disk full writing"):
        return Trial("disk full, pretrain", point, False, line, f"exit {proc.returncode}")
    if "Traceback" in proc.stderr:
        return Trial("disk full, pretrain", point, False, line, "a traceback was printed")
    if left := leftovers(run):
        return Trial("disk full, pretrain", point, False, line, f"partial files left: {left}")
    _, problem = _resume(run)
    problem = problem or differences(run, ref.run)
    return Trial("disk full, pretrain", point, not problem, line, problem)


def double_launch_trial(corpus: Path, dst: Path) -> Trial:
    """A second `scratchlm pretrain` on a run folder whose first one still trains."""
    run = copy_corpus(corpus, dst)
    long_run = pretrain_args(run, extra=("pretrain.max_steps=100000", "pretrain.save_every=0"))
    first = subprocess.Popen(
        [sys.executable, "-m", "scratchlm", *long_run],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not read_metrics(run / "metrics.jsonl"):
            time.sleep(0.1)
        recipe = (run / "recipe.toml").read_bytes()
        second = scratchlm(*pretrain_args(run, extra=("pretrain.lr=0.5",)))
        still_running = first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    line = seen_line(second)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    problems = []
    if second.returncode != 2 or f"in use by PID {first.pid}" not in line:
        problems.append(f"the second run exited {second.returncode}")
    if not still_running:
        problems.append("the first run did not survive")
    if (run / "recipe.toml").read_bytes() != recipe:
        problems.append("the second run rewrote recipe.toml")
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"interleaved metrics: {steps[:20]}")
    if first.returncode != 128 + signal.SIGTERM:
        problems.append(f"the first run ended with {first.returncode}")
    return Trial("double launch", "while the first trains", not problems, line, "; ".join(problems))


def damaged_data_trial(corpus: Path, ref: Reference, dst: Path, damage: str) -> Trial:
    """Damaged token shards must stop `pretrain` before it trains; rebuilding them with
    `scratchlm tokenize` must give the reference run."""
    run = copy_corpus(corpus, dst)
    shard = run / "tokens/train-00000.bin"
    meta_path = run / "tokens/meta.json"
    if damage == "truncated shard":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif damage == "meta.json off":
        meta = json.loads(meta_path.read_text())
        meta["splits"]["train"]["shards"][0]["tokens"] -= 1
        meta["splits"]["train"]["tokens"] -= 1
        meta_path.write_text(json.dumps(meta))
    elif damage == "tokenizer changed":
        tok = json.loads((run / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        first, second = sorted(vocab, key=vocab.get)[10:12]
        vocab[first], vocab[second] = vocab[second], vocab[first]
        (run / "tokenizer.json").write_text(json.dumps(tok))
        shutil.copy(corpus / "tokenizer.json", dst.parent / f"{dst.name}-tokenizer.json")
    elif damage == "zeroed tail":
        with open(shard, "r+b") as f:
            f.seek(-4096, os.SEEK_END)
            f.write(bytes(4096))
    proc = scratchlm(*pretrain_args(run))
    line = seen_line(proc)
    problems = []
    if proc.returncode != 2 or "Traceback" in proc.stderr:
        problems.append(f"exit {proc.returncode}")
    if list((run / "pretrain").glob("step-*")):
        problems.append("it trained")
    if damage == "tokenizer changed":  # the cause: the tokenizer; put the one of the shards back
        shutil.copy(dst.parent / f"{dst.name}-tokenizer.json", run / "tokenizer.json")
    else:
        tokenize = scratchlm("tokenize", "--run-dir", str(run), *(f"--set={s}" for s in TRAIN))
        if tokenize.returncode != 0:
            problems.append(f"tokenize failed: {seen_line(tokenize)}")
    if not problems:
        again = scratchlm(*pretrain_args(run))
        if again.returncode != 0:
            problems.append(f"the rerun failed: {seen_line(again)}")
        else:
            problems.append(differences(run, ref.run))
    problem = "; ".join(p for p in problems if p)
    return Trial(damage, "at the start of pretrain", not problem, line, problem)


def nonfinite_trial(corpus: Path, ref: Reference, dst: Path, policy: str, steps: str) -> Trial:
    """NaN losses at `steps`. "stop": the run stops at the first, and `--resume` (the cause gone)
    ends as the reference. "skip": the steps are skipped and counted (a run with fewer updates,
    so not the reference), or the run stops with a checkpoint after nonfinite_limit in a row."""
    run = copy_corpus(corpus, dst)
    extra = (f"pretrain.on_nonfinite={policy}", "pretrain.nonfinite_limit=3")
    proc = injected(["--nan-at-steps", steps], pretrain_args(run, extra=extra))
    line = seen_line(proc) if proc.returncode else _skip_line(proc)
    bad = [int(s) for s in steps.split(",")]
    problems = []
    if policy == "skip" and len(bad) < 3:
        rows = read_metrics(run / "metrics.jsonl")
        skipped = [r["step"] for r in rows if r.get("skipped") == "non-finite"]
        state = json.loads((run / "pretrain/latest/trainer_state.json").read_text())
        if proc.returncode != 0 or skipped != bad or state["skipped_steps"] != len(bad):
            problems.append(f"exit {proc.returncode}, skipped {skipped}")
        weights = load_file(run / "pretrain/latest/model.safetensors")
        if not all(torch.isfinite(t).all() for t in weights.values()):
            problems.append("non-finite weights")
        fault = "non-finite loss, skip"
    else:
        fault = f"non-finite loss, {policy}" + (" (limit)" if policy == "skip" else "")
        named = f"step {bad[0]}" if policy == "stop" else f"steps {bad[0]}-{bad[-1]}"
        if proc.returncode != 1 or "Traceback" in proc.stderr or named not in line:
            problems.append(f"exit {proc.returncode}")
        if policy == "skip" and not (run / f"pretrain/step-{bad[-1]:06d}").is_dir():
            problems.append("no checkpoint at the stop")
        if not problems:
            _, problem = _resume(run)
            if not problem and policy == "stop":
                problem = differences(run, ref.run)
            if not problem and policy == "skip":  # fewer updates than the reference: it ends
                state = json.loads((run / "pretrain/latest/trainer_state.json").read_text())
                problem = "" if state["step"] == 8 else f"ended at step {state['step']}"
            problems.append(problem)
    problem = "; ".join(p for p in problems if p)
    return Trial(fault, f"step {steps}", not problem, line, problem)


def _skip_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stdout.splitlines() if "skipped the update" in line]
    return (lines or [""])[0]


def out_of_memory_trial(corpus: Path, ref: Reference, dst: Path) -> Trial:
    """Out of memory at step 5 (raised as CUDA raises it): one line, then `--resume` with the
    cause gone ends as the reference."""
    run = copy_corpus(corpus, dst)
    proc = injected(["--oom-at-step", "5"], pretrain_args(run))
    line = seen_line(proc)
    problems = []
    if proc.returncode != 1 or "Traceback" in proc.stderr or "micro_batch_size" not in line:
        problems.append(f"exit {proc.returncode}")
    else:
        _, problem = _resume(run)
        problems.append(problem or differences(run, ref.run))
    problem = "; ".join(p for p in problems if p)
    return Trial("out of memory", "step 5", not problem, line, problem)


DAMAGES = ["truncated shard", "meta.json off", "zeroed tail", "tokenizer changed"]


def run_all(
    corpus: Path, workdir: Path, kills: int = 20, disk_fulls: int = 10, seed: int = 0, say=print
) -> list[Trial]:
    """Every training fault: SIGKILL `kills` times (half at random moments of the training loop,
    half at random bytes of what it writes), a full disk `disk_fulls` times, a double launch,
    each damage to the tokens folder, non-finite losses under both policies, out of memory."""
    rng = random.Random(seed)
    ref = reference(corpus, workdir / "reference")
    trials: list[Trial] = []

    def add(trial: Trial) -> None:
        say(f"{trial.fault:>30} | {trial.point:<52} | {'ok' if trial.recovered else 'FAILED'}")
        trials.append(trial)

    for i in range(kills):
        add(kill_trial(corpus, ref, workdir / f"kill-{i}", rng, "time" if i % 2 else "bytes"))
    for i in range(disk_fulls):
        add(disk_full_trial(corpus, ref, workdir / f"full-{i}", rng))
    add(double_launch_trial(corpus, workdir / "double"))
    for i, damage in enumerate(DAMAGES):
        add(damaged_data_trial(corpus, ref, workdir / f"damage-{i}", damage))
    add(nonfinite_trial(corpus, ref, workdir / "nan-stop", "stop", "5"))
    add(nonfinite_trial(corpus, ref, workdir / "nan-skip", "skip", "3"))
    add(nonfinite_trial(corpus, ref, workdir / "nan-limit", "skip", "3,4,5"))
    add(out_of_memory_trial(corpus, ref, workdir / "oom"))
    from tmpfs_trials import Unavailable, tmpfs_trials

    try:
        for trial in tmpfs_trials(corpus, ref, workdir):
            add(trial)
    except Unavailable as e:
        say(f"skipped the real tmpfs trials: {e}")
    return trials


def table(trials: list[Trial], workdir: Path) -> str:
    """One row per fault: trials, how many recovered, where the faults struck, and the line the
    user saw (the first trial's), with the trials' run folders written RUN."""
    rows: dict[str, list[Trial]] = {}
    for trial in trials:
        rows.setdefault(trial.fault, []).append(trial)
    lines = [
        "| fault | trials | recovered | where it struck | what the user saw |",
        "|---|---:|---:|---|---|",
    ]
    for fault, group in rows.items():
        recovered = sum(t.recovered for t in group)
        points = [t.point for t in group]
        timed = sum(" s into " in p for p in points)
        written = [p.removeprefix("writing ") for p in points if p.startswith("writing ")]
        files = sorted({p.split("/")[-1].removeprefix(".tmp-") for p in written})
        where = [f"{timed} at random moments"] if timed else []
        where += [f"{len(points) - timed} inside writes of {', '.join(files)}"] if files else []
        seen = next((t.seen for t in group if t.seen), "")
        seen = re.sub(re.escape(str(workdir)) + r"/[^/\s]+(/run)?", "RUN", seen)
        shown = "; ".join(where) or points[0]
        lines.append(f"| {fault} | {len(group)} | {recovered} | {shown} | `` {seen} `` |")
    return "\n".join(lines)
