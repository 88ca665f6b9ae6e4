"""Prompts for PPO and GRPO: each record's conversation up to its last assistant turn, with that
turn kept as the reference answer (what a verifiable reward compares with).

    prompts = load_prompts(["data/preference", "arithmetic:20"], tokenizer, 192, 0.1)
    prompts.train, prompts.held_out      lists of Prompt
    prompts.describe()                   "1,204 prompts (60 held out), 3 set aside (2 too long...)"

A source is a file or folder in any layout scratchlm.align.data reads (chat, preference, Alpaca,
ShareGPT, HH-RLHF, ...; a preference record's reference is its chosen answer), GSM8K's
{"question", "answer"}, a prompt alone ({"messages"} with no assistant turn, or {"prompt"}), or
`arithmetic[:N]`, the generated problems of tasks.arithmetic_problems. A record that fits none,
or whose prompt leaves the response no room in the context, is set aside with its reason. The
held-out prompts are those the other stages hold out (data.validation_bucket), so a reward model
has not seen them either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from scratchlm.align.data import (
    Reject,
    data_files,
    prompt_of,
    raw_records,
    reason_kind,
    validation_bucket,
)
from scratchlm.align.formats import BadRecord, check_messages, to_chat
from scratchlm.align.tasks import arithmetic_problems
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer


@dataclass
class Prompt:
    messages: list[dict]
    """The conversation the policy answers; it ends with a user (or system) turn."""
    reference: str
    """The record's own answer ('' when it has none)."""
    ids: list[int]
    """encode_chat(messages) followed by <|assistant|>: what the policy continues."""


@dataclass
class Prompts:
    train: list[Prompt] = field(default_factory=list)
    held_out: list[Prompt] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def describe(self) -> str:
        n = len(self.train) + len(self.held_out)
        text = f"{n:,} prompts ({len(self.held_out):,} held out)"
        if self.rejects:
            counts = Counter(reason_kind(r.reason) for r in self.rejects)
            reasons = ", ".join(f"{k} {why}" for why, k in counts.most_common())
            text += f", {len(self.rejects):,} set aside ({reasons})"
        return text


def load_prompts(
    sources: list[str], tokenizer: Tokenizer, max_tokens: int, held_out_fraction: float
) -> Prompts:
    """Prompts of every source, those longer than max_tokens set aside, split into training and
    held-out prompts. A source that does not exist is a UserError."""
    if not sources:
        raise UserError("no prompt data: set data = [files...] in the stage's recipe section")
    prompts = Prompts()
    for source, record, error in _records(sources):
        if error is None:
            try:
                messages, reference = prompt_and_reference(record)
            except BadRecord as e:
                error = str(e)
        if error is not None:
            prompts.rejects.append(Reject(source, error, record))
            continue
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
        if len(ids) > max_tokens:
            reason = f"too long ({len(ids)} prompt tokens, at most {max_tokens})"
            prompts.rejects.append(Reject(source, reason, record))
            continue
        held = validation_bucket({"prompt": messages}) < held_out_fraction
        (prompts.held_out if held else prompts.train).append(Prompt(messages, reference, ids))
    if not prompts.train:
        raise UserError(f"no usable prompts in {', '.join(sources)}: {prompts.describe()}")
    return prompts


def count_prompts(sources: list[str]) -> int:
    """How many records of the sources have a prompt, before any tokenizer is at hand: what a
    stage checks before it changes its folder. A source that does not exist is a UserError."""
    count = 0
    for _, record, error in _records(sources):
        if error is None:
            try:
                prompt_and_reference(record)
            except BadRecord:
                continue
            count += 1
    return count


def _records(sources: list[str]) -> Iterator[tuple[str, Any, str | None]]:
    """(source, record, None), or (source, raw text, reason) for a line that is not JSON."""
    for source in sources:
        if source == "arithmetic" or source.startswith("arithmetic:"):
            limit = source.partition(":")[2] or "20"
            if not limit.isdigit():
                raise UserError(f"prompt source {source!r}: expected arithmetic or arithmetic:N")
            for i, record in enumerate(arithmetic_problems(int(limit)), 1):
                yield f"{source}:{i}", record, None
            continue
        for path in data_files([source]):
            for line, record, error in raw_records(path):
                yield f"{path}:{line}", record, error


def prompt_and_reference(record: Any) -> tuple[list[dict], str]:
    """(prompt messages, reference answer) of a record; BadRecord with the reason if none."""
    if isinstance(record, dict) and "messages" not in record:
        if isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
            question = [{"role": "user", "content": record["question"]}]
            return check_messages(question), record["answer"]
        if "prompt" in record and "chosen" not in record:
            return _ends_with_a_question(check_messages(record["prompt"], "prompt")), ""
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = check_messages(record["messages"])
        if not any(m["role"] == "assistant" for m in messages):
            return _ends_with_a_question(messages), ""
    messages = to_chat(record)["messages"]
    prompt = prompt_of(messages)
    if not prompt:
        raise BadRecord("no prompt before the assistant turn")
    return _ends_with_a_question(prompt), messages[len(prompt)]["content"]


def _ends_with_a_question(messages: list[dict]) -> list[dict]:
    if messages[-1]["role"] == "assistant":
        raise BadRecord("prompt ends with an assistant turn")
    return messages
