"""Prompts for PPO and GRPO: each record's conversation up to its last assistant turn, with that
turn kept as the reference answer (what a verifiable reward compares with).

    prompts = load_prompts(["data/chat.jsonl", "arithmetic:20"], tokenizer, max_tokens=192)
    prompts.train, prompts.held_out      lists of Prompt
    prompts.describe()                   "1,204 prompts (60 held out), 3 set aside (2 too long...)"

A source is a file of JSON Lines (or one JSON array; plain or .gz) in the chat layout
{"messages": [...]}, the preference layout {"prompt": [...], ...} or GSM8K's {"question",
"answer"}; or `arithmetic[:N]`, the generated problems of tasks.arithmetic_problems. A record
that fits none, or whose prompt is too long for the responses to fit the context, is counted and
set aside with its reason. The held-out share is fixed by each prompt's text, so it never depends
on file order.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from scratchlm.align.tasks import arithmetic_problems
from scratchlm.errors import UserError
from scratchlm.paths import resolve
from scratchlm.tokenizer import ROLE_TOKENS, Tokenizer


class BadRecord(ValueError):
    pass


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
    set_aside: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        n = len(self.train) + len(self.held_out)
        text = f"{n:,} prompts ({len(self.held_out):,} held out)"
        if self.set_aside:
            reasons = ", ".join(f"{k} {why}" for why, k in self.set_aside.most_common())
            text += f", {sum(self.set_aside.values()):,} set aside ({reasons})"
        return text


def held_out_bucket(messages: list[dict]) -> float:
    """A number in [0, 1) fixed by the prompt's text: held out when below the fraction."""
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def load_prompts(
    sources: list[str], tokenizer: Tokenizer, max_tokens: int, held_out_fraction: float
) -> Prompts:
    """Prompts of every source, those longer than max_tokens set aside, split by
    held_out_bucket. A source that does not exist is a UserError."""
    if not sources:
        raise UserError("no prompt data: set data = [files...] in the stage's recipe section")
    prompts = Prompts()
    for source in sources:
        for record in _records(source):
            try:
                messages, reference = _prompt_of(record)
            except BadRecord as e:
                prompts.set_aside[str(e)] += 1
                continue
            ids = tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
            if len(ids) > max_tokens:
                prompts.set_aside["too long"] += 1
                continue
            prompt = Prompt(messages, reference, ids)
            held = held_out_bucket(messages) < held_out_fraction
            (prompts.held_out if held else prompts.train).append(prompt)
    if not prompts.train:
        raise UserError(f"no usable prompts in {', '.join(sources)}: {prompts.describe()}")
    return prompts


def _records(source: str) -> Iterator[Any]:
    if source == "arithmetic" or source.startswith("arithmetic:"):
        limit = source.partition(":")[2] or "20"
        if not limit.isdigit():
            raise UserError(f"prompt source {source!r}: expected arithmetic or arithmetic:N")
        yield from arithmetic_problems(int(limit))
        return
    path = resolve(source)
    if not path.is_file():
        raise UserError(f"prompt file not found: {source}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if path.name.removesuffix(".gz").endswith(".json"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source} is not valid JSON ({e})") from None
        yield from records if isinstance(records, list) else [records]
        return
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None


def _check(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRecord("no messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS:
            raise BadRecord("unknown role")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise BadRecord("empty turn")
    return messages


def _prompt_of(record: Any) -> tuple[list[dict], str]:
    if record is None:
        raise BadRecord("not JSON")
    if not isinstance(record, dict):
        raise BadRecord("not an object")
    if "messages" in record:
        messages = _check(record["messages"])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        prompt, reference = (messages, "") if last is None else (messages[:last], messages[last])
        reference = reference["content"] if isinstance(reference, dict) else reference
    elif "prompt" in record:
        prompt, reference = _check(record["prompt"]), ""
    elif isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        prompt = _check([{"role": "user", "content": record["question"]}])
        reference = record["answer"]
    else:
        raise BadRecord("unknown layout")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise BadRecord("no prompt before the assistant turn")
    return prompt, reference
