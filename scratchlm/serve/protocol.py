"""Request bodies of the OpenAI API that the server accepts, checked strictly.

Types are strict (a string is not a number), unknown fields are refused as OpenAI refuses them,
numbers are bounded, and so is every form of prompt (text in all, token ids in all, chat contents
in all), whatever the body size limit lets through; the sampling settings missing from OpenAI
(top_k) are accepted as vLLM accepts them. Penalties are not implemented: only their neutral
value 0 is accepted.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

MAX_PROMPT_CHARS = 1_000_000
"""Characters of prompt text in one request: one string, a list of them, or a chat's contents."""
MAX_PROMPT_TOKENS = 1_000_000
"""Token ids of prompt in one request (all its lists together)."""
MAX_N = 16
MAX_STOP = 4
MAX_SEED = 2**63 - 1

TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=1_000_000)
    """vLLM's extension; 0 or -1 keep every token."""
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=256)]] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    """vLLM's extension: generate max_tokens tokens whatever the model writes (benchmarks)."""

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if isinstance(value, str):
            value = [value] if value else []
        if value is not None and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError("penalties are not supported; only 0 is accepted")
        return value

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


def _check_total(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise ValueError(f"the request holds {size:,} {what}; at most {limit:,} are accepted")


def _prompt_form(value) -> str:
    """Which form of prompt a value is meant as, so that an error speaks of that form."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and isinstance(value[0], str):
        return "texts"
    if isinstance(value, list) and value and isinstance(value[0], list):
        return "id_lists"
    return "ids"


class CompletionRequest(_Sampling):
    prompt: Annotated[
        Annotated[str, Tag("text"), Field(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[TokenId], Tag("ids"), Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]
        | Annotated[
            list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]],
            Tag("texts"),
            Field(min_length=1, max_length=64),
        ]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]],
            Tag("id_lists"),
            Field(min_length=1, max_length=64),
        ],
        Discriminator(_prompt_form),
    ]
    max_tokens: int | None = Field(16, ge=0, le=1_000_000)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _prompt_size(cls, value):
        if isinstance(value, list) and isinstance(value[0], str):
            _check_total(sum(len(p) for p in value), MAX_PROMPT_CHARS, "prompt characters")
        elif isinstance(value, list) and isinstance(value[0], list):
            _check_total(sum(len(p) for p in value), MAX_PROMPT_TOKENS, "prompt token ids")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def _check_contents(messages: list[ChatMessage]) -> list[ChatMessage]:
    total = sum(
        len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content)
        for m in messages
    )
    _check_total(total, MAX_PROMPT_CHARS, "characters of message content")
    return messages


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _contents_size(cls, value):
        return _check_contents(value)


class TokenizeRequest(_Strict):
    """vLLM's /tokenize (lm-evaluation-harness uses it as its remote tokenizer): a `prompt`, or
    chat `messages` through the chat template (the chat page counts its conversation so)."""

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=10_000)
    add_special_tokens: bool = False
    add_generation_prompt: bool = True
    model: str | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.messages is not None:
            _check_contents(self.messages)
        return self


class DetokenizeRequest(_Strict):
    tokens: list[TokenId] = Field(max_length=1_000_000)
    model: str | None = None
