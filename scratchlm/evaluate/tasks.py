"""Benchmark tasks: how an example becomes a prompt, requests and scores, and the registry.

The prompt of every task follows lm-evaluation-harness exactly (its `fewshot_context`): an
optional description, K solved examples ("question" + target delimiter + answer + few-shot
delimiter) and the question, as plain text or, with `chat`, as chat turns. Few-shot examples are
drawn the harness's way: `random.Random(1234)` sampling per task in example order (leaving out
the example itself when the pool is the evaluated file), or the first K ("first_n", MMLU).

Registering a task from another module:

    from scratchlm.evaluate.tasks import Task, register_task

    class Preference(Task):
        name = "preference"
        def run(self, model, tokenizer, options): ...   # -> {"acc": ..., "n": ..., ...}

    register_task(Preference())

A task name can also map to "module:attribute" in LAZY_TASKS, imported the first time the task
is asked for (so `scratchlm eval --tasks preference` works without importing it up front).
"""

from __future__ import annotations

import importlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchlm.device import Runtime, pick_runtime
from scratchlm.errors import UserError
from scratchlm.evaluate.data import DEFAULT_DATA_DIR, check_fields, data_path, read_jsonl
from scratchlm.evaluate.scoring import TextEncoder, encode_pairs, mean_stderr, score_requests
from scratchlm.tokenizer import Tokenizer

HARNESS_FEWSHOT_SEED = 1234
"""lm-evaluation-harness's default --fewshot_random_seed."""


@dataclass
class EvalOptions:
    limit: int = 0
    """Only the first N examples of each (sub)task, in file order, as the harness's --limit."""
    shots: int | None = None
    """Few-shot examples; None: the task's default."""
    batch_size: int = 32
    """Rows of up to max_seq_len tokens per forward pass."""
    data: str | None = None
    """Another file (or folder) in the task's layout, instead of its file in data_dir."""
    data_dir: str = DEFAULT_DATA_DIR
    chat: bool = False
    """Prompts through the chat template, few-shot examples as turns."""
    max_gen_toks: int = 256
    runtime: Runtime = field(default_factory=lambda: pick_runtime("cpu", "fp32"))
    checkpoint: str | None = None
    """The checkpoint folder the model came from (a policy's preference score needs the model
    its stage started from)."""
    examples: bool = False
    """Also return each example's (log-likelihood, greedy) per request, under "examples"."""


class Task:
    """Anything `scratchlm eval --tasks NAME` can run."""

    name: str = ""
    harness_name: str | None = None
    """The lm-evaluation-harness task (scratchlm/evaluate/harness_tasks) that gives the same
    numbers, if any."""

    def run(self, model: torch.nn.Module, tokenizer: Tokenizer, options: EvalOptions) -> dict:
        """Metric values, `<metric>_stderr`, `n` (examples) and `chance` where it applies."""
        raise NotImplementedError


TASKS: dict[str, Task] = {}
LAZY_TASKS: dict[str, str] = {"preference": "scratchlm.align.evaluate:PreferenceTask"}
BUILTIN_MODULES = (
    "scratchlm.evaluate.benchmarks",
    "scratchlm.evaluate.language_model",
    "scratchlm.evaluate.gsm8k",
)


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    _import_builtins()
    if name not in TASKS and name in LAZY_TASKS:
        module, _, attribute = LAZY_TASKS[name].partition(":")
        task = getattr(importlib.import_module(module), attribute)
        register_task(task() if isinstance(task, type) else task)
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; tasks: {', '.join(task_names())}")
    return TASKS[name]


def task_names() -> list[str]:
    _import_builtins()
    return sorted({*TASKS, *LAZY_TASKS})


def _import_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


# -- prompts, the harness's way -----------------------------------------------------------------


@dataclass
class Turn:
    role: str
    content: str
    delimiter: str = ""
    """What follows the content in a plain-text prompt."""


def render(turns: list[Turn], tokenizer: Tokenizer, chat: bool) -> str:
    if chat:
        messages = [{"role": t.role, "content": t.content} for t in turns]
        return tokenizer.render_chat(messages, add_generation_prompt=True)
    return "".join(t.content + t.delimiter for t in turns)


@dataclass
class Subset:
    """What one harness task reads: the examples scored and the few-shot pool."""

    name: str
    docs: list[dict[str, Any]]
    pool: list[dict[str, Any]]
    pool_is_docs: bool
    """The pool is the evaluated file itself, so an example is never its own few-shot example."""


