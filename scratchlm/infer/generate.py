"""Token-by-token generation with a KV cache: greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from scratchlm.errors import UserError
from scratchlm.model import Transformer


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with everything below the k-th largest (ties kept) set to -inf; k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p.

    The most likely token is always kept; p >= 1 keeps all.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # A token is dropped when the tokens before it already reach p.
    drop_sorted = probs.cumsum(-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from the last position's logits [V]; temperature 0 is greedy."""
    if temperature == 0:
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def _next_logits(
    model: Transformer, ids: list[int], cache: object | None, start_pos: int
) -> torch.Tensor:
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    return model(tokens, cache, start_pos)[0, -1]


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
    if not prompt_ids:
        raise UserError("generation needs a prompt of at least one token")
    context = model.config.max_seq_len
    if len(prompt_ids) >= context:
        raise UserError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {context} tokens"
        )
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    stop = set(stop_ids)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ids = list(prompt_ids)
    cache = model.new_cache(batch_size=1) if use_cache else None
    logits = _next_logits(model, ids, cache, 0)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if token in stop:
            return
        yield token
        ids.append(token)
        if len(ids) >= context:
            return
        if cache is not None:
            logits = _next_logits(model, [token], cache, len(ids) - 1)
        else:
            logits = _next_logits(model, ids, None, 0)
