"""`scratchlm serve`: load a model, start the engine thread and run the app under uvicorn."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from scratchlm.errors import UserError

HEADER_TIMEOUT_SECONDS = 10.0
"""A connection whose request headers are not in within this time (of connecting, or of the last
response on a kept-alive connection) is closed: half-sent requests must not hold sockets forever."""
KEEP_ALIVE_SECONDS = 5


class HeaderDeadline:
    """Mixed into uvicorn's HTTP protocol class: closes a connection whose next request's headers
    do not arrive whole within `header_timeout` seconds. uvicorn times out idle kept-alive
    connections but not a request that stops halfway through its headers."""

    header_timeout = HEADER_TIMEOUT_SECONDS

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self.loop.call_later(self.header_timeout, self._header_deadline, self.cycle)

    def _header_deadline(self, cycle_when_armed) -> None:
        # A new cycle means headers came; an unfinished one is a request still being answered.
        idle = self.cycle is None or self.cycle.response_complete
        if self.cycle is cycle_when_armed and idle and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(
    app,
    host: str,
    port: int,
    drain_seconds: float,
    header_timeout: float = HEADER_TIMEOUT_SECONDS,
):
    """uvicorn's settings for the app: the header deadline, keep-alive and graceful shutdown."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    protocol = type(
        "DeadlineHTTPProtocol",
        (HeaderDeadline, AutoHTTPProtocol),
        {"header_timeout": header_timeout},
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=protocol,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=drain_seconds,
    )


def check_flags(
    port: int, max_batch: int, cache_tokens: int | None, max_queue: int, drain_seconds: float
) -> None:
    """Refuse settings that would make the server refuse or hang every request."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}")
    if max_queue < 1:
        raise UserError("--max-queue must be at least 1 (0 would refuse every request with 429)")
    if cache_tokens is not None and cache_tokens < 1:
        raise UserError(f"--cache-tokens must be at least 1, got {cache_tokens}")
    if not (math.isfinite(drain_seconds) and drain_seconds >= 0):
        raise UserError(f"--drain-seconds must be a number >= 0, got {drain_seconds}")


def serve(
    path: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 32,
    cache_tokens: int | None = None,
    max_queue: int = 256,
    model_name: str | None = None,
    device: str = "cpu",
    drain_seconds: float = 30.0,
    max_body_bytes: int = 4 << 20,
) -> None:
    """Serve until SIGINT or SIGTERM; then running requests get up to drain_seconds to finish."""
    try:
        import uvicorn

        from scratchlm.serve.app import create_app
    except ImportError as e:
        raise UserError(
            f"scratchlm serve needs FastAPI and uvicorn ({e.name} is missing): "
            "pip install 'scratchlm[serve]'"
        ) from None
    from scratchlm.device import pick_device
    from scratchlm.infer.engine import Engine
    from scratchlm.infer.runner import EngineThread
    from scratchlm.loading import load

    check_flags(port, max_batch, cache_tokens, max_queue, drain_seconds)
    model, tokenizer = load(path, device=pick_device(device, "--device"))
    context = model.config.max_seq_len
    if cache_tokens is not None and cache_tokens < context:
        raise UserError(
            f"--cache-tokens ({cache_tokens}) must hold at least one full context ({context} "
            "tokens), or requests that fill the context could never run"
        )
    engine = Engine(model, tokenizer, max_batch=max_batch, cache_tokens=cache_tokens)
    name = model_name or Path(path).resolve().name
    app = create_app(
        EngineThread(engine, max_queue=max_queue),
        tokenizer,
        name,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        drain_seconds=drain_seconds,
    )
    config = uvicorn_config(app, host, port, drain_seconds)
    print(f"serving {name} on http://{host}:{port} (chat page at /)", file=sys.stderr, flush=True)
    uvicorn.Server(config).run()
