"""Log-likelihoods of continuations, computed the way lm-evaluation-harness defines them, faster.

The harness scores each (context, continuation) pair as its own row: the context's trailing
spaces move to the continuation, the pair is encoded whole and split at the context's length,
and a pair longer than the model's context keeps its last max_len + 1 tokens. This module builds
exactly those token sequences, then computes them differently. The input sequences go into a
token trie, so a prefix that several requests share (an example's context before its answer
choices, a few-shot preamble that examples share) is computed once: each trie node is one token,
placed at its depth as position and attending to its ancestors only, which is what it would see
in a row of its own. Tries of up to max_len tokens are packed into rows, longest first, and
scored in batches, so rows hold almost no padding.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from scratchlm.device import Runtime
from scratchlm.model import AttentionContext
from scratchlm.tokenizer import Tokenizer

Pair = tuple[list[int], list[int]]
"""A request in tokens: (context ids, continuation ids)."""

# Logits of one forward pass are kept under this many elements (1 GiB in fp32).
MAX_LOGIT_ELEMENTS = 1 << 28
# Examples laid out into tries at a time: bounds the memory of a large task.
EXAMPLES_PER_CHUNK = 2048


class TextEncoder:
    """encode(text) that turns spelled-out special tokens into their ids (a chat prompt's
    <|user|> markers), as a Hugging Face tokenizer does; everything else is plain text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.specials = tokenizer.special_ids
        by_length = sorted(self.specials, key=len, reverse=True)
        self.pattern = re.compile("|".join(re.escape(t) for t in by_length))

    def __call__(self, text: str) -> list[int]:
        ids: list[int] = []
        at = 0
        for match in self.pattern.finditer(text):
            if match.start() > at:
                ids += self.tokenizer.encode(text[at : match.start()])
            ids.append(self.specials[match.group()])
            at = match.end()
        if at < len(text):
            ids += self.tokenizer.encode(text[at:])
        return ids

    def many(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text encoded; those without special tokens in batch calls (of 1,024: the
        tokenizer's encodings of a whole task at once would take gigabytes)."""
        plain = [i for i, t in enumerate(texts) if not self.pattern.search(t)]
        out: list[list[int]] = [[] for _ in texts]
        for first in range(0, len(plain), 1024):
            part = plain[first : first + 1024]
            for i, ids in zip(
                part, self.tokenizer.encode_batch([texts[i] for i in part]), strict=True
            ):
                out[i] = ids
        for i in set(range(len(texts))) - set(plain):
            out[i] = self(texts[i])
        return out


def encode_pairs(
    encode: TextEncoder,
    prefix_id: int,
    examples: Sequence[Sequence[tuple[str, str]]],
    keep_tokens: int | None = None,
) -> list[list[Pair]]:
    """The harness's tokens for each (context, continuation) request. An empty context becomes
    the prefix token (bos); otherwise the trailing spaces of the context move to the
    continuation, the whole text is encoded and split where the context's own tokens end.

    With keep_tokens (the most tokens a request is read back to, max_len + 1) and a tokenizer
    that splits at line starts (`Tokenizer.splits_at_line_starts`), the same tokens come from
    less encoding: a context far longer than keep_tokens is encoded from a line start near its
    end (its last tokens are the same; the front is left out), and the continuation is split off
    an encoding of the context's last line rather than of the whole text. A few-shot prompt many
    times the model's context then costs only the part that is read."""
    split = []
    for requests in examples:
        for context, continuation in requests:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            split.append((context, continuation))
    starts = [0] * len(split)  # where the encoding of each context starts
    lines = [0] * len(split)  # where the encodings that split off its continuation start
    if keep_tokens and encode.tokenizer.splits_at_line_starts:
        reach = keep_tokens * CHARS_PER_KEPT_TOKEN
        for i, (context, _) in enumerate(split):
            lines[i] = _line_start_before(context, len(context))
            if len(context) > reach:
                starts[i] = _line_start_before(context, len(context) - reach)
    ids = _encode_texts(encode, split, starts, lines)
    # A start that left fewer than keep_tokens context tokens (long tokens) is undone.
    short = [
        i for i, (c, _) in enumerate(split) if starts[i] and len(ids[c[starts[i] :]]) < keep_tokens
    ]
    for i in short:
        starts[i] = 0
    ids |= _encode_texts(encode, [split[i] for i in short], [0] * len(short), [None] * len(short))
    pairs: list[Pair] = []
    for (context, continuation), start, line in zip(split, starts, lines, strict=True):
        if not context:
            cont = ids[continuation]
            pairs.append(([prefix_id], cont) if cont[:1] != [prefix_id] else (cont[:1], cont[1:]))
        else:
            last_line = ids[context[line:]]
            cont = ids[(context + continuation)[line:]][len(last_line) :]
            pairs.append((ids[context[start:]], cont))
    out, at = [], 0
    for requests in examples:
        out.append(pairs[at : at + len(requests)])
        at += len(requests)
    return out


# A long context is encoded from a line start about this many characters per kept token before
# its end (BPE tokens of English text average 3-4 characters; too short a start is undone).
CHARS_PER_KEPT_TOKEN = 4


def _line_start_before(text: str, at: int) -> int:
    """The last index <= at that starts a line with a letter (0 when there is none)."""
    newline = text.rfind("\n", 0, at)
    while newline >= 0:
        if text[newline + 1 : newline + 2].isalpha():
            return newline + 1
        newline = text.rfind("\n", 0, newline)
    return 0


def _encode_texts(
    encode: TextEncoder,
    split: list[tuple[str, str]],
    starts: list[int],
    lines: list[int | None],
) -> dict[str, list[int]]:
    """Token ids of each request's context from its start and, unless its line is None, of its
    context and of context + continuation from that line (the continuation alone when the
    context is empty)."""
    texts = set()
    for (context, continuation), start, line in zip(split, starts, lines, strict=True):
        if not context:
            texts.add(continuation)
            continue
        texts.add(context[start:])
        if line is not None:
            texts |= {context[line:], (context + continuation)[line:]}
    ordered = sorted(texts)
    return dict(zip(ordered, encode.many(ordered), strict=True))


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
    """Attention inside packed tries laid out in depth-first order: a token sees the tokens of
    its own path from the root. With `end` [B, T] the index just past each token's subtree,
    token j is on token i's path exactly when j <= i < end[j]."""

    def __init__(self, positions: torch.Tensor, end: torch.Tensor):
        super().__init__(positions)
        index = torch.arange(end.shape[1], device=end.device)
        visible = (index[None, None, :] <= index[None, :, None]) & (
            index[None, :, None] < end[:, None, :]
        )
        # An additive float mask, made once for all layers: SDPA on CPU runs it faster than a
        # boolean one, which it converts at every call.
        self.mask = torch.zeros(visible.shape, device=end.device).masked_fill(
            ~visible, float("-inf")
        )[:, None]

    def attend(self, layer, q, k, v):  # type: ignore[override]
        if self.mask.dtype != q.dtype:  # bf16 under autocast: the mask must match the queries
            self.mask = self.mask.to(q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, enable_gqa=q.shape[1] != k.shape[1]
        )


class _Trie:
    """Input sequences of requests merged on common prefixes (kept to a row's length by
    _tries). Node 0 is the root; node k > 0 is tokens[k - 1]."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.child: dict[tuple[int, int], int] = {}  # (node, token) -> node
        self.owners: list[tuple[int, int]] = []  # (example, request) of each path
        self.paths: list[list[int]] = []
        self.targets: list[list[int]] = []
        self._last_seq: list[int] = []

    def new_nodes(self, seqs: list[list[int]]) -> int:
        """How many nodes adding these sequences would create."""
        created: dict[tuple[int, int], int] = {}  # (parent, token) -> a new node's stand-in id
        for seq in dict.fromkeys(map(tuple, seqs)):  # choices often share their whole input
            node = 0
            for token in seq:
                child = self.child.get((node, token)) if node >= 0 else None
                if child is None:
                    child = created.setdefault((node, token), -1 - len(created))
                node = child
        return len(created)

    def add(self, owner: tuple[int, int], seq: list[int], target: list[int]) -> None:
        if self.paths and len(seq) == len(self.paths[-1]) and self._last_seq == seq:
            self.owners.append(owner)  # the previous request's input again: the same path
            self.paths.append(self.paths[-1])
            self.targets.append(target)
            return
        self._last_seq = seq
        node, path = 0, []
        for token in seq:
            child = self.child.get((node, token))
            if child is None:
                self.tokens.append(token)
                child = self.child[(node, token)] = len(self.tokens)
            path.append(child)
            node = child
        self.owners.append(owner)
        self.paths.append(path)
        self.targets.append(target)

    def layout(self) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        """Depth-first order: tokens, positions (depths), subtree ends, and per path the
        indexes of its nodes in that order."""
        children: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for (parent, _), node in self.child.items():  # insertion order: first seen first
            children[parent].append(node)
        order = [0] * (len(self.tokens) + 1)
        tokens, positions, ends = [], [], []
        stack = [(child, 0) for child in reversed(children[0])]
        opened: list[int] = []
        while stack:
            node, depth = stack.pop()
            while opened and positions[opened[-1]] >= depth:
                ends[opened.pop()] = len(tokens)
            order[node] = len(tokens)
            opened.append(len(tokens))
            tokens.append(self.tokens[node - 1])
            positions.append(depth)
            ends.append(0)
            stack += [(child, depth + 1) for child in reversed(children[node])]
        for index in opened:
            ends[index] = len(tokens)
        return tokens, positions, ends, [[order[n] for n in path] for path in self.paths]


def _input(
    context: list[int], continuation: list[int], max_len: int
) -> tuple[list[int], list[int]]:
    """The row the harness scores: (context + continuation) cut to its last max_len + 1 tokens,
    less the last; a continuation longer than the window is scored on its last max_len tokens
    (the harness's hf model refuses it outright)."""
    continuation = continuation[-max_len:]
    if not continuation:
        raise ValueError("a request needs at least one continuation token")
    return (context + continuation)[-(max_len + 1) : -1], continuation


def _tries(inputs: list[list[tuple[list[int], list[int]]]], capacity: int) -> list[_Trie]:
    """Every request's (input, target) in a trie of at most `capacity` tokens, examples taken in
    the order given (sorted, shared prefixes meet)."""
    tries = [_Trie()]
    for example, requests in enumerate(inputs):
        seqs = [seq for seq, _ in requests]
        if len(tries[-1].tokens) + tries[-1].new_nodes(seqs) > capacity:
            tries.append(_Trie())
        trie = tries[-1]
        if len(trie.tokens) + trie.new_nodes(seqs) > capacity:
            # The example's requests do not fit in one trie together: they spill over.
            for request, (seq, target) in enumerate(requests):
                if trie.tokens and len(trie.tokens) + trie.new_nodes([seq]) > capacity:
                    trie = _Trie()
                    tries.append(trie)
                trie.add((example, request), seq, target)
            continue
        for request, (seq, target) in enumerate(requests):
            trie.add((example, request), seq, target)
    return [t for t in tries if t.paths]


def _row_length(inputs: list[list[tuple[list[int], list[int]]]], max_len: int) -> int:
    """Rows as short as the largest example allows (a power of two from 32 up to max_len):
    attention over a row costs its length per token, so short examples pack into short rows."""
    largest = max(_Trie().new_nodes([seq for seq, _ in requests]) for requests in inputs)
    return min(max_len, 1 << max(5, (largest - 1).bit_length()))


def _pack(sizes: list[int], capacity: int) -> list[list[int]]:
    """Trie indexes grouped into rows of at most `capacity` tokens (best fit, largest first)."""
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
    greedy: bool = True,
) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, whether greedy decoding gives the continuation) of every request, grouped
    by example as given. With greedy=False the second is always False and not computed (an
    argmax over the vocabulary at every scored position)."""
    if not examples:
        return []
    max_len = model.config.max_seq_len
    inputs = [[_input(c, x, max_len) for c, x in requests] for requests in examples]
    length = _row_length(inputs, max_len)
    # batch_rows counts rows of max_len tokens: shorter rows come more to a batch.
    rows_per_batch = batch_rows * max_len // length
    step = max(1, min(rows_per_batch, MAX_LOGIT_ELEMENTS // (length * model.config.vocab_size)))
    order = sorted(range(len(inputs)), key=lambda e: [seq for seq, _ in inputs[e]])
    totals: dict[tuple[int, int], list] = {}
    was_training = model.training
    model.eval()
    # Examples in sorted chunks, so the tries of a large task are never all in memory at once.
    for first in range(0, len(order), EXAMPLES_PER_CHUNK):
        chunk = order[first : first + EXAMPLES_PER_CHUNK]
        tries = _tries([inputs[e] for e in chunk], length)
        for trie in tries:  # owners are numbered within the chunk
            trie.owners = [(chunk[e], r) for e, r in trie.owners]
        sizes = [len(t.tokens) for t in tries]
        rows = sorted(_pack(sizes, length), key=lambda r: -sum(sizes[i] for i in r))
        for at in range(0, len(rows), step):
            batch = [[tries[i] for i in row] for row in rows[at : at + step]]
            _score_batch(model, batch, runtime, totals, greedy)
    model.train(was_training)
    return [
        [(totals[(e, r)][0], totals[(e, r)][1]) for r in range(len(requests))]
        for e, requests in enumerate(examples)
    ]


def _score_batch(
    model, batch: list[list[_Trie]], runtime: Runtime, totals: dict, greedy_flags: bool
) -> None:
    """One forward pass over rows of packed tries; adds each request's log-probabilities and
    greedy flags into totals[(example, request)]."""
    T = max(sum(len(trie.tokens) for trie in row) for row in batch)
    columns: dict[str, list[int]] = {"tokens": [], "positions": [], "end": []}
    read_rows, read_cols, targets, owners = [], [], [], []
    for b, row in enumerate(batch):
        at = 0
        for trie in row:
            tokens, positions, ends, paths = trie.layout()
            columns["tokens"] += tokens
            columns["positions"] += positions
            columns["end"] += [at + e for e in ends]
            for owner, path, target in zip(trie.owners, paths, trie.targets, strict=True):
                # The last len(target) inputs of the path predict the continuation's tokens.
                reads = path[len(path) - len(target) :]
                read_rows += [b] * len(reads)
                read_cols += [at + k for k in reads]
                targets += target
                owners += [owner] * len(reads)
            at += len(tokens)
        # Padding tokens see only themselves, so no row of the mask is empty.
        columns["tokens"] += [0] * (T - at)
        columns["positions"] += [0] * (T - at)
        columns["end"] += range(at + 1, T + 1)
    device = runtime.device
    tokens, positions, end = (
        torch.tensor(columns[k], dtype=torch.long).view(len(batch), T).to(device)
        for k in ("tokens", "positions", "end")
    )
    reads = torch.tensor(read_rows, device=device) * T + torch.tensor(read_cols, device=device)
    needed, which = torch.unique(reads, return_inverse=True)
    with runtime.autocast(), _output_at(model, needed) as selected:
        logits = model(tokens, context=TreeAttention(positions, end))
    # One row of logits per position read (a position may predict for several requests).
    unique = (logits if selected[0] else logits.flatten(0, 1)[needed]).float()
    target = torch.tensor(targets, device=device)
    # One fused log-softmax pass: on CPU it is faster than logsumexp's max, exp and sum passes.
    chosen = torch.log_softmax(unique, -1)[which, target].tolist()
    if greedy_flags:
        greedy = (unique.argmax(-1)[which] == target).tolist()
    else:
        greedy = [False] * len(chosen)
    for owner, logprob, hit in zip(owners, chosen, greedy, strict=True):
        entry = totals.setdefault(owner, [0.0, True])
        entry[0] += logprob
        entry[1] = entry[1] and hit


@contextlib.contextmanager
def _output_at(model: torch.nn.Module, flat_positions: torch.Tensor) -> Iterator[list[bool]]:
    """Within the block, the model's output head computes only these positions (of [B * T]);
    the block's value [flag] says, once the forward ran, whether it did. Most positions of a row
    predict nothing that is scored, and the head over the vocabulary is a fifth of a small
    model's work. It applies to a plain language-model head on plain tensors (not, say, a
    tensor-parallel one), and the model is left as it was."""
    head = getattr(model, "output", None)
    selected = [False]

    def keep_positions(module, args):
        (hidden,) = args
        if type(hidden) is not torch.Tensor or hidden.dim() != 3:
            return None
        selected[0] = True
        return (hidden.flatten(0, 1)[flat_positions],)

    if not isinstance(head, torch.nn.Linear) or model.config.head != "lm":
        yield selected
        return
    handle = head.register_forward_pre_hook(keep_positions)
    try:
        yield selected
    finally:
        handle.remove()


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample standard deviation over sqrt(n), as the harness has it."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1) / n)
