"""Verifiable tasks: problems made together with their answers, and reward functions that check an
answer, for GRPO (and PPO against a rule instead of a reward model).

A reward function is named in the recipe as `module:function` (`grpo.reward_fn`) and called once
per response as `fn(prompt, response, reference) -> float`: `prompt` is the conversation the
policy answered (a list of {"role", "content"}), `response` the answer's text and `reference`
the record's own answer (its last assistant turn, or GSM8K's `answer`).
"""

from __future__ import annotations

import importlib
import math
import numbers
import random
import re
from collections.abc import Callable

from scratchlm.errors import UserError

RewardFn = Callable[[list[dict], str, str], float]

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: the number after the last `####` (GSM8K's
    convention), else the last number in the text; None when there is no number. Thousands
    separators and a fractional part of zeros are dropped, so "1,000.00" and "1000" match."""
    marked = _FINAL.findall(text)
    numbers = marked or _NUMBER.findall(text)
    if not numbers:
        return None
    number = numbers[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number == "-0" else number


def answer_match(prompt: list[dict], response: str, reference: str) -> float:
    """1 when the response's final answer equals the reference's (extract_answer), else 0."""
    answer = extract_answer(response)
    return float(answer is not None and answer == extract_answer(reference))


def arithmetic_problems(max_operand: int = 20, seed: int = 0) -> list[dict]:
    """Every `a + b =` and `a - b =` with 0 <= a, b <= max_operand as chat records whose
    assistant turn is the answer, shuffled by `seed`: a task a tiny model can learn."""
    records = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            for op, value in (("+", a + b), ("-", a - b)):
                records.append(
                    {
                        "messages": [
                            {"role": "user", "content": f"{a} {op} {b} ="},
                            {"role": "assistant", "content": str(value)},
                        ]
                    }
                )
    random.Random(seed).shuffle(records)
    return records


def load_reward_fn(spec: str, key: str) -> RewardFn:
    """The function a recipe names as `module:function`; a UserError naming `key` otherwise."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"{key} = {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any failure inside the user's module is theirs to fix
        raise UserError(f"{key} = {spec!r}: cannot import {module_name} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{key} = {spec!r}: {module_name} has no function {name}")
    return fn


def call_reward(fn: RewardFn, spec: str, prompt: list[dict], response: str, reference: str):
    """fn's reward as a float (NaN is returned: the rollout is then skipped); a function that
    raises or returns something else than a number is a UserError."""
    try:
        value = fn(prompt, response, reference)
    except Exception as e:
        raise UserError(
            f"reward function {spec} raised {type(e).__name__}: {e} (on the response "
            f"{response[:60]!r})"
        ) from None
    if not isinstance(value, numbers.Real):
        raise UserError(f"reward function {spec} returned {value!r:.40}; expected a number")
    value = float(value)
    return value if not math.isinf(value) else math.nan
