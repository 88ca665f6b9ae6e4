"""Rollouts: responses sampled for a batch of prompts, and the rows PPO and GRPO train on.

`sample_batch` is the one function that generates; it runs the batching engine
(scratchlm.infer.engine: continuous batching over a paged KV cache), every prompt with its own
seed. Log-probabilities are not taken from the sampler: the trained policy scores prompt +
response in a separate forward (`score_rows`), as the loss sees them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from scratchlm.align.batches import pad_rows, response_mask
from scratchlm.align.losses import token_logprobs
from scratchlm.infer.engine import Engine
from scratchlm.infer.sampling import SamplingParams
from scratchlm.model import Transformer


class NonFiniteLogits(RuntimeError):
    """The policy produced NaN or infinite logits while sampling."""


@dataclass
class Sample:
    tokens: list[int]
    """The new token ids, ending with the stop token when finish is "stop"."""
    finish: str
    """"stop" (a stop token came) or "length" (max_new_tokens or the context ran out)."""


def sample_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Iterable[int] = (),
) -> list[Sample]:
    """Sample a response to each prompt (token ids), all of them in one engine.

    temperature 0 is greedy. A response stops at a token of stop_ids (kept as its last token),
    after max_new_tokens, or when prompt + response fill the model's context. Prompt i is sampled
    with seed + i, so the same seed gives the same samples however the prompts are batched.
    Raises NonFiniteLogits when the model's logits are NaN or infinite.
    """
    engine = Engine(model, max_batch=len(prompts), max_step_tokens=max(512, 4 * len(prompts)))
    stop = list(stop_ids)
    params = [
        SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed + i,
            stop_token_ids=stop,
            include_stop_token=True,
        )
        for i in range(len(prompts))
    ]
    requests = engine.generate_batch(prompts, params)
    # The engine ends a request whose logits cannot be sampled (NaN or infinite) with "error".
    broken = sum(r.finish_reason == "error" for r in requests)
    if broken:
        raise NonFiniteLogits(
            f"the policy's logits are NaN or infinite for {broken} of {len(requests)} prompts"
        )
    return [Sample(list(r.token_ids), r.finish_reason) for r in requests]


@dataclass
class Rows:
    """Prompt + response rows, right-padded, cut into what a causal model reads and predicts."""

    inputs: torch.Tensor
    """[B, L - 1] token ids (the row without its last token)."""
    targets: torch.Tensor
    """[B, L - 1] the next token at each input position."""
    mask: torch.Tensor
    """[B, L - 1] 1 where the target is a response token: the actions PPO and GRPO score."""
    last: torch.Tensor
    """[B] the index (in targets) of each response's last token."""


def build_rows(
    prompts: list[list[int]], responses: list[list[int]], device: torch.device, pad_id: int = 0
) -> Rows:
    """Rows of prompt + response; every response must hold at least one token."""
    tokens, lengths = pad_rows([p + r for p, r in zip(prompts, responses, strict=True)], pad_id)
    prompt_lens = torch.tensor([len(p) for p in prompts])
    mask = response_mask(lengths, prompt_lens, tokens.shape[1] - 1).float()
    tokens, mask, lengths = tokens.to(device), mask.to(device), lengths.to(device)
    return Rows(tokens[:, :-1], tokens[:, 1:], mask, lengths - 2)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of each position's next-token distribution, [B, T], in fp32."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def score_rows(model: Transformer, rows: Rows, micro_batch: int, values: bool = False):
    """Per-token log-probabilities of the targets (an lm head) or the values at the inputs (a
    scalar head, values=True), [B, T], a micro-batch at a time and without gradient."""
    parts = []
    for start in range(0, rows.inputs.shape[0], micro_batch):
        part = slice(start, start + micro_batch)
        out = model(rows.inputs[part])
        parts.append(out.float() if values else token_logprobs(out, rows.targets[part]))
    return torch.cat(parts)