class PromptTask(Task):
    """A benchmark read from JSON Lines, prompted like its lm-evaluation-harness task."""

    file: str = ""
    fields: tuple[str, ...] = ()
    default_shots: int = 0
    fixed_shots: bool = False
    """The harness ignores --num_fewshot for this task (its YAML sets num_fewshot: 0)."""
    sampler: str = "random"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    weight_by_size: bool = True
    """How subtask scores combine: by example count (MMLU) or a plain mean (BLiMP)."""

    def description(self, doc: dict) -> str:
        return ""

    def text(self, doc: dict) -> str:
        raise NotImplementedError

    def answer(self, doc: dict) -> str:
        """The text of a solved few-shot example's answer."""
        raise NotImplementedError

    def subsets(self, path: Path, options: EvalOptions) -> list[Subset]:
        docs = self.read(path)
        return [Subset(self.name, docs, docs, pool_is_docs=True)]

    def read(self, path: Path) -> list[dict]:
        docs = read_jsonl(path)
        if not docs:
            raise UserError(f"{path}: no records for the {self.name} task")
        check_fields(docs, self.fields, path, self.name)
        return docs

    def path(self, options: EvalOptions) -> Path:
        if options.data:
            return Path(options.data).expanduser()
        return data_path(options.data_dir, self.file)

    def shots(self, options: EvalOptions) -> int:
        if options.shots is None or self.fixed_shots:
            return self.default_shots
        if options.shots < 0:
            raise UserError(f"--shots must be >= 0, got {options.shots}")
        return options.shots

    def fewshot(self, subset: Subset, doc: dict, shots: int, rng: random.Random) -> list[dict]:
        if shots == 0:
            return []
        pool = subset.pool
        need = shots + 1 if subset.pool_is_docs else shots
        if len(pool) < need:
            raise UserError(
                f"{self.name}: {shots}-shot needs {need} examples, the pool has {len(pool)}"
            )
        if self.sampler == "first_n":
            return [d for d in pool if not (subset.pool_is_docs and d == doc)][:shots]
        if not subset.pool_is_docs:
            return rng.sample(pool, shots)
        picked = [d for d in rng.sample(pool, shots + 1) if d != doc][:shots]
        if len(picked) < shots:  # the pool holds copies of this example
            picked = rng.sample([d for d in pool if d != doc], shots)
        return picked

    def solved_turns(self, examples: list[dict]) -> list[Turn]:
        turns = []
        for example in examples:
            turns.append(Turn("user", self.text(example), self.target_delimiter))
            turns.append(Turn("assistant", self.answer(example), self.fewshot_delimiter))
        return turns

    def opening(self, subset: Subset, doc: dict, shots: int, rng: random.Random) -> list[Turn]:
        turns = []
        if description := self.description(doc):
            turns.append(Turn("system", description))
        return turns + self.solved_turns(self.fewshot(subset, doc, shots, rng))

    def run(self, model, tokenizer, options):
        started = time.perf_counter()
        path = self.path(options)
        shots = self.shots(options)
        prepared = []
        for subset in self.subsets(path, options):
            docs = subset.docs[: options.limit] if options.limit > 0 else subset.docs
            rng = random.Random(HARNESS_FEWSHOT_SEED)  # one sampler per harness (sub)task
            prepared.append(
                (subset.name, docs, [self.opening(subset, d, shots, rng) for d in docs])
            )
        parts = self.evaluate(model, tokenizer, prepared, options)
        result = (
            combine(parts, self.weight_by_size) if len(parts) > 1 else next(iter(parts.values()))
        )
        result["shots"] = shots
        result["seconds"] = round(time.perf_counter() - started, 3)
        if len(parts) > 1:
            if options.examples:
                result["examples"] = [e for p in parts.values() for e in p.pop("examples")]
            result["subtasks"] = parts
        return result

    def evaluate(
        self, model, tokenizer, prepared: list[tuple[str, list[dict], list[list[Turn]]]], options
    ) -> dict[str, dict]:
        """Scores per subset, given each subset's name, examples and prompt openings."""
        raise NotImplementedError


