"""`scratchlm chat RUN`: a multi-turn conversation in the terminal, streamed as it is written.

Commands: `/system TEXT` sets the system prompt (empty TEXT removes it), `/reset` starts a new
conversation, `/quit` (or Ctrl-D) leaves. Ctrl-C while the model answers stops that answer and keeps
what was written; Ctrl-C at the prompt only reminds how to leave.

The conversation goes through the tokenizer's chat template. Before each answer the prompt must
leave room for it (max_new_tokens, at most half the context): while it does not, the oldest
exchanges are dropped (the system prompt stays) and a note says how many messages went.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from scratchlm.device import pick_device
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.infer.sampling import SamplingParams
from scratchlm.infer.stream import streamable_text
from scratchlm.tokenizer import Tokenizer

HELP = (
    "/system TEXT sets the system prompt, /reset starts over, /quit leaves; Ctrl-C stops an answer"
)


class Conversation:
    """The messages so far, and the prompt for the next answer within the context."""

    def __init__(self, tokenizer: Tokenizer, context: int, reserve: int, system: str = "") -> None:
        self.tokenizer, self.context, self.reserve = tokenizer, context, reserve
        self.system = system
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt(self) -> tuple[list[int], int]:
        """Token ids for the next answer, and how many old messages were dropped to fit them."""
        dropped = 0
        while True:
            ids, _ = self.tokenizer.encode_chat(self.messages(), add_generation_prompt=True)
            if len(ids) + self.reserve <= self.context:
                return ids, dropped
            if len(self.turns) <= 1:
                self.turns.clear()
                raise UserError(
                    f"the message needs {len(ids)} tokens; with room for an answer of "
                    f"{self.reserve} tokens the model's context ({self.context}) does not hold it"
                )
            # Drop the oldest exchange: a user message and the answer that followed it.
            cut = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:cut]
            dropped += cut


def answer(
    engine: Engine,
    prompt: list[int],
    params: SamplingParams,
    stopped: Callable[[], bool],
) -> Iterator[str]:
    """Pieces of the answer as they can be shown; stops early when stopped() turns true."""
    request = engine.add(prompt, params)
    shown = 0
    try:
        while not request.finished:
            if stopped():
                return
            engine.step()
            text = streamable_text(request.text, finished=request.finished)
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)
    finally:
        engine.abort(request)


def chat_in_terminal(
    path: Path,
    system: str = "",
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int | None = None,
    device: str = "cpu",
) -> None:
    from scratchlm.loading import describe_checkpoint, from_checkpoint, read_checkpoint

    target = pick_device(device, "--device")
    ckpt = read_checkpoint(path)
    print(f"chat: loaded {describe_checkpoint(ckpt, path)}", file=sys.stderr, flush=True)
    model, tokenizer = from_checkpoint(ckpt, device=target)
    context = model.config.max_seq_len
    engine = Engine(model, tokenizer, max_batch=1, cache_tokens=context)
    conversation = Conversation(tokenizer, context, min(max_new_tokens, context // 2), system)
    sampling = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_token_ids=(tokenizer.end_id, tokenizer.eos_id),
    )
    sampling.check()
    # Ctrl-C must reach us even when the launcher ignored SIGINT (a background job, a test
    # runner's worker): an ignored disposition is inherited and would outlive the first answer.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"chat with {path} ({context} tokens of context). {HELP}.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D leaves)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            conversation.turns.clear()
            print("(new conversation)")
            continue
        if text == "/system" or text.startswith("/system "):
            conversation.system = text[len("/system") :].strip()
            print("(system prompt set)" if conversation.system else "(system prompt removed)")
            continue
        if text.startswith("/"):
            print(f"(unknown command; {HELP})")
            continue
        conversation.turns.append({"role": "user", "content": line})
        try:
            prompt, dropped = conversation.prompt()
        except UserError as e:
            print(f"({e})")
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest messages to fit the model's context)")
        reply = _stream_reply(engine, prompt, sampling)
        conversation.turns.append({"role": "assistant", "content": reply})


def _stream_reply(engine: Engine, prompt: list[int], params: SamplingParams) -> str:
    """Print the answer as it comes; Ctrl-C (SIGINT) ends it between two steps."""
    interrupted = False

    def stop(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, stop)
    pieces = []
    try:
        for piece in answer(engine, prompt, params, lambda: interrupted):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    print(" [stopped]" if interrupted else "", flush=True)
    return "".join(pieces)
