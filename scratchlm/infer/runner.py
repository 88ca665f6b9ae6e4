"""The engine in a background thread, for callers in other threads (the HTTP server).

The engine is not thread-safe, so one thread owns it: it takes new requests and cancellations
from the other threads between steps and runs steps while there is work. Callbacks run on that
thread after each step that changed their request.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from scratchlm.infer.engine import Engine, Request
from scratchlm.infer.sampling import SamplingParams


class QueueFull(Exception):
    """More requests are waiting than the runner accepts."""


class EngineThread:
    def __init__(self, engine: Engine, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._incoming: list[Request] = []
        self._cancelled: list[Request] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="scratchlm-engine", daemon=True)
        self.submitted_at: dict[int, float] = {}
        self.on_first_token: Callable[[float], None] | None = None
        """Called (on the engine thread) with each request's seconds to its first token."""
        self.on_finished: Callable[[Request], None] | None = None
        """Called (on the engine thread) with each request that ends, aborted ones too."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the running and waiting requests are done (or cancelled)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def queue_length(self) -> int:
        return len(self.engine.waiting) + len(self._incoming)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_update: Callable[[Request], None],
    ) -> Request:
        """Check and queue a request (UserError for bad input, QueueFull when the queue is full)."""
        request = self.engine.make_request(prompt_ids, params, on_update)
        with self._cond:
            if self.queue_length >= self.max_queue:
                raise QueueFull(f"{self.queue_length} requests are waiting; try again later")
            self.submitted_at[request.id] = time.perf_counter()
            self._incoming.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        with self._cond:
            self._cancelled.append(request)
            self._cond.notify()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._incoming or self._cancelled or engine.has_work()):
                    if self._stopping:
                        return
                    self._cond.wait()
                engine.waiting.extend(self._incoming)
                self._incoming.clear()
                cancelled, self._cancelled = self._cancelled, []
            for request in cancelled:
                if not request.finished:
                    engine.abort(request)
                    self._count(request)
                    self._notify(request)
            try:
                updated = engine.step()
            except Exception:  # a bug must not hang every client: end their requests
                traceback.print_exc(file=sys.stderr)
                for request in [*engine.running, *engine.waiting]:
                    engine.abort(request)
                    request.finish_reason = "error"
                    self._count(request)
                    self._notify(request)
                continue
            for request in updated:
                self._count(request)

    def _count(self, request: Request) -> None:
        start = self.submitted_at.get(request.id)
        if start is not None and request.token_ids and self.on_first_token is not None:
            self.on_first_token(time.perf_counter() - start)
            del self.submitted_at[request.id]
        if request.finished:
            self.submitted_at.pop(request.id, None)
            if self.on_finished is not None:
                self.on_finished(request)

    @staticmethod
    def _notify(request: Request) -> None:
        if request.on_update is not None:
            request.on_update(request)
