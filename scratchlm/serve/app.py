"""The OpenAI-compatible HTTP API and the chat page, on one engine running in a thread.

Routes: GET / (the chat page), GET /health, GET /metrics, GET /v1/models, POST /v1/completions,
POST /v1/chat/completions, and vLLM's GET /tokenizer_info, POST /tokenize and POST /detokenize
(lm-evaluation-harness tokenizes through them). Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}.

Parsing, validating and tokenizing a request run in worker threads (the tokenizer releases the
GIL), so a large request never stalls the event loop that answers /health and streams tokens.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer as HFTokenizer

from scratchlm.errors import UserError
from scratchlm.infer.runner import EngineThread, QueueFull
from scratchlm.serve import responses as out
from scratchlm.serve.metrics import Metrics
from scratchlm.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from scratchlm.serve.streams import Generation
from scratchlm.tokenizer import CHAT_TEMPLATE_JINJA, Tokenizer

BODY_TIMEOUT_SECONDS = 30.0
"""A request body not in whole within this time of its headers is refused with 408."""
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")
ROUTES = (
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenizer_info",
    "/tokenize",
    "/detokenize",
)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code=None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class SafeJSON(JSONResponse):
    """JSON with non-ASCII escaped: text from a client may hold lone surrogates."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, kind: str | None = None, param=None, code=None):
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return SafeJSON(out.error_body(message, kind, param, code), status_code=status)


class Guard:
    """ASGI middleware: the API key, the body size and time limits and the request counter."""

    def __init__(
        self,
        app,
        api_key: str | None,
        max_body_bytes: int,
        metrics: Metrics,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ) -> None:
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "/static" if path.startswith("/static/") else "other"
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            response = self._refusal(scope)
            body = b""
            if response is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, response = await self._read_body(scope, receive)
            if response is not None:
                return await response(scope, receive, send_counted)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_counted)
        finally:
            self.metrics.request(route, status["code"])

    def _refusal(self, scope):
        path = scope["path"]
        if not self.api_key or path in PUBLIC_PATHS or path.startswith("/static/"):
            return None
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            return _error(
                401, "missing or wrong API key", "authentication_error", None, "invalid_api_key"
            )
        return None

    async def _read_body(self, scope, receive):
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:
            return b"", _error(413, f"the request body is over {self.max_body} bytes")
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return b"", _error(408, f"the request body did not arrive in {self.body_timeout} s")
            if message["type"] == "http.disconnect":
                return b"", _error(400, "the client went away")
            size += len(message.get("body", b""))
            if size > self.max_body:
                return b"", _error(413, f"the request body is over {self.max_body} bytes")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _parse(raw: bytes, model: type[BaseModel]):
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ApiError(
            400, f"{loc}: {first['msg']}" if loc else first["msg"], loc or None
        ) from None


