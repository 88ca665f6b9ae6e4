"""Validation loss and bits-per-byte.

Bits-per-byte divides the summed loss (in bits) by the UTF-8 bytes of the predicted tokens, so it
compares models with different tokenizers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scratchlm.device import Runtime
from scratchlm.shards import iter_eval_batches


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    tokens_dir: Path,
    token_bytes: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    runtime: Runtime,
    split: str = "val",
) -> dict[str, float]:
    """Mean loss (nats per token) and bits per byte over the first max_tokens of a split."""
    was_training = model.training
    model.eval()
    bytes_of = torch.as_tensor(token_bytes, dtype=torch.int64, device=runtime.device)
    total_nats = 0.0
    total_tokens = 0
    bpb_nats = 0.0
    bpb_bytes = 0
    for x, y in iter_eval_batches(tokens_dir, split, seq_len, batch_size, max_tokens):
        x, y = x.to(runtime.device), y.to(runtime.device)
        with runtime.autocast():
            logits = model(x)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        target_bytes = bytes_of[y.flatten()]
        total_nats += float(nats.sum())
        total_tokens += y.numel()
        # As nanochat does, special-token targets (the eos between documents) have no bytes and
        # are left out of bits-per-byte entirely.
        bpb_nats += float((nats * (target_bytes > 0)).sum())
        bpb_bytes += int(target_bytes.sum())
    model.train(was_training)
    if total_tokens == 0:
        return {"val_loss": float("nan"), "val_bpb": float("nan")}
    return {
        "val_loss": total_nats / total_tokens,
        "val_bpb": bpb_nats / math.log(2) / max(1, bpb_bytes),
    }
