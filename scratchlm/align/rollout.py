"""Rollouts: responses sampled for a batch of prompts, and the rows PPO and GRPO train on.

`sample_batch` is the one function that generates. It decodes every prompt of the batch at once
on the model's contiguous KV cache: prompts are left-padded to one length, each row has its own
positions, and padding is masked out of attention. Log-probabilities are not taken from the
sampler: the trained policy scores prompt + response in a separate forward (`score_rows`),
as the loss sees them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from scratchlm.align.batches import pad_rows, response_mask
from scratchlm.align.losses import token_logprobs
from scratchlm.infer.generate import top_k_filter, top_p_filter
from scratchlm.model import AttentionContext, KVCache, Transformer


class NonFiniteLogits(RuntimeError):
    """The policy produced NaN or infinite logits while sampling."""


@dataclass
class Sample:
    tokens: list[int]
    """The new token ids, ending with the stop token when finish is "stop"."""
    finish: str
    """"stop" (a stop token came) or "length" (max_new_tokens or the context ran out)."""


class _LeftPaddedStep(AttentionContext):
    """Writes this step's keys and values into the cache and attends over the cache so far.
    Row b's first pad[b] slots are padding: its positions count from the first real token and
    its queries never see the padding (a padding query sees only itself, so no row is empty)."""

    def __init__(self, cache: KVCache, pad: torch.Tensor, start: int, length: int) -> None:
        index = torch.arange(start, start + length, device=pad.device)
        super().__init__((index[None, :] - pad[:, None]).clamp(min=0))
        keys = torch.arange(start + length, device=pad.device)
        causal = keys[None, :] <= index[:, None]
        visible = (keys[None, None, :] >= pad[:, None, None]) | (keys[None, :] == index[:, None])
        self.mask = (causal & visible)[:, None]  # [B, 1, T, S]
        self.cache, self.start = cache, start

    def attend(self, layer, q, k, v):  # type: ignore[override]
        end = self.start + k.shape[2]
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[:, :, self.start : end] = k
        values[:, :, self.start : end] = v
        return torch.nn.functional.scaled_dot_product_attention(
            q,
            keys[:, :, :end],
            values[:, :, :end],
            attn_mask=self.mask,
            enable_gqa=q.shape[1] != k.shape[1],
        )


def _choose(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.inference_mode()
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
    """Sample a response to each prompt (token ids), all rows decoding together.

    temperature 0 is greedy. A row stops at a token of stop_ids (kept as its last token), after
    max_new_tokens, or when the model's context is full. The same seed gives the same samples.
    Raises NonFiniteLogits when the model's logits are NaN or infinite.
    """
    device = next(model.parameters()).device
    B, longest = len(prompts), max(len(p) for p in prompts)
    # Prompt + response stay within the context, so that every model can score them.
    budget = min(max_new_tokens, model.config.max_seq_len - longest)
    if budget <= 0:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the model's context")
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, longest, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    cache = model.new_cache(B, longest + budget)
    new = torch.zeros(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    position = 0
    while True:
        logits = model(tokens, context=_LeftPaddedStep(cache, pad, position, tokens.shape[1]))
        last = logits[:, -1].float()
        if not torch.isfinite(last[~done]).all():
            raise NonFiniteLogits("the policy's logits are NaN or infinite")
        position += tokens.shape[1]
        choice = _choose(last, temperature, top_k, top_p, generator)
        choice = torch.where(done, torch.zeros_like(choice), choice)
        new = torch.cat([new, choice[:, None]], dim=1)
        lengths += (~done).long()
        hit = torch.isin(choice, stop) & ~done
        stopped |= hit
        done |= hit
        if bool(done.all()) or new.shape[1] >= budget:
            break
        tokens = choice[:, None]
    rows = new.tolist()
    return [
        Sample(rows[b][: int(lengths[b])], "stop" if bool(stopped[b]) else "length")
        for b in range(B)
    ]


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
