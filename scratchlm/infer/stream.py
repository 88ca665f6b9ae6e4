"""`scratchlm generate`: text streamed to the terminal as the model writes it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from scratchlm.device import pick_device
from scratchlm.infer.generate import generate
from scratchlm.loading import describe_checkpoint, from_checkpoint, read_checkpoint


def streamable_text(text: str, stops: Sequence[str] = (), finished: bool = False) -> str:
    """The part of the text so far that can be shown and never needs taking back: without a
    character still missing bytes (U+FFFD at the end) or a tail that may begin a stop string."""
    if finished:
        return text
    text = text.rstrip("\ufffd")
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                text = text[:-n]
                break
    return text


def stream_to_terminal(
    path: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    device: str = "cpu",
) -> str:
    """Print the prompt, then each new piece of text as soon as it decodes to whole characters.

    A device that is not there is refused before the model loads (the CLI checks the sampling
    options before that)."""
    target = pick_device(device, "--device")
    ckpt = read_checkpoint(path)
    print(f"generate: loaded {describe_checkpoint(ckpt, path)}", file=sys.stderr, flush=True)
    model, tokenizer = from_checkpoint(ckpt, device=target)
    ids = tokenizer.encode(prompt, add_bos=True)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    new: list[int] = []
    shown = ""
    for token in generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_ids=(tokenizer.eos_id,),
    ):
        new.append(token)
        text = tokenizer.decode(new, skip_special=True)
        # A multi-byte character split across tokens decodes to U+FFFD until its last byte comes.
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    text = tokenizer.decode(new, skip_special=True)
    sys.stdout.write(text[len(shown) :] + "\n")  # whatever is left, even a broken character
    return text
