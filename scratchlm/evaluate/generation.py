"""Greedy generation until a stop string: the one place evaluation calls the decoder.

It runs scratchlm.infer.generate's token loop with its KV cache, one prompt at a time; the
harness adapter's generate_until and the GSM8K task both come through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scratchlm.infer.generate import generate
from scratchlm.tokenizer import Tokenizer


def generation_budget(max_seq_len: int, max_gen_toks: int) -> int:
    """New tokens allowed: max_gen_toks, at most half the model's context so that the prompt keeps
    the other half (the harness refuses max_gen_toks >= max_length outright)."""
    return min(max_gen_toks, max(1, max_seq_len // 2))


def generate_until(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    until: Sequence[str],
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> str:
    """The greedy continuation of prompt_ids (left-truncated to leave room for max_new_tokens),
    decoded without special tokens and cut before the first stop string."""
    room = model.config.max_seq_len - max_new_tokens
    prompt = prompt_ids[-room:]
    new: list[int] = []
    stops = [s for s in until if s]
    for token in generate(model, prompt, max_new_tokens, temperature=0.0, stop_ids=stop_ids):
        new.append(token)
        if stops and any(s in tokenizer.decode(new[-32:], skip_special=True) for s in stops):
            break
    text = tokenizer.decode(new, skip_special=True)
    for stop in stops:
        text = text.split(stop)[0]
    return text
