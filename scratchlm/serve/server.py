"""`scratchlm serve`: load a model, start the engine thread and run the app under uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path

from scratchlm.errors import UserError


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
    from scratchlm.infer.engine import Engine
    from scratchlm.infer.runner import EngineThread
    from scratchlm.loading import load

    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    model, tokenizer = load(path, device=device)
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
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_seconds
    )
    print(f"serving {name} on http://{host}:{port} (chat page at /)", file=sys.stderr, flush=True)
    uvicorn.Server(config).run()
