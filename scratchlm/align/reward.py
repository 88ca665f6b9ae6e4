"""The reward model: the SFT model with a scalar head, trained on preference pairs.

The reward of a (prompt, response) is the scalar head's value at the last token of
`tokenizer.encode_chat(prompt + [{"role": "assistant", "content": response}])`: the <|end|> that
closes the response, after the model has read all of it.
"""

from __future__ import annotations

import torch


def score(reward_model: torch.nn.Module, token_rows: torch.Tensor, lengths: torch.Tensor):
    """Rewards [B] of right-padded token rows [B, T] (each starting with <|bos|> at position 0,
    ending with the response's <|end|> at lengths - 1): the scalar head read at lengths - 1.
    Padding after a row's end does not change its reward (attention is causal)."""
    values = reward_model(token_rows)  # [B, T]
    return values.gather(1, (lengths.to(values.device) - 1).unsqueeze(1)).squeeze(1)
