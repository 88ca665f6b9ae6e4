"""A paged KV cache: one pool of fixed-size blocks shared by every running request.

Each layer's keys and values live in a pool of `num_blocks * block_size` slots, [slots, kv_heads,
head_dim]. A request owns a list of blocks (its block table); token i of the request sits in slot
`table[i // block_size] * block_size + i % block_size`. Blocks are handed out whole and returned
whole, so requests of any length share the pool without fragmentation, and the pool's size is the
engine's token budget.

`PagedStep` is the model's `AttentionContext` for one engine step. The step's tokens are packed one
per batch row ([N, 1]: the model then applies its matmuls to all N at once and needs no padding):
first one token for each decoding request, then the prompt chunks being prefilled. Inside
`attend` the new keys and values are written into their slots, decode tokens attend together over
their requests' cached keys (gathered and padded to the longest, with a mask), and each prefill
chunk attends over its own request's cache with a causal offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from scratchlm.model import AttentionContext


class PagedKVCache:
    """Per-layer key and value pools and the free list of blocks."""

    def __init__(
        self,
        layer_names: list[str],
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, n_kv_heads, head_dim)
        self.keys = {n: torch.zeros(shape, device=device, dtype=dtype) for n in layer_names}
        self.values = {n: torch.zeros(shape, device=device, dtype=dtype) for n in layer_names}
        self.device = device
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()

    def slot_table(self, blocks: list[int], length: int) -> torch.Tensor:
        """Slot index of each of the first `length` tokens of a request owning `blocks`."""
        pos = torch.arange(length, device=self.device)
        table = torch.tensor(blocks, dtype=torch.long, device=self.device)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


@dataclass
class StepPlan:
    """What one engine step computes: decode tokens first, then prefill chunks."""

    slot_mapping: torch.Tensor  # [N] where each new token's key and value go
    decode_slots: torch.Tensor | None  # [D, longest] slots of each decoding request's context
    decode_mask: torch.Tensor | None  # [D, 1, 1, longest] additive, or None when nothing is padded
    chunk_slots: list[torch.Tensor]  # per chunk: slots of its context, cached + new
    chunks: list[tuple[int, int]]  # per chunk: (tokens already cached, chunk length)
    decode_start: int | None = None
    """The first slot of a lone decoding request whose slots are consecutive: its context is
    then a slice of the pool, not a gather."""
    chunk_starts: list[int | None] | None = None


def plan_step(
    decode: list[torch.Tensor],
    prefill: list[tuple[torch.Tensor, int]],
    first_slots: list[int | None] | None = None,
) -> StepPlan:
    """decode: the slots of each decoding request's context, its new token last;
    prefill: the slots of each chunk's context (cached tokens, then the chunk) and the number of
    tokens already cached; first_slots: for each decoding request then each chunk, its first
    slot when all its slots are consecutive, else None."""
    first_slots = first_slots or [None] * (len(decode) + len(prefill))
    new_slots = []
    decode_slots = decode_mask = None
    if decode:
        new_slots += [slots[-1:] for slots in decode]
        if len(decode) == 1:
            decode_slots = decode[0].unsqueeze(0)
        else:
            decode_slots = pad_sequence(decode, batch_first=True)
            lengths = torch.tensor([len(s) for s in decode], device=decode_slots.device)
            if int(lengths.min()) != decode_slots.shape[1]:
                # Additive: SDPA would convert a boolean mask at every layer's call.
                padded = (
                    torch.arange(decode_slots.shape[1], device=lengths.device) >= lengths[:, None]
                )
                decode_mask = torch.zeros(padded.shape, device=padded.device).masked_fill(
                    padded, float("-inf")
                )[:, None, None, :]
    for slots, cached in prefill:
        new_slots.append(slots[cached:])
    return StepPlan(
        slot_mapping=new_slots[0] if len(new_slots) == 1 else torch.cat(new_slots),
        decode_slots=decode_slots,
        decode_mask=decode_mask,
        chunk_slots=[slots for slots, _ in prefill],
        chunks=[(cached, len(slots) - cached) for slots, cached in prefill],
        decode_start=first_slots[0] if len(decode) == 1 else None,
        chunk_starts=first_slots[len(decode) :],
    )


class PagedStep(AttentionContext):
    """The attention context of one engine step over a paged cache (see the module docstring)."""

    def __init__(self, cache: PagedKVCache, plan: StepPlan, positions: torch.Tensor) -> None:
        super().__init__(positions)  # [N, 1]: one token per row
        self.cache, self.plan = cache, plan

    def attend(self, layer, q, k, v):  # type: ignore[override]
        plan = self.plan
        pool_k, pool_v = self.cache.keys[layer], self.cache.values[layer]
        pool_k.index_copy_(0, plan.slot_mapping, k[:, :, 0])
        pool_v.index_copy_(0, plan.slot_mapping, v[:, :, 0])
        gqa = q.shape[1] != k.shape[1]
        outputs = []
        n_decode = 0
        if plan.decode_slots is not None:
            n_decode, longest = plan.decode_slots.shape
            if plan.decode_start is not None:
                keys = pool_k[plan.decode_start : plan.decode_start + longest].unsqueeze(0)
                values = pool_v[plan.decode_start : plan.decode_start + longest].unsqueeze(0)
            else:
                idx = plan.decode_slots.view(-1)
                keys = pool_k.index_select(0, idx).view(n_decode, longest, *pool_k.shape[1:])
                values = pool_v.index_select(0, idx).view(n_decode, longest, *pool_v.shape[1:])
            # One query per request: the query heads that share a key/value head attend as that
            # head's queries ([D, kv heads, heads per kv head, head_dim]), which spares SDPA the
            # expansion of the keys and values to every query head (a quarter to a half faster).
            n_kv = keys.shape[2]
            grouped = q[:n_decode].reshape(n_decode, n_kv, -1, q.shape[-1])
            mask = plan.decode_mask
            if mask is not None and mask.dtype != q.dtype:  # bf16 queries want a bf16 mask
                mask = mask.to(q.dtype)
            out = F.scaled_dot_product_attention(
                grouped, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask
            )
            outputs.append(out.reshape(n_decode, -1, 1, q.shape[-1]))
        start = n_decode
        for (cached, length), slots, first in zip(
            plan.chunks, plan.chunk_slots, plan.chunk_starts, strict=True
        ):
            chunk_q = q[start : start + length, :, 0].transpose(0, 1).unsqueeze(0)
            if first is not None:
                keys = pool_k[first : first + len(slots)].transpose(0, 1).unsqueeze(0)
                values = pool_v[first : first + len(slots)].transpose(0, 1).unsqueeze(0)
            else:
                keys = pool_k.index_select(0, slots).transpose(0, 1).unsqueeze(0)
                values = pool_v.index_select(0, slots).transpose(0, 1).unsqueeze(0)
            mask = None
            if cached > 0 and length > 1:  # causal, shifted by the tokens already cached
                pos = torch.arange(cached + length, device=q.device)
                mask = pos[None, :] <= pos[cached:, None]
            out = F.scaled_dot_product_attention(
                chunk_q,
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None and length > 1,
                enable_gqa=gqa,
            )
            outputs.append(out[0].transpose(0, 1).unsqueeze(2))
            start += length
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
