"""One API call's engine requests, seen from the event loop: waiting, streaming, response bodies.

The engine thread calls back after each step that changed a request; the callback only wakes the
event loop, which then reads the request's state (finish_reason first, so that a finished request
is always read whole).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator

from fastapi import Request as HttpRequest

from scratchlm.infer.engine import Request
from scratchlm.infer.runner import EngineThread
from scratchlm.infer.sampling import SamplingParams
from scratchlm.infer.stream import streamable_text
from scratchlm.serve import responses as out
from scratchlm.tokenizer import Tokenizer

DISCONNECT_POLL_SECONDS = 0.5


class _LoopWaker:
    """Hands (queue, index) pairs from the engine thread to an event loop, waking the loop once
    for all the requests one engine step changed rather than once per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, int]] = []

    def __call__(self, queue: asyncio.Queue, index: int) -> None:
        with self._lock:
            self._pending.append((queue, index))
            if len(self._pending) > 1:
                return  # a flush is already on its way
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, index in pending:
            queue.put_nowait(index)


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = (
    weakref.WeakKeyDictionary()
)


class Generation:
    def __init__(self, runner: EngineThread, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.runner, self.tokenizer, self.stops = runner, tokenizer, stops
        self.requests: list[Request] = []
        self.prompt_texts: list[str | None] = []
        self.prompt_tokens = 0
        loop = asyncio.get_running_loop()
        if loop not in _wakers:
            _wakers[loop] = _LoopWaker(loop)
        self._waker = _wakers[loop]
        self._changed: asyncio.Queue[int] = asyncio.Queue()
        self._checked_at = time.monotonic()

    def submit(self, ids: list[int], params: dict, prompt_text: str | None) -> None:
        index = len(self.requests)

        def wake(_: Request) -> None:
            self._waker(self._changed, index)

        if not self.requests or self.requests[-1].prompt_ids != ids:
            self.prompt_tokens += len(ids)
        self.requests.append(self.runner.submit(ids, SamplingParams(**params), wake))
        self.prompt_texts.append(prompt_text)

    def cancel(self) -> None:
        for r in self.requests:
            if not r.finished:
                self.runner.cancel(r)

    async def _next_change(self, http: HttpRequest) -> int | None:
        """The index of a request that changed; None when the client has gone away.

        The client is checked every DISCONNECT_POLL_SECONDS even while tokens keep coming: a
        client that waits for a whole answer and hangs up must not hold its slot to the end."""
        while True:
            if time.monotonic() - self._checked_at >= DISCONNECT_POLL_SECONDS:
                self._checked_at = time.monotonic()
                if await http.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self._changed.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                continue

    async def wait(self, http: HttpRequest) -> bool:
        """Until every request is done: True, or False when the client went away first."""
        try:
            while not all(r.finished for r in self.requests):
                if await self._next_change(http) is None:
                    return False
        finally:
            self.cancel()
        return True

    # -- whole responses -------------------------------------------------------------------------

    def completion_body(self, model: str, echo: bool) -> dict:
        choices = []
        for i, (r, prompt_text) in enumerate(zip(self.requests, self.prompt_texts, strict=True)):
            shown_prompt = prompt_text
            if shown_prompt is None:
                shown_prompt = self.tokenizer.decode(r.prompt_ids, skip_special=True)
            logprobs = None
            if r.logprobs is not None:
                logprobs = out.completion_logprobs(self.tokenizer, r, echo)
            choices.append(
                {
                    "index": i,
                    "text": (shown_prompt if echo else "") + r.text,
                    "logprobs": logprobs,
                    "finish_reason": r.finish_reason,
                }
            )
        body = out.base("text_completion", out.new_id("cmpl"), model)
        return body | {"choices": choices, "usage": out.usage(self.prompt_tokens, self.requests)}

    def chat_body(self, model: str) -> dict:
        choices = []
        for i, r in enumerate(self.requests):
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": out.chat_logprobs(self.tokenizer, r)
                    if r.logprobs is not None
                    else None,
                    "finish_reason": r.finish_reason,
                }
            )
        body = out.base("chat.completion", out.new_id("chatcmpl"), model)
        return body | {"choices": choices, "usage": out.usage(self.prompt_tokens, self.requests)}

    # -- streams ---------------------------------------------------------------------------------

    async def _deltas(self, http: HttpRequest) -> AsyncIterator[tuple[int, str, int, str | None]]:
        """(choice, new text, tokens so far, finish reason or None) as the requests advance."""
        sent = [0] * len(self.requests)
        done = [False] * len(self.requests)
        try:
            while not all(done):
                index = await self._next_change(http)
                if index is None:
                    return
                if done[index]:
                    continue
                r = self.requests[index]
                reason = r.finish_reason
                text = streamable_text(r.text, self.stops, reason is not None)
                if len(text) > sent[index] or reason is not None:
                    yield index, text[sent[index] :], len(r.token_ids), reason
                    sent[index] = max(sent[index], len(text))
                if reason is not None:
                    done[index] = True
        finally:
            self.cancel()

    async def stream_chat(self, http: HttpRequest, model: str, include_usage: bool):
        body = out.base("chat.completion.chunk", out.new_id("chatcmpl"), model)
        extra = {"usage": None} if include_usage else {}
        for i in range(len(self.requests)):
            delta = {"role": "assistant", "content": ""}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
            yield out.sse(body | {"choices": [choice]} | extra)
        tokens_sent = [0] * len(self.requests)
        async for index, text, n_tokens, reason in self._deltas(http):
            r = self.requests[index]
            if reason == "error":
                yield out.sse(out.error_body("the engine failed while generating", "server_error"))
                break
            logprobs = None
            if r.logprobs is not None:
                logprobs = out.chat_logprobs(self.tokenizer, r, tokens_sent[index], n_tokens)
                tokens_sent[index] = n_tokens
            if text or logprobs:
                choice = {
                    "index": index,
                    "delta": {"content": text},
                    "logprobs": logprobs,
                    "finish_reason": None,
                }
                yield out.sse(body | {"choices": [choice]} | extra)
            if reason is not None:
                choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
                yield out.sse(body | {"choices": [choice]} | extra)
        else:
            if include_usage:
                yield out.sse(
                    body | {"choices": [], "usage": out.usage(self.prompt_tokens, self.requests)}
                )
            yield out.sse("[DONE]")

    async def stream_completion(self, http: HttpRequest, model: str, echo: bool):
        body = out.base("text_completion", out.new_id("cmpl"), model)
        if echo:
            for i, (r, text) in enumerate(zip(self.requests, self.prompt_texts, strict=True)):
                shown = (
                    text
                    if text is not None
                    else self.tokenizer.decode(r.prompt_ids, skip_special=True)
                )
                choice = {"index": i, "text": shown, "logprobs": None, "finish_reason": None}
                yield out.sse(body | {"choices": [choice]})
        async for index, text, _, reason in self._deltas(http):
            if reason == "error":
                yield out.sse(out.error_body("the engine failed while generating", "server_error"))
                break
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            yield out.sse(body | {"choices": [choice]})
        else:
            yield out.sse("[DONE]")
