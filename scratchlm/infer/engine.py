"""The batching engine: continuous batching over a paged KV cache.

Every use of a model for generation goes through this engine: `scratchlm generate`, `chat`,
`serve`, evaluation and the rollouts of PPO and GRPO.

Batch API (many prompts, each with its own settings; returns when all are done):

    from scratchlm.infer.engine import Engine
    from scratchlm.infer.sampling import SamplingParams

    engine = Engine(model, tokenizer)            # tokenizer: optional, for text and stop strings
    outs = engine.generate_batch(
        [prompt_ids_a, prompt_ids_b],
        [SamplingParams(max_tokens=64, temperature=1.0, seed=1, logprobs=0,
                        stop_token_ids=[tokenizer.end_id], include_stop_token=True),
         SamplingParams(max_tokens=8, temperature=0)],
    )
    outs[0].token_ids       # the new token ids
    outs[0].logprobs        # their log-probabilities under the model (logprobs=0 or more)
    outs[0].finish_reason   # "stop" (a stop token or string), "length" (max_tokens or context),
                            # "error" (its logits could not be sampled: NaN or inf)
    outs[0].text            # the decoded new text, cut before a stop string (with a tokenizer)

One SamplingParams applies to every prompt. Log-probabilities are those of the model's own
distribution (log_softmax of the logits, before temperature, top-k and top-p), computed in the same
forward pass that chose the token; the engine runs under torch.inference_mode, so they carry no
gradient (a PPO step recomputes them with gradients on the policy).

Streaming API: `engine.add(prompt_ids, params)` queues a request and returns it; each
`engine.step()` runs one forward pass and returns the requests that gained tokens or finished;
`engine.abort(request)` ends one early. `scratchlm.infer.runner.EngineThread` runs steps in a thread
for the server.

How a step is made (as in vLLM): requests wait in a first-come queue and join the running batch
between steps when a batch slot is free and the cache has room for their prompt plus max_tokens (the
room is reserved at admission, so a running request never runs out of cache and is never
preempted; a request that does not fit waits, it is never dropped). Each step feeds one token for
every decoding request, then fills the rest of the step's token budget with prompt chunks of
requests still being prefilled, so a long prompt enters in pieces while others keep decoding.
Finished requests leave at once and give their blocks back.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.errors import UserError
from scratchlm.infer.kv_cache import PagedKVCache, PagedStep, plan_step
from scratchlm.infer.sampling import SamplingParams, sample_rows, token_logprobs
from scratchlm.model import Transformer

DEFAULT_CACHE_BYTES = 2 << 30


@dataclass(eq=False)  # requests compare and hash by identity
class Request:
    """One generation: its prompt, settings and everything produced so far."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    finish_reason: str | None = None
    text: str = ""
    """The decoded new text (when the engine has a tokenizer), cut before a stop string."""
    on_update: Callable[[Request], None] | None = None
    # Engine state: tokens whose keys and values are cached, the blocks and their slots.
    cached: int = 0
    blocks: list[int] = field(default_factory=list)
    slots: torch.Tensor | None = None
    first_slot: int | None = None
    """Set when the request's blocks are consecutive in the pool (attention then slices)."""
    generator: torch.Generator | None = None
    # Incremental decoding: the text of token_ids[:read_offset], and where the tokens decoded
    # again each step begin (a few before read_offset, so that a word's leading space and a
    # character split across tokens come out as in a decode of everything).
    decoded: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids


