"""Chats and preference pairs as token rows: the length rule, padding and packing.

The length rule: a record whose tokens exceed the stage's max_seq_len loses its oldest exchanges
(a user turn and the assistant's reply; a leading system message stays) while that leaves a
complete conversation, with truncation = "drop_oldest_turns"; with "none", or when even the last
exchange is too long, it is set aside as too long.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scratchlm.align.data import Dataset, Reject
from scratchlm.align.formats import BadRecord, Message
from scratchlm.align.losses import IGNORE
from scratchlm.tokenizer import Tokenizer

TRUNCATION_RULES = ("drop_oldest_turns", "none")


def _without_oldest_exchange(messages: list[Message], keep_last_user: bool) -> list[Message] | None:
    """The messages less their first user turn and what follows it up to the next user turn;
    None when nothing may go (the last exchange, or the prompt's last user turn, must stay)."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    users = [i for i in range(start, len(messages)) if messages[i]["role"] == "user"]
    if len(users) < 2:
        return None
    shorter = messages[:start] + messages[users[1] :]
    if not keep_last_user and not any(m["role"] == "assistant" for m in shorter):
        return None
    return shorter


def fit_chat(
    tokenizer: Tokenizer, messages: list[Message], max_len: int, truncation: str
) -> tuple[list[int], list[int]]:
    """Token ids and assistant mask of a chat within max_len tokens, or BadRecord."""
    while True:
        ids, mask = tokenizer.encode_chat(messages)
        if len(ids) <= max_len:
            return ids, mask
        shorter = None
        if truncation == "drop_oldest_turns":
            shorter = _without_oldest_exchange(messages, keep_last_user=False)
        if shorter is None:
            raise BadRecord(f"longer than max_seq_len ({len(ids)} tokens > {max_len})")
        messages = shorter


@dataclass
class EncodedPair:
    """One preference pair as tokens: prompt + chosen and prompt + rejected, sharing the first
    prompt_len tokens. The response tokens are those from prompt_len on."""

    chosen: list[int]
    rejected: list[int]
    prompt_len: int
    margin: float | None = None
    """The pair's own Bradley-Terry margin, when its record carries one."""


def fit_pair(tokenizer: Tokenizer, pair: dict, max_len: int, truncation: str) -> EncodedPair:
    """The pair within max_len tokens on both sides (the prompt shortened by the rule), or
    BadRecord."""
    prompt = pair["prompt"]
    while True:
        prompt_ids, _ = tokenizer.encode_chat(prompt)
        chosen, _ = tokenizer.encode_chat(prompt + pair["chosen"])
        rejected, _ = tokenizer.encode_chat(prompt + pair["rejected"])
        longest = max(len(chosen), len(rejected))
        if longest <= max_len:
            return EncodedPair(chosen, rejected, len(prompt_ids))
        shorter = None
        if truncation == "drop_oldest_turns":
            shorter = _without_oldest_exchange(prompt, keep_last_user=True)
        if shorter is None:
            raise BadRecord(f"longer than max_seq_len ({longest} tokens > {max_len})")
        prompt = shorter


def encode_all(
    dataset: Dataset, fit: Callable[[dict], Any], records: list[dict] | None = None
) -> tuple[list[Any], list[Reject]]:
    """fit(record) for each record; those it refuses become rejects (sources from the dataset)."""
    records = dataset.records if records is None else records
    source_of = {id(r): s for r, s in zip(dataset.records, dataset.sources, strict=True)}
    encoded, rejects = [], []
    for record in records:
        try:
            encoded.append(fit(record))
        except BadRecord as e:
            rejects.append(Reject(source_of.get(id(record), "?"), str(e), record))
    return encoded, rejects


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token rows [B, T] (T the longest row) and each row's length [B]."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens, torch.tensor([len(r) for r in rows], dtype=torch.long)


def response_mask(lengths: torch.Tensor, prompt_lens: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] true at the targets that are response tokens: target t is token t + 1, so
    targets prompt_len - 1 .. length - 2."""
    t = torch.arange(width).unsqueeze(0)
    return (t >= prompt_lens.unsqueeze(1) - 1) & (t < lengths.unsqueeze(1) - 1)


def pair_batch(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded [2B, T] batch, with lengths and prompt
    lengths: one forward pass scores both sides."""
    tokens, lengths = pad_rows([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    prompt_lens = torch.tensor([p.prompt_len for p in pairs] * 2, dtype=torch.long)
    return {"tokens": tokens, "lengths": lengths, "prompt_lens": prompt_lens}


# -- packing for SFT ------------------------------------------------------------------------------


def pack_chats(
    chats: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Chats (ids, assistant mask) packed first-fit into rows of seq_len inputs.

    A chat of n tokens takes n - 1 places: inputs ids[:-1], targets ids[1:] where the target is
    an assistant token (IGNORE elsewhere). Each chat is a segment of its row, so attention stays
    inside it and its positions start at 0 (model(tokens, segment_ids=...)). Returns tokens,
    targets and segments [rows, seq_len]; padding is a segment of its own with IGNORE targets.
    """
    rows: list[list[int]] = []  # indices of the chats in each row
    room: list[int] = []
    for index, (ids, _) in enumerate(chats):
        need = len(ids) - 1
        if need > seq_len:
            raise ValueError(f"a chat of {len(ids)} tokens does not fit rows of {seq_len} inputs")
        slot = next((r for r, free in enumerate(room) if free >= need), None)
        if slot is None:
            rows.append([])
            room.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(index)
        room[slot] -= need
    tokens = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    segments = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for segment, index in enumerate(members):
            ids, mask = chats[index]
            n = len(ids) - 1
            tokens[r, at : at + n] = torch.tensor(ids[:-1])
            target = torch.tensor(ids[1:])
            targets[r, at : at + n] = target.masked_fill(
                ~torch.tensor(mask[1:], dtype=bool), IGNORE
            )
            segments[r, at : at + n] = segment
            at += n
        segments[r, at:] = len(members)
    return {"tokens": tokens, "targets": targets, "segments": segments}


class PackedChatLoader:
    """Rows of packed chats, a global step of `rows_per_step` at a time (this rank's share).

    Each epoch shuffles the chats with (seed, epoch) and packs them anew; the state (epoch, row)
    is saved with checkpoints, so a resumed run sees the same rows."""

    def __init__(
        self,
        chats: list[tuple[list[int], list[int]]],
        seq_len: int,
        pad_id: int,
        rows_per_step: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        self.chats, self.seq_len, self.pad_id = chats, seq_len, pad_id
        self.rows_per_step, self.seed = rows_per_step, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.row = 0, 0
        self._packed: dict[str, torch.Tensor] | None = None

    def _epoch_rows(self) -> dict[str, torch.Tensor]:
        if self._packed is None:
            order = list(range(len(self.chats)))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            chats = [self.chats[i] for i in order]
            self._packed = pack_chats(chats, self.seq_len, self.pad_id)
        return self._packed

    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows()["tokens"])

    def next_batch(self) -> dict[str, torch.Tensor]:
        parts: list[dict[str, torch.Tensor]] = []
        need = self.rows_per_step
        while need:
            packed = self._epoch_rows()
            take = min(need, len(packed["tokens"]) - self.row)
            parts.append({k: v[self.row : self.row + take] for k, v in packed.items()})
            self.row += take
            need -= take
            if self.row == len(packed["tokens"]):
                self.epoch, self.row, self._packed = self.epoch + 1, 0, None
        step = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        share = self.rows_per_step // self.dp_size
        return {k: v[self.dp_rank * share : (self.dp_rank + 1) * share] for k, v in step.items()}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.row, self._packed = state["epoch"], state["row"], None


class PairLoader:
    """Preference pairs, a global step of `pairs_per_step` at a time (this rank's share), in an
    order shuffled anew each epoch from (seed, epoch); resumable like PackedChatLoader."""

    def __init__(
        self,
        pairs: list[Any],
        pairs_per_step: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        self.pairs, self.pairs_per_step, self.seed = pairs, pairs_per_step, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.position = 0, 0
        self._shuffled: tuple[int, list[int]] | None = None

    def _order(self) -> list[int]:
        if self._shuffled is None or self._shuffled[0] != self.epoch:
            order = list(range(len(self.pairs)))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._shuffled = (self.epoch, order)
        return self._shuffled[1]

    def next_indices(self) -> list[int]:
        """Indices (into pairs) of this rank's share of the next step."""
        chosen: list[int] = []
        while len(chosen) < self.pairs_per_step:
            order = self._order()
            take = min(self.pairs_per_step - len(chosen), len(order) - self.position)
            chosen += order[self.position : self.position + take]
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        share = self.pairs_per_step // self.dp_size
        return chosen[self.dp_rank * share : (self.dp_rank + 1) * share]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
