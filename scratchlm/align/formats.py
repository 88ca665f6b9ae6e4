"""The public chat and preference layouts, each turned into this project's two record forms.

    chat:        {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    preference:  {"prompt": messages, "chosen": messages, "rejected": messages}

A layout is recognised per record by its keys, so one file may mix layouts:

    messages                                  chat (OpenAI / this project)
    conversations [{from, value}]             ShareGPT chat
    instruction, input, output                Alpaca chat
    prompt, chosen, rejected                  preference (this project; strings are accepted too)
    instruction, input, chosen, rejected      rasbt's preference layout (LLMs-from-scratch ch. 7)
    conversations, chosen {from, value}, ...  LLaMA-Factory's ShareGPT preference layout
    chosen, rejected transcripts              HH-RLHF ("\\n\\nHuman: ... \\n\\nAssistant: ...")

A record that fits no layout, or whose messages break the rules (an unknown role, an empty turn, no
assistant turn), raises BadRecord with the reason; readers count it and set it aside.
"""

from __future__ import annotations

import math
import re
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")

# ShareGPT speaker names and the roles they stand for.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}

FLOAT32_MAX = 3.4028234663852886e38
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class BadRecord(ValueError):
    """A record that cannot be used; the message is the reason kept in the reject audit."""


def check_messages(messages: Any, what: str = "messages") -> list[Message]:
    """The messages as {"role", "content"} dicts, or BadRecord naming the first problem."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{what}: expected a non-empty list of messages")
    checked = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRecord(f"{what}: a message is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRecord(f"unknown role {role!r}")
        if not isinstance(content, str):
            raise BadRecord(f"{what}: a {role} message has no text content")
        if not content.strip():
            raise BadRecord(f"empty {role} turn")
        checked.append({"role": role, "content": content})
    return checked


def _sharegpt(turns: Any, what: str) -> list[Message]:
    if not isinstance(turns, list):
        turns = [turns]
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord(f"{what}: a turn is not an object")
        if "from" in turn:
            speaker = turn.get("from")
            role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
            if role is None:
                raise BadRecord(f"unknown role {speaker!r}")
            messages.append({"role": role, "content": turn.get("value")})
        else:
            messages.append(turn)
    return check_messages(messages, what)


def _text_turns(value: Any, role: str, what: str) -> list[Message]:
    """A message list, or a bare string taken as one message of `role`."""
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    return check_messages(value, what)


def _alpaca_prompt(record: dict) -> list[Message]:
    instruction, extra = record.get("instruction"), record.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(extra, str):
        raise BadRecord("instruction and input must be strings")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"]})
    return [*messages, {"role": "user", "content": user}]


def _hh_transcript(text: Any, what: str) -> list[Message]:
    if not isinstance(text, str) or not text.startswith("\n\nHuman:"):
        raise BadRecord(f"{what}: not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    parts = _HH_TURN.split(text)[1:]  # [speaker, text, speaker, text, ...]
    messages = [
        {"role": "user" if speaker == "Human" else "assistant", "content": body.strip()}
        for speaker, body in zip(parts[::2], parts[1::2], strict=True)
    ]
    return check_messages(messages, what)


def _split_prompt(chosen: list[Message], rejected: list[Message]) -> dict:
    """Two whole conversations that share a prompt, as a preference record."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) and shared == len(rejected):
        raise BadRecord("chosen and rejected are the same")
    # The responses start at the first assistant turn after the shared part.
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    return check_preference(
        {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    )


def check_chat(record: dict) -> dict:
    messages = check_messages(record.get("messages"))
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn")
    return {"messages": messages}


def check_preference(record: dict) -> dict:
    """A preference record whose prompt ends before an assistant turn, and whose two responses
    each start and end with one, and differ."""
    prompt = check_messages(record.get("prompt"), "prompt")
    if prompt[-1]["role"] == "assistant":
        raise BadRecord("prompt ends with an assistant turn")
    pair = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        response = check_messages(record.get(side), side)
        if response[0]["role"] != "assistant" or response[-1]["role"] != "assistant":
            raise BadRecord(f"no assistant turn: {side} must start and end with an assistant turn")
        pair[side] = response
    if pair["chosen"] == pair["rejected"]:
        raise BadRecord("chosen and rejected are the same")
    return pair


def to_preference(record: Any) -> dict:
    """Any supported preference layout as {"prompt", "chosen", "rejected"}; BadRecord if none."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    keys = record.keys()
    if "chosen" not in keys or "rejected" not in keys:
        raise BadRecord("not a preference record: needs chosen and rejected")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in keys:
        pair = check_preference(
            {
                "prompt": _text_turns(record["prompt"], "user", "prompt"),
                "chosen": _text_turns(chosen, "assistant", "chosen"),
                "rejected": _text_turns(rejected, "assistant", "rejected"),
            }
        )
        margin = record.get("margin")
        if isinstance(margin, (int, float)) and not isinstance(margin, bool):
            pair["margin"] = _finite(margin, "margin")  # how far apart the pair was rated (Llama 2)
        return pair
    if "conversations" in keys:  # LLaMA-Factory: the prompt in ShareGPT turns, one reply each
        return check_preference(
            {
                "prompt": _sharegpt(record["conversations"], "conversations"),
                "chosen": _sharegpt(chosen, "chosen"),
                "rejected": _sharegpt(rejected, "rejected"),
            }
        )
    if "instruction" in keys:
        return check_preference(
            {
                "prompt": _alpaca_prompt(record),
                "chosen": _text_turns(chosen, "assistant", "chosen"),
                "rejected": _text_turns(rejected, "assistant", "rejected"),
            }
        )
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _split_prompt(_hh_transcript(chosen, "chosen"), _hh_transcript(rejected, "rejected"))
    raise BadRecord("unrecognised preference layout")


def _finite(number: int | float, what: str) -> float:
    """The number as a float, or BadRecord unless it is finite in float32, the precision losses
    are computed in (1e300 would be an infinite loss)."""
    try:
        value = float(number)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise BadRecord(f"{what} must be a finite number, got {str(number)[:20]}")
    return value


def to_chat(record: Any) -> dict:
    """Any supported chat layout as {"messages"}. A preference record gives its chosen
    conversation (prompt + chosen), the usual way to fine-tune on preference data."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    if "messages" in record:
        return check_chat(record)
    if "chosen" in record and "rejected" in record:
        pair = to_preference(record)
        return check_chat({"messages": pair["prompt"] + pair["chosen"]})
    if "conversations" in record:
        return check_chat({"messages": _sharegpt(record["conversations"], "conversations")})
    if "instruction" in record and "output" in record:
        output = record["output"]
        if not isinstance(output, str):
            raise BadRecord("output must be a string")
        reply = {"role": "assistant", "content": output}
        return check_chat({"messages": [*_alpaca_prompt(record), reply]})
    raise BadRecord("unrecognised chat layout")