class ScoredTask(PromptTask):
    """A task scored by log-likelihoods of continuations, all its subsets in one pass."""

    needs_greedy: bool = False
    """Whether a metric asks if greedy decoding gives the continuation (LAMBADA's acc)."""

    def requests(
        self, prompt: Callable[[list[Turn]], str], doc: dict, opening: list[Turn], delimiter: str
    ) -> list[tuple[str, str]]:
        """(context, continuation) texts to score for one example."""
        raise NotImplementedError

    def metrics(self, docs: list[dict], scored: list[list[tuple[float, bool]]]) -> dict:
        raise NotImplementedError

    def evaluate(self, model, tokenizer, prepared, options):
        encode, prefix = encoder(tokenizer)
        # Under a chat template the answer follows the assistant marker directly.
        delimiter = "" if options.chat else self.target_delimiter

        def prompt(turns: list[Turn]) -> str:
            return render(turns, tokenizer, options.chat)

        texts = [
            self.requests(prompt, doc, opening, delimiter)
            for _, docs, openings in prepared
            for doc, opening in zip(docs, openings, strict=True)
        ]
        examples = encode_pairs(encode, prefix, texts, model.config.max_seq_len + 1)
        scored = score_requests(
            model, examples, options.batch_size, options.runtime, greedy=self.needs_greedy
        )
        parts, at = {}, 0
        for name, docs, _ in prepared:
            part = scored[at : at + len(docs)]
            parts[name] = self.metrics(docs, part)
            if options.examples:
                parts[name]["examples"] = [[list(r) for r in results] for results in part]
            at += len(docs)
        return parts


def combine(parts: dict[str, dict], weight_by_size: bool) -> dict:
    """Subtask scores into a group score, as the harness aggregates a group: mean weighted by
    size with the pooled standard error, or the plain mean with sqrt(sum se^2) / k."""
    sizes = [p["n"] for p in parts.values()]
    out: dict[str, Any] = {"n": sum(sizes)}
    names = [k for k in next(iter(parts.values())) if k not in ("n",) and "_stderr" not in k]
    for name in names:
        values = [p[name] for p in parts.values()]
        if not all(isinstance(v, (int, float)) and v is not None for v in values):
            continue
        weights = sizes if weight_by_size else [1] * len(sizes)
        out[name] = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
        errors = [p.get(f"{name}_stderr") for p in parts.values()]
        if name == "chance" or any(e is None for e in errors):
            continue
        if weight_by_size:
            pooled = sum((n - 1) * e**2 * n for n, e in zip(sizes, errors, strict=True))
            out[f"{name}_stderr"] = math.sqrt(pooled / (sum(sizes) - len(sizes)) / sum(sizes))
        else:
            out[f"{name}_stderr"] = math.sqrt(sum(e**2 for e in errors)) / len(errors)
    return out


def mean_metric(name: str, values: Sequence[float]) -> dict[str, float | None]:
    return {name: float(np.mean(values)), f"{name}_stderr": mean_stderr(values)}


class MultipleChoiceTask(ScoredTask):
    """Choices scored by log-likelihood: acc, and acc_norm (divided by the choice's length in
    characters), as the harness's multiple_choice output type."""

    reported: tuple[str, ...] = ("acc", "acc_norm")

    def choices(self, doc: dict) -> list[str]:
        raise NotImplementedError

    def gold(self, doc: dict) -> int:
        raise NotImplementedError

    def answer(self, doc):
        return self.choices(doc)[self.gold(doc)]

    def requests(self, prompt, doc, opening, delimiter):
        context = prompt([*opening, Turn("user", self.text(doc))])
        return [(context, delimiter + choice) for choice in self.choices(doc)]

    def metrics(self, docs, scored):
        per_doc: dict[str, list[float]] = {"acc": [], "acc_norm": []}
        for doc, results in zip(docs, scored, strict=True):
            lls = np.array([ll for ll, _ in results])
            lengths = np.array([float(len(c)) for c in self.choices(doc)])
            gold = self.gold(doc)
            # np.argmax takes the first of equal scores, as the harness's does.
            per_doc["acc"].append(float(np.argmax(lls) == gold))
            per_doc["acc_norm"].append(float(np.argmax(lls / lengths) == gold))
        out: dict[str, Any] = {"n": len(docs)}
        for name in self.reported:
            out |= mean_metric(name, per_doc[name])
        out["chance"] = float(np.mean([1 / len(results) for results in scored]))
        return out


class PartialScoringTask(MultipleChoiceTask):
    """The choices complete the context and one fixed continuation is scored after each
    (WinoGrande's partial evaluation; the harness's "multiple inputs")."""

    reported = ("acc",)

    def text(self, doc):
        return self.choices(doc)[self.gold(doc)]

    def continuation(self, doc: dict) -> str:
        raise NotImplementedError

    def answer(self, doc):
        return self.continuation(doc)

    def requests(self, prompt, doc, opening, delimiter):
        target = delimiter + self.continuation(doc)
        return [(prompt([*opening, Turn("user", c)]), target) for c in self.choices(doc)]


def encoder(tokenizer: Tokenizer) -> tuple[TextEncoder, int]:
    """The text encoder and the prefix token an empty context gets: bos, which is what the
    harness takes for a tokenizer that has one."""
    return TextEncoder(tokenizer), tokenizer.bos_id
