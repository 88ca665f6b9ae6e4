"""Per-request sampling settings and how a token is chosen from logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.errors import UserError

MAX_TOP_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (as vLLM's do): float32 logits divided by 1e-39
overflow to inf, and softmax then gives NaN."""


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops.

    temperature 0 (or below MIN_TEMPERATURE) is greedy. top_k 0 and top_p 1 keep every token.
    Generation stops after max_tokens new tokens, at a token of stop_token_ids (not part of the
    output unless include_stop_token), at the first occurrence of a string of `stop` in the decoded
    text (the text is cut before it), or when the model's context is full.

    logprobs: None for none, 0 for each new token's log-probability under the model (before
    temperature and filtering), k > 0 for that and the k most likely alternatives. prompt_logprobs
    does the same for the prompt's tokens (the first has none): scoring a text is a request with
    max_tokens=0 and prompt_logprobs=0.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    include_stop_token: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def check(self) -> None:
        if self.max_tokens < 0:
            raise UserError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise UserError(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {value}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise UserError(f"seed must be between -2**63 and 2**64 - 1, got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError("stop strings must be non-empty strings")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with everything below the k-th largest (ties kept) set to -inf; k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p.

    The most likely token is always kept (even when p, as float32, is 0); p >= 1 keeps all.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # A token is dropped when the tokens before it already reach p.
    drop_sorted = probs.cumsum(-1) - probs >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from the last position's logits [V]; a temperature below MIN_TEMPERATURE is
    greedy."""
    if temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int | None]:
    """One token per row of logits [R, V], each row with its own settings and generator.

    Greedy rows share one argmax; a sampled row draws from its own generator, so its tokens do not
    depend on which other requests share the step. A row whose draw fails (NaN or inf in its
    logits) gets None, and the other rows their tokens as if it were not there.
    """
    greedy = [i for i, p in enumerate(params) if p.temperature < MIN_TEMPERATURE]
    tokens: list[int | None] = [0] * len(params)
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, token in zip(greedy, rows.argmax(-1).tolist(), strict=True):
            tokens[i] = token
    for i, p in enumerate(params):
        if p.temperature >= MIN_TEMPERATURE:
            try:
                tokens[i] = sample_next(logits[i], p.temperature, p.top_k, p.top_p, generators[i])
            except RuntimeError:  # torch.multinomial refuses a distribution with NaN or inf
                tokens[i] = None
    return tokens


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, top: int
) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
    """Log-probabilities of targets [R] under logits [R, V], and the `top` most likely
    (token, log-probability) pairs of each row when top > 0."""
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
    if top <= 0:
        return chosen, None
    values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    pairs = [
        list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    return chosen, pairs
