"""OpenAI's response objects built from finished (or streaming) engine requests."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from scratchlm.infer.engine import Request
from scratchlm.tokenizer import Tokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"data: {payload}\n\n"


def usage(prompt_tokens: int, requests: list[Request]) -> dict[str, int]:
    completion = sum(len(r.token_ids) for r in requests)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer: Tokenizer, request: Request, echo: bool) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs and
    text_offset, over the prompt too when echo is set."""
    ids: list[int] = []
    chosen: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if echo:
        ids += request.prompt_ids
        chosen += request.prompt_logprobs or [None] * len(request.prompt_ids)
        prompt_tops = request.prompt_top_logprobs or [None] * len(request.prompt_ids)
        tops += [_top_dict(tokenizer, t) if t is not None else None for t in prompt_tops]
        if request.prompt_top_logprobs is None:
            tops = [None] + [{} for _ in request.prompt_ids[1:]]
    ids += request.token_ids
    chosen += request.logprobs or []
    if request.top_logprobs is not None:
        tops += [_top_dict(tokenizer, t) for t in request.top_logprobs]
    else:
        tops += [{} for _ in request.token_ids]
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets, at = [], 0
    for i, token in enumerate(tokens):
        offsets.append(at)
        if not (echo and i == 0 and token == tokenizer.decode([tokenizer.bos_id])):
            at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": chosen,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _top_dict(tokenizer: Tokenizer, pairs: list[tuple[int, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for token_id, logprob in pairs:
        out.setdefault(token_text(tokenizer, token_id), logprob)
    return out


def chat_logprobs(
    tokenizer: Tokenizer, request: Request, start: int = 0, end: int | None = None
) -> dict[str, Any]:
    """The chat `logprobs` object for new tokens start..end."""
    ids = request.token_ids[start:end]
    values = (request.logprobs or [])[start:end]
    tops = (request.top_logprobs or [[] for _ in request.token_ids])[start:end]
    content = []
    for token_id, logprob, top in zip(ids, values, tops, strict=False):
        text = token_text(tokenizer, token_id)
        content.append(
            {
                "token": text,
                "logprob": logprob,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": token_text(tokenizer, t),
                        "logprob": lp,
                        "bytes": list(token_text(tokenizer, t).encode("utf-8")),
                    }
                    for t, lp in top
                ],
            }
        )
    return {"content": content}


def base(kind: str, response_id: str, model: str) -> dict[str, Any]:
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model}
