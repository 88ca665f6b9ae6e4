"""Byte-level BPE: training, special tokens, the chat template, encode/decode.

The tokenizer is a Hugging Face `tokenizers` tokenizer.json, so `transformers` loads it unchanged.
Pre-tokenization is GPT-4's (cl100k) split regex followed by the byte-level alphabet, so any
Unicode string maps to tokens and back without loss.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from scratchlm import disk
from scratchlm.errors import UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
"""Ids 0..6, in this order, in every tokenizer this module trains."""

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# GPT-4's cl100k pre-tokenization: contractions, letter runs with one leading non-letter, numbers of
# at most 3 digits, punctuation runs, newline runs, and whitespace that leaves one space to the
# next word.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The template render_chat implements, for transformers' apply_chat_template. The generation tags
# let `return_assistant_tokens_mask=True` mark the same tokens as encode_chat's mask.
CHAT_TEMPLATE_JINJA = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
_SURROGATE = re.compile("[\ud800-\udfff]")


def _new_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: Path, min_frequency: int = 2
) -> Tokenizer:
    """Learn BPE merges from `texts` and write tokenizer.json to `out_path`.

    `vocab_size` counts the special tokens and the 256 byte tokens. The vocabulary can come out
    smaller when the corpus has fewer pairs seen `min_frequency` times.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"vocab_size {vocab_size} is too small: it must hold the {len(SPECIAL_TOKENS)} special "
            f"tokens and the 256 byte tokens (at least {MIN_VOCAB_SIZE})"
        )
    chars_seen = 0

    def counted() -> Iterator[str]:
        nonlocal chars_seen
        for text in texts:
            chars_seen += len(text)
            yield text

    tok = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(counted(), trainer)
    if chars_seen == 0:
        raise UserError("cannot train a tokenizer on an empty corpus: the documents hold no text")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".tmp-{out_path.name}-{os.getpid()}")
    with disk.writing(out_path.name, out_path.parent, None, [tmp], then="train it again"):
        tok.save(str(tmp))
        tmp.replace(out_path)
    return Tokenizer.load(out_path)


class Tokenizer:
    """A trained tokenizer.json with this project's special tokens and chat template."""

    def __init__(self, hf: HFTokenizer, sha256: str, path: Path | None = None) -> None:
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer {path} lacks the special tokens {', '.join(missing)}")
        self.path = path
        self.sha256 = sha256
        """sha256 of the tokenizer.json bytes: token shards record it to catch a mismatch."""
        # Plain text must never turn into control tokens, even when it spells "<|eos|>": this
        # copy matches special tokens as ordinary text. The chat template places them by id.
        self._text = hf
        self._text.encode_special_tokens = True
        self.special_ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id = self.special_ids[BOS]
        self.eos_id = self.special_ids[EOS]
        self.pad_id = self.special_ids[PAD]
        self.end_id = self.special_ids[END]
        self._token_bytes: np.ndarray | None = None
        self._splits_at_line_starts: bool | None = None

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read tokenizer {path}: {e.strerror}") from None
        try:
            hf = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exception for a malformed file
            raise UserError(f"{path} is not a valid tokenizer.json ({e})") from None
        return cls(hf, hashlib.sha256(data).hexdigest(), path)

    @property
    def vocab_size(self) -> int:
        return self._text.get_vocab_size()

    @property
    def splits_at_line_starts(self) -> bool:
        """Whether no token spans a newline followed by a letter, so that the text after such a
        point encodes alone as it does inside the whole text. True for this module's pipeline (no
        normalizer; the split regex above: a chunk that holds a newline never goes on into a
        letter; byte level with no prefix space); other tokenizers are not assumed to."""
        if self._splits_at_line_starts is None:
            self._splits_at_line_starts = (
                self._text.normalizer is None
                and self._text.pre_tokenizer is not None
                and self._text.pre_tokenizer.__getstate__()
                == _new_bpe().pre_tokenizer.__getstate__()
            )
        return self._splits_at_line_starts

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of plain text; special-token spellings in it are encoded as ordinary text."""
        # The batch call releases the GIL while it works (encode holds it: a 1 MB text stalled
        # every other thread of the server for seconds) and skips the offsets nobody reads.
        [encoding] = self._text.encode_batch_fast([_valid_unicode(text)], add_special_tokens=False)
        ids = encoding.ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of many texts at once (the tokenizers library spreads them over threads)."""
        encodings = self._text.encode_batch_fast(
            [_valid_unicode(t) for t in texts], add_special_tokens=False
        )
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._text.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self._text.id_to_token(token_id)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (0 for specials): the bits-per-byte divisor."""
        if self._token_bytes is None:
            lengths = np.zeros(self.vocab_size, dtype=np.int64)
            special = set(self.special_ids.values())
            for token, token_id in self._text.get_vocab(with_added_tokens=True).items():
                # In the byte-level alphabet each character of a token stands for one byte.
                if token_id not in special:
                    lengths[token_id] = len(token)
            self._token_bytes = lengths
        return self._token_bytes

    # -- chat ---------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return render_chat(messages, add_generation_prompt)

    def encode_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat and a 0/1 mask of the tokens the assistant wrote.

        The mask covers each assistant message's content and its closing <|end|>, the tokens an
        SFT loss trains on. Special tokens are placed by id and the contents encoded as plain
        text, so a message that spells "<|end|>" cannot close its turn early.
        """
        _check_messages(messages)
        ids = [self.bos_id]
        mask = [0]
        for message in messages:
            ids.append(self.special_ids[ROLE_TOKENS[message["role"]]])
            mask.append(0)
            body = [*self.encode(message["content"]), self.end_id]
            ids += body
            mask += [int(message["role"] == "assistant")] * len(body)
        if add_generation_prompt:
            ids.append(self.special_ids[ASSISTANT])
            mask.append(0)
        return ids, mask


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The chat as one string: <|bos|><|user|>text<|end|><|assistant|>text<|end|>..."""
    _check_messages(messages)
    parts = [BOS]
    for message in messages:
        parts += [ROLE_TOKENS[message["role"]], message["content"], END]
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def _check_messages(messages: Sequence[dict]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLE_TOKENS:
            raise UserError(
                f"chat message {i} needs a role of system, user or assistant, got {message!r:.80}"
            )
        if not isinstance(message.get("content"), str):
            raise UserError(f"chat message {i} needs a string content")


def _valid_unicode(text: str) -> str:
    """Text with lone surrogates (from JSON "\\ud800" escapes; not encodable) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text
