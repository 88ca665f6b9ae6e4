"""Log-likelihoods of continuations, computed the way lm-evaluation-harness defines them, faster.

The harness scores each (context, continuation) pair as its own row: the context's trailing
spaces move to the continuation, the pair is encoded whole and split at the context's length,
and a pair longer than the model's context keeps its last max_len + 1 tokens. This module builds
exactly those token sequences, then computes them differently: the requests of one example
(its answer choices) share their common prefix, so each example becomes one tree, a shared
prefix followed by one branch per choice, whose tokens attend to the prefix and to their own
branch only, at the positions they would have alone. Trees of many examples are packed into
rows and scored in batches, so a shared context is computed once and rows hold no padding.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scratchlm.model import AttentionContext
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.device import Runtime

Encoder = Callable[[str], list[int]]
Pair = tuple[list[int], list[int]]
"""A request in tokens: (context ids, continuation ids)."""

# Logits of one forward pass are kept under this many elements (1 GiB in fp32).
MAX_LOGIT_ELEMENTS = 1 << 28


def text_encoder(tokenizer: Tokenizer) -> Encoder:
    """encode(text) that turns spelled-out special tokens into their ids (a chat prompt's
    <|user|> markers), as a Hugging Face tokenizer does; everything else is plain text."""
    specials = tokenizer.special_ids
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        at = 0
        for match in pattern.finditer(text):
            if match.start() > at:
                ids += tokenizer.encode(text[at : match.start()])
            ids.append(specials[match.group()])
            at = match.end()
        if at < len(text):
            ids += tokenizer.encode(text[at:])
        return ids

    return encode


def encode_pair(encode: Encoder, prefix_id: int, context: str, continuation: str) -> Pair:
    """The harness's tokens for one request. An empty context becomes the prefix token (bos);
    otherwise the whole text is encoded and split where the context's own tokens end."""
    if context == "":
        cont = encode(continuation)
        return ([prefix_id], cont) if cont[:1] != [prefix_id] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx) :]


