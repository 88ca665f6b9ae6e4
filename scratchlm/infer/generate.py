"""Token-by-token generation of one prompt: greedy, temperature, top-k and top-p sampling.

`generate` runs on the batching engine (scratchlm.infer.engine) with a cache sized for one
request; many prompts at once go through `Engine.generate_batch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from scratchlm.infer.engine import Engine
from scratchlm.infer.sampling import SamplingParams, sample_next, top_k_filter, top_p_filter
from scratchlm.model import Transformer

__all__ = ["generate", "sample_next", "top_k_filter", "top_p_filter"]


def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time.

    Stops after max_new_tokens, at a token in stop_ids (which is not yielded), or when the
    model's context (max_seq_len) is full. use_cache=False recomputes the whole sequence each
    step (slow; it exists to check the cache).
    """
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_token_ids=tuple(stop_ids),
    )
    if not use_cache:
        return _generate_uncached(model, list(prompt_ids), params)
    engine = Engine(model, max_batch=1, cache_tokens=model.config.max_seq_len)
    return engine.stream(prompt_ids, params)


def _generate_uncached(model: Transformer, ids: list[int], params: SamplingParams) -> Iterator[int]:
    # The engine checks the prompt and the settings the same way for both paths.
    Engine(model, max_batch=1, cache_tokens=model.config.max_seq_len).add(ids, params)
    context = model.config.max_seq_len
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device)
        generator.manual_seed(params.seed)
    for _ in range(params.max_tokens):
        with torch.inference_mode():
            tokens = torch.tensor([ids], device=next(model.parameters()).device)
            logits = model(tokens)[0, -1]
        token = sample_next(logits, params.temperature, params.top_k, params.top_p, generator)
        if token in params.stop_token_ids:
            return
        yield token
        ids.append(token)
        if len(ids) >= context:
            return