def create_app(
    runner: EngineThread,
    tokenizer: Tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 4 << 20,
    drain_seconds: float = 30.0,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
) -> FastAPI:
    metrics = Metrics()
    with_specials = HFTokenizer.from_file(str(tokenizer.path))
    runner.on_first_token = metrics.time_to_first_token
    runner.on_finished = metrics.finished_request
    context = runner.engine.context

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        await asyncio.to_thread(runner.stop, drain_seconds)

    app = FastAPI(title="scratchlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(
        Guard,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        metrics=metrics,
        body_timeout=body_timeout,
    )
    static = resources.files("scratchlm.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, None, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return _error(500, "internal error")

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(
                400,
                f"model {name!r} not found; this server has {model_name!r}",
                "model",
                "model_not_found",
            )

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": runner.running, "waiting": runner.queue_length}

    @app.get("/metrics")
    async def prometheus():
        text = metrics.render(runner.queue_length, runner.running, runner.engine.cache_usage())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": 0,
            "owned_by": "scratchlm",
            "max_model_len": context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {
            "tokenizer_class": "scratchlm",
            "bos_token": "<|bos|>",
            "eos_token": "<|eos|>",
            "pad_token": "<|pad|>",
            "chat_template": CHAT_TEMPLATE_JINJA,
            "model_max_length": context,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await asyncio.to_thread(_parse, await request.body(), TokenizeRequest)
        ids = await asyncio.to_thread(_tokenize, body, tokenizer, with_specials)
        # A million ids take seconds through FastAPI's encoder: rendered in the thread instead.
        reply = {"tokens": ids, "count": len(ids), "max_model_len": context}
        return Response(await asyncio.to_thread(json.dumps, reply), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await asyncio.to_thread(_parse, await request.body(), DetokenizeRequest)
        if any(t >= tokenizer.vocab_size for t in body.tokens):
            raise ApiError(400, f"token ids must be below {tokenizer.vocab_size}", "tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await asyncio.to_thread(_parse, await request.body(), CompletionRequest)
        check_model(body.model)
        if body.stream and body.logprobs is not None:
            raise ApiError(400, "logprobs with stream is not supported", "logprobs")
        prompts = await asyncio.to_thread(_completion_prompts, body.prompt, tokenizer)
        generation = _start(runner, tokenizer, body, prompts, context, completion=True)
        if body.stream:
            return _sse(generation.stream_completion(request, model_name, body.echo))
        return SafeJSON(await _finish(generation, request, model_name, body.echo, chat=False))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await asyncio.to_thread(_parse, await request.body(), ChatRequest)
        check_model(body.model)
        prompt = await asyncio.to_thread(_chat_prompt, body.messages, tokenizer)
        generation = _start(runner, tokenizer, body, [(prompt, None)], context, completion=False)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(generation.stream_chat(request, model_name, include_usage))
        return SafeJSON(await _finish(generation, request, model_name, False, chat=True))

    return app


def _sse(events) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def _tokenize(body: TokenizeRequest, tokenizer: Tokenizer, with_specials: HFTokenizer) -> list[int]:
    """/tokenize's ids, or its messages' through the chat template."""
    if body.messages is not None:
        return _chat_prompt(body.messages, tokenizer, body.add_generation_prompt)
    # As vLLM's: special-token spellings in the text become those tokens.
    # (The batch call releases the GIL while it works; encode holds it.)
    [encoding] = with_specials.encode_batch_fast([body.prompt], add_special_tokens=False)
    ids = encoding.ids
    return [tokenizer.bos_id, *ids] if body.add_special_tokens else ids


def _chat_prompt(messages, tokenizer: Tokenizer, add_generation_prompt: bool = True) -> list[int]:
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        ids, _ = tokenizer.encode_chat(plain, add_generation_prompt=add_generation_prompt)
    except UserError as e:
        raise ApiError(400, str(e), "messages") from None
    return ids


def _completion_prompts(prompt, tokenizer: Tokenizer) -> list[tuple[list[int], str | None]]:
    """(token ids, prompt text) per prompt. A string is encoded like `scratchlm generate` does it,
    after <|bos|>; token ids are used as given."""
    if isinstance(prompt, str):
        return [(tokenizer.encode(prompt, add_bos=True), prompt)]
    if isinstance(prompt[0], int):
        return [(list(prompt), None)]
    if isinstance(prompt[0], str):
        return [(tokenizer.encode(p, add_bos=True), p) for p in prompt]
    return [(list(p), None) for p in prompt]


def _start(runner, tokenizer, body, prompts, context, completion: bool) -> Generation:
    """Check lengths and submit n requests per prompt."""
    if completion:
        logprobs = body.logprobs
        prompt_logprobs = body.logprobs if body.echo else None
        max_tokens = body.max_tokens
        stop_ids = (tokenizer.eos_id,)
    else:
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = None
        max_tokens = body.max_completion_tokens or body.max_tokens
        stop_ids = (tokenizer.end_id, tokenizer.eos_id)
    if body.ignore_eos:
        stop_ids = ()
    generation = Generation(runner, tokenizer, body.stop_strings())
    for ids, text in prompts:
        if any(t >= tokenizer.vocab_size for t in ids):
            generation.cancel()
            raise ApiError(400, f"prompt token ids must be below {tokenizer.vocab_size}", "prompt")
        wanted = max_tokens if max_tokens is not None else max(context - len(ids), 0)
        # A chat always needs room for an answer; a completion may only score (max_tokens=0).
        full = len(ids) >= context and (wanted > 0 or not completion)
        if len(ids) + wanted > context or full:
            generation.cancel()
            raise ApiError(
                400,
                f"this model's context is {context} tokens; the request asks for "
                f"{len(ids) + wanted} ({len(ids)} in the prompt, {wanted} to generate)",
                "max_tokens" if len(ids) < context else "prompt",
                "context_length_exceeded",
            )
        for i in range(body.n):
            params = dict(
                max_tokens=wanted,
                temperature=body.temperature,
                top_k=max(body.top_k, 0),
                top_p=body.top_p,
                seed=None if body.seed is None else (body.seed + i) % (2**63),
                stop=body.stop_strings(),
                stop_token_ids=stop_ids,
                include_stop_token=True,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
            try:
                generation.submit(ids, params, text)
            except UserError as e:
                generation.cancel()
                raise ApiError(400, str(e)) from None
            except QueueFull as e:
                generation.cancel()
                raise ApiError(429, str(e), code="rate_limit_exceeded") from None
    return generation


async def _finish(generation: Generation, request: Request, model: str, echo: bool, chat: bool):
    if not await generation.wait(request):  # the client went away; nobody reads this
        return out.error_body("the client disconnected")
    if any(r.finish_reason == "error" for r in generation.requests):
        raise ApiError(500, "the engine failed while generating")
    return generation.chat_body(model) if chat else generation.completion_body(model, echo)