def rolling_windows(tokens: list[int], prefix_id: int, max_len: int) -> list[Pair]:
    """A document scored in disjoint windows of up to max_len predicted tokens, each window
    conditioned on the max_len tokens before it (the first on the prefix token): the harness's
    loglikelihood_rolling with context_len=1."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix_id, *tokens[: first - 1]], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[max(0, end - max_len - 1) : end - 1], tokens[end - n : end]))
        done = end
    # Disjoint: a window's context drops the tokens it predicts itself (all but the first).
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


class TreeAttention(AttentionContext):
    """Attention inside packed trees: a token sees earlier tokens of its tree that are in the
    shared prefix or in its own branch. positions, segment and branch are [B, T]."""

    def __init__(self, positions: torch.Tensor, segment: torch.Tensor, branch: torch.Tensor):
        super().__init__(positions)
        T = segment.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
        same_tree = segment[:, :, None] == segment[:, None, :]
        visible_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        self.mask = (causal & same_tree & visible_branch)[:, None]

    def attend(self, layer, q, k, v):  # type: ignore[override]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, enable_gqa=q.shape[1] != k.shape[1]
        )


@dataclass
class _Tree:
    """Requests of one example laid out as their shared prefix and one branch per request."""

    example: int
    requests: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branch: list[int] = field(default_factory=list)
    reads: list[list[int]] = field(default_factory=list)
    """Per request: the tree indexes whose logits predict its continuation tokens."""
    targets: list[list[int]] = field(default_factory=list)


def _trees(example: int, requests: Sequence[Pair], max_len: int) -> list[_Tree]:
    """The example's requests as trees of at most max_len tokens (the model's limit on a row):
    usually one; more when the branches do not fit beside one copy of the prefix."""
    inputs = []
    # A continuation longer than the context window is scored on its last max_len tokens (the
    # harness's hf model refuses it outright).
    requests = [(ctx, cont[-max_len:]) for ctx, cont in requests]
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a request needs at least one continuation token")
        inputs.append((ctx + cont)[-(max_len + 1) : -1])
    shared = inputs[0]
    prefix = min(len(seq) for seq in inputs)
    for seq in inputs[1:]:
        prefix = next((i for i in range(prefix) if seq[i] != shared[i]), prefix)
    trees: list[_Tree] = []
    for number, (seq, (_, cont)) in enumerate(zip(inputs, requests, strict=True)):
        if not trees or len(trees[-1].tokens) + len(seq) - prefix > max_len:
            trees.append(_Tree(example, [], shared[:prefix], list(range(prefix)), [0] * prefix))
        tree = trees[-1]
        start = len(tree.tokens)
        tree.requests.append(number)
        tree.tokens += seq[prefix:]
        tree.positions += range(prefix, len(seq))
        tree.branch += [len(tree.requests)] * (len(seq) - prefix)
        first = len(seq) - len(cont)
        tree.reads.append([k if k < prefix else start + k - prefix for k in range(first, len(seq))])
        tree.targets.append(list(cont))
    return trees


def _pack(sizes: list[int], capacity: int) -> list[list[int]]:
    """Tree indexes grouped into rows of at most `capacity` tokens (best fit, largest first)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), kept sorted
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        at = bisect.bisect_left(free, (sizes[index], -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        room -= sizes[index]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


@torch.inference_mode()
def score_requests(
    model: torch.nn.Module,
    examples: Sequence[Sequence[Pair]],
    batch_rows: int,
    runtime: Runtime,
) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, whether greedy decoding gives the continuation) of every request, grouped
    by example as given."""
    max_len = model.config.max_seq_len
    trees = [t for e, requests in enumerate(examples) for t in _trees(e, requests, max_len)]
    sizes = [len(t.tokens) for t in trees]
    rows = sorted(_pack(sizes, max_len), key=lambda r: -sum(sizes[i] for i in r))
    totals: dict[tuple[int, int], list] = {}
    step = max(1, min(batch_rows, MAX_LOGIT_ELEMENTS // (max_len * model.config.vocab_size)))
    was_training = model.training
    model.eval()
    for first in range(0, len(rows), step):
        _score_batch(
            model, [[trees[i] for i in row] for row in rows[first : first + step]], runtime, totals
        )
    model.train(was_training)
    return [
        [(totals[(e, r)][0], totals[(e, r)][1]) for r in range(len(requests))]
        for e, requests in enumerate(examples)
    ]


def _score_batch(model, batch: list[list[_Tree]], runtime: Runtime, totals: dict) -> None:
    """One forward pass over rows of packed trees; adds each request's log-probabilities and
    greedy flags into totals[(example, request)]."""
    T = max(sum(len(tree.tokens) for tree in row) for row in batch)
    columns: dict[str, list[int]] = {"tokens": [], "positions": [], "segment": [], "branch": []}
    read_rows, read_cols, targets, owners = [], [], [], []
    for b, row in enumerate(batch):
        at = 0
        for number, tree in enumerate(row):
            columns["tokens"] += tree.tokens
            columns["positions"] += tree.positions
            columns["segment"] += [number] * len(tree.tokens)
            columns["branch"] += tree.branch
            for request, reads, cont in zip(tree.requests, tree.reads, tree.targets, strict=True):
                read_rows += [b] * len(reads)
                read_cols += [at + k for k in reads]
                targets += cont
                owners += [(tree.example, request)] * len(reads)
            at += len(tree.tokens)
        # Padding is a tree of its own (segment -1), so no row of the mask is empty.
        pad = T - at
        columns["tokens"] += [0] * pad
        columns["positions"] += [0] * pad
        columns["segment"] += [-1] * pad
        columns["branch"] += [0] * pad
    device = runtime.device
    tokens, positions, segment, branch = (
        torch.tensor(columns[k], dtype=torch.long).view(len(batch), T).to(device)
        for k in ("tokens", "positions", "segment", "branch")
    )
    with runtime.autocast():
        logits = model(tokens, context=TreeAttention(positions, segment, branch))
    picked = logits[torch.tensor(read_rows, device=device), torch.tensor(read_cols, device=device)]
    logprobs = F.log_softmax(picked.float(), dim=-1)
    target = torch.tensor(targets, device=device)
    chosen = logprobs.gather(1, target[:, None])[:, 0].tolist()
    greedy = (logprobs.argmax(-1) == target).tolist()
    for owner, logprob, hit in zip(owners, chosen, greedy, strict=True):
        entry = totals.setdefault(owner, [0.0, True])
        entry[0] += logprob
        entry[1] = entry[1] and hit


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample standard deviation over sqrt(n), as the harness has it."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1) / n)