class Engine:
    """Continuous batching over a paged KV cache for one model (see the module docstring).

    max_batch: requests decoding at once. cache_tokens: the KV cache's size in tokens (default:
    max_batch full contexts, at most 2 GiB). max_step_tokens: tokens per forward pass (decode
    tokens plus prompt chunks). Not thread-safe: one thread calls add, step and abort.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        max_batch: int = 32,
        cache_tokens: int | None = None,
        block_size: int = 16,
        max_step_tokens: int = 512,
    ) -> None:
        cfg = model.config
        if cfg.head != "lm":
            raise UserError("generation needs a language model; this checkpoint has a scalar head")
        if max_batch < 1 or max_step_tokens <= max_batch:
            raise UserError(
                f"max_batch ({max_batch}) must be >= 1 and below the tokens per step "
                f"({max_step_tokens})"
            )
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_step_tokens = max_batch, max_step_tokens
        self.context = cfg.max_seq_len
        weight = next(model.parameters())
        self.device = weight.device
        if cache_tokens is None:
            per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * weight.element_size()
            cache_tokens = min(max_batch * cfg.max_seq_len, DEFAULT_CACHE_BYTES // per_token)
            cache_tokens = max(cache_tokens, cfg.max_seq_len)
        self.cache = PagedKVCache(
            list(model.layers.keys()),
            num_blocks=-(-cache_tokens // block_size),
            block_size=block_size,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            device=self.device,
            dtype=weight.dtype,
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.steps = 0

    # -- requests --------------------------------------------------------------------------------

    def add(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        on_update: Callable[[Request], None] | None = None,
    ) -> Request:
        """Queue a request; it joins the batch at a coming step. Bad settings raise UserError."""
        request = self.make_request(prompt_ids, params, on_update)
        self.waiting.append(request)
        return request

    def make_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        on_update: Callable[[Request], None] | None = None,
    ) -> Request:
        """A checked request, not yet queued (this touches no engine state: any thread may call
        it)."""
        params = params or SamplingParams()
        params.check()
        prompt = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise UserError("generation needs a prompt of at least one token")
        if any(not 0 <= t < vocab for t in prompt):
            raise UserError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt) > self.context or (len(prompt) == self.context and params.max_tokens > 0):
            raise UserError(
                f"the prompt has {len(prompt)} tokens; the model's context is {self.context} tokens"
            )
        if self.cache.blocks_for(self._reserve(len(prompt), params)) > self.cache.num_blocks:
            raise UserError(
                f"the request needs more KV cache than the engine has "
                f"({self.cache.num_blocks * self.cache.block_size} tokens)"
            )
        request = Request(next(self._ids), prompt, params, on_update=on_update)
        if params.logprobs is not None:
            request.logprobs, request.top_logprobs = [], [] if params.logprobs else None
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] + [0.0] * (len(prompt) - 1)
            if params.prompt_logprobs:
                request.prompt_top_logprobs = [None] * len(prompt)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        request.generator = torch.Generator(device=self.device).manual_seed(seed)
        return request

    def abort(self, request: Request) -> None:
        """End a request now (finish_reason "abort") and give its cache blocks back."""
        if request.finished:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cache_usage(self) -> float:
        return 1.0 - self.cache.free_blocks / self.cache.num_blocks

    def _reserve(self, prompt_len: int, params: SamplingParams) -> int:
        return min(prompt_len + params.max_tokens, self.context)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting[0]
            need = self._reserve(len(request.prompt_ids), request.params)
            blocks = self.cache.blocks_for(need)
            if blocks > self.cache.free_blocks:
                return  # first come, first served: later requests wait behind this one
            self.waiting.popleft()
            request.blocks = self.cache.allocate(blocks)
            request.slots = self.cache.slot_table(request.blocks, need)
            first = request.blocks[0]
            if request.blocks == list(range(first, first + len(request.blocks))):
                request.first_slot = first * self.cache.block_size
            self.running.append(request)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        self.cache.release(request.blocks)
        request.slots = None
        if request in self.running:
            self.running.remove(request)

    # -- one step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One forward pass over the running batch; the requests that gained tokens or finished."""
        self._admit()
        decode = [r for r in self.running if r.cached == len(r.all_ids) - 1 and r.token_ids]
        budget = self.max_step_tokens - len(decode)
        prefill: list[tuple[Request, int]] = []
        for r in self.running:
            if budget <= 0:
                break
            left = len(r.prompt_ids) - r.cached
            if left > 0:
                prefill.append((r, min(left, budget)))
                budget -= prefill[-1][1]
        if not decode and not prefill:
            return []
        tokens, positions = [], []
        for r in decode:
            tokens.append(r.token_ids[-1])
            positions.append(r.cached)
        for r, length in prefill:
            tokens += r.prompt_ids[r.cached : r.cached + length]
            positions += range(r.cached, r.cached + length)
        plan = plan_step(
            [r.slots[: r.cached + 1] for r in decode],
            [(r.slots[: r.cached + length], r.cached) for r, length in prefill],
            [r.first_slot for r in decode] + [r.first_slot for r, _ in prefill],
        )
        # The output head runs only on rows whose logits are used: decode tokens, the last token
        # of a prompt (its first new token) and the prompts being scored.
        rows = list(range(len(decode)))
        row = len(decode)
        for r, length in prefill:
            if r.prompt_logprobs is not None:
                rows += range(row, row + length)
            elif r.cached + length == len(r.prompt_ids):
                rows.append(row + length - 1)
            row += length
        at = {n: i for i, n in enumerate(rows)}
        device = self.device
        token_tensor = torch.tensor(tokens, device=device).view(-1, 1)
        position_tensor = torch.tensor(positions, device=device).view(-1, 1)
        context = PagedStep(self.cache, plan, position_tensor)
        row_tensor = None if len(rows) == len(tokens) else torch.tensor(rows, device=device)
        logits = self.model(token_tensor, context=context, outputs_at=row_tensor)
        logits = logits[:, 0] if row_tensor is None else logits
        self.steps += 1

        sampling: list[tuple[Request, int]] = [(r, i) for i, r in enumerate(decode)]
        row = len(decode)
        for r, length in prefill:
            if r.prompt_logprobs is not None:
                self._score_prompt(r, logits[at[row] : at[row] + length])
            r.cached += length
            row += length
            if r.cached == len(r.prompt_ids):
                if r.params.max_tokens == 0:
                    self._finish(r, "length")
                else:
                    sampling.append((r, at[row - 1]))
        for r in decode:
            r.cached += 1
        self._sample(logits, sampling)
        updated = [r for r, _ in sampling] + [r for r, _ in prefill if r.finished]
        for r in dict.fromkeys(updated):
            if r.on_update is not None:
                r.on_update(r)
        return updated

    def _score_prompt(self, r: Request, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens that these chunk rows predict."""
        start = r.cached
        targets = r.prompt_ids[start + 1 : start + 1 + len(logits)]
        if not targets:
            return
        chosen, top = token_logprobs(
            logits[: len(targets)],
            torch.tensor(targets, device=logits.device),
            r.params.prompt_logprobs or 0,
        )
        r.prompt_logprobs[start + 1 : start + 1 + len(targets)] = chosen
        if top is not None:
            r.prompt_top_logprobs[start + 1 : start + 1 + len(targets)] = top

    def _sample(self, logits: torch.Tensor, sampling: list[tuple[Request, int]]) -> None:
        if not sampling:
            return
        rows = logits[[i for _, i in sampling]] if len(sampling) < len(logits) else logits
        requests = [r for r, _ in sampling]
        chosen = sample_rows(rows, [r.params for r in requests], [r.generator for r in requests])
        # A request whose logits could not be sampled ends alone; its neighbours go on.
        for r, token in zip(requests, chosen, strict=True):
            if token is None:
                self._finish(r, "error")
        wants = [i for i, r in enumerate(requests) if r.logprobs is not None and not r.finished]
        if wants:
            top = max(requests[i].params.logprobs for i in wants)
            lp, alternatives = token_logprobs(
                rows[wants], torch.tensor([chosen[i] for i in wants], device=rows.device), top
            )
            for j, i in enumerate(wants):
                requests[i].logprobs.append(lp[j])
                if requests[i].top_logprobs is not None:
                    requests[i].top_logprobs.append(alternatives[j][: requests[i].params.logprobs])
        for r, token in zip(requests, chosen, strict=True):
            if token is not None:
                self._append(r, token)

    def _append(self, r: Request, token: int) -> None:
        params = r.params
        if token in params.stop_token_ids:
            if params.include_stop_token:
                r.token_ids.append(token)  # r.text is unchanged: stop tokens are special
            elif r.logprobs is not None:  # the stop token is not output: neither its logprob
                r.logprobs.pop()
                if r.top_logprobs is not None:
                    r.top_logprobs.pop()
            self._finish(r, "stop")
            return
        r.token_ids.append(token)
        if self.tokenizer is not None:
            # Other threads may read r.text at any time: it only ever holds text to show.
            text = self._decode(r)
            cuts = [i for i in (text.find(stop) for stop in params.stop) if i >= 0]
            r.text = text[: min(cuts)] if cuts else text
            if cuts:
                self._finish(r, "stop")
                return
        if len(r.token_ids) >= params.max_tokens or len(r.all_ids) >= self.context:
            self._finish(r, "length")

    def _decode(self, r: Request) -> str:
        """tokenizer.decode(r.token_ids, skip_special=True), from the tokens since the prefix
        offset only (vLLM's incremental detokenization): a step costs the same at the thousandth
        token as at the first. The offsets move on once the new text ends in whole characters."""
        decode = self.tokenizer.decode
        ids = r.token_ids
        prefix = decode(ids[r.prefix_offset : r.read_offset], skip_special=True)
        text = decode(ids[r.prefix_offset :], skip_special=True)
        if not text.startswith(prefix):  # not a decoder that extends its text: decode it all
            return decode(ids, skip_special=True)
        if text.endswith("\ufffd"):  # a character still missing bytes: keep decoding from here
            return r.decoded + text[len(prefix) :]
        r.decoded += text[len(prefix) :]
        r.prefix_offset, r.read_offset = r.read_offset, len(ids)
        return r.decoded

    # -- whole generations -----------------------------------------------------------------------

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Request]:
        """Run every prompt to the end; the finished requests, in the order of the prompts."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        requests = [self.add(p, s) for p, s in zip(prompts, params, strict=True)]
        try:
            while not all(r.finished for r in requests):
                self.step()
        finally:
            for r in requests:
                self.abort(r)
        return requests

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """The new token ids of one request, as they are sampled (the engine runs only it)."""
        request = self.add(prompt_ids, params)
        try:
            done = 0
            while not request.finished or done < len(request.token_ids):
                if done == len(request.token_ids):
                    self.step()
                    continue
                done += 1
                yield request.token_ids[done - 1]
        finally:
            self.abort(request)
