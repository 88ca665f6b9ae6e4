"""Sampling with a KV cache: temperature, top-k, top-p, seed, stop tokens; one token at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with all but the k largest set to -inf (k <= 0 keeps everything)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach p; the top one always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row of logits [B, V]; greedy when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield new token ids one by one. The prompt fills the KV cache in one forward pass; each new
    token then costs one position. Stops at a stop token (not yielded) or the model's context."""
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    max_len = model.config.max_seq_len
    prompt = list(prompt_ids)[-max_len:]
    budget = min(max_new_tokens, max_len - len(prompt))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    cache = model.new_cache(batch_size=1, max_seq_len=len(prompt) + max(budget, 0))
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    pos = 0
    for _ in range(budget):
        logits = model(tokens, cache=cache, start_pos=pos)[:, -1, :]
        pos += tokens.shape[1]
        next_id = sample_next(logits, temperature, top_k, top_p, generator)
        token = int(next_id.item())
        if token in stop_ids:
            return
        yield token
        tokens = next_id.view(1, 1)
