"""A `scratchlm serve` subprocess on a free local port, or the app in a thread, for the server
tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from scratchlm.infer.engine import Engine
from scratchlm.infer.runner import EngineThread
from scratchlm.loading import load
from scratchlm.serve.app import BODY_TIMEOUT_SECONDS, create_app
from scratchlm.serve.server import HEADER_TIMEOUT_SECONDS, uvicorn_config

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, run: Path, *args: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "scratchlm", "serve", str(run), "--port", str(self.port)]
        if api_key:
            command += ["--api-key", api_key]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start in 90 s")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


class ThreadServer:
    """The app under uvicorn in a thread of the test process, for settings that the command line
    does not take (short header and body timeouts)."""

    def __init__(
        self,
        run: Path,
        max_batch: int = 32,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ) -> None:
        model, tokenizer = load(run)
        engine = Engine(model, tokenizer, max_batch=max_batch)
        app = create_app(EngineThread(engine), tokenizer, "tiny", body_timeout=body_timeout)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, "127.0.0.1", self.port, 1.0, header_timeout=header_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
