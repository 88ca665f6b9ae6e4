"""Greedy generation until a stop string: the one place evaluation calls the decoder.

Every prompt goes to scratchlm.infer's batching engine at once (continuous batching over a paged
KV cache); the harness adapter's generate_until and the GSM8K task both come through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scratchlm.infer.engine import Engine
from scratchlm.infer.sampling import SamplingParams
from scratchlm.tokenizer import Tokenizer


def generation_budget(max_seq_len: int, max_gen_toks: int) -> int:
    """New tokens allowed: max_gen_toks, at most half the model's context so that the prompt keeps
    the other half (the harness refuses max_gen_toks >= max_length outright)."""
    return min(max_gen_toks, max(1, max_seq_len // 2))


def generate_until(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    until: Sequence[str],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int = 32,
) -> list[str]:
    """The greedy continuation of each prompt (left-truncated to leave room for max_new_tokens),
    decoded without special tokens and cut before the first stop string."""
    if not prompts:
        return []
    room = model.config.max_seq_len - max_new_tokens
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=0.0,
        stop=tuple(s for s in until if s),
        stop_token_ids=tuple(stop_ids),
    )
    engine = Engine(model, tokenizer, max_batch=max(1, min(batch_size, len(prompts))))
    finished = engine.generate_batch([list(p[-room:]) for p in prompts], params)
    return [request.text for request in finished]
