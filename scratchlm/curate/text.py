"""HTML to main text, and text normalisation."""

from __future__ import annotations

import re
import unicodedata

from scratchlm.curate.config import CurateConfig

Rejection = tuple[str, float]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
_HSPACE = re.compile(r"[^\S\n]+")
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANKS = re.compile(r"\n{3,}")
REPLACEMENT = "\ufffd"


def html_to_text(html: str) -> str:
    """The main text of a page (boilerplate, navigation and ads dropped), or "" when it has none."""
    import trafilatura

    text = trafilatura.extract(
        html, include_comments=False, include_tables=False, deduplicate=False, fast=True
    )
    return text or ""


def longest_line(text: str) -> int:
    longest = start = 0
    while True:
        end = text.find("\n", start)
        if end < 0:
            return max(longest, len(text) - start)
        longest = max(longest, end - start)
        start = end + 1


def normalize(text: str, cfg: CurateConfig) -> tuple[str, Rejection | None, int]:
    """NFC, no control characters, one space between words, at most one blank line in a row.

    Returns the text, a rejection for bad input (or None), and how many characters were replaced
    because their bytes were invalid in the input's encoding.
    """
    if longest_line(text) > cfg.max_line_chars:
        return text, ("line too long", float(longest_line(text))), 0
    if len(text) > cfg.max_doc_chars:
        return text, ("document too long", float(len(text))), 0
    replaced = text.count(REPLACEMENT)
    if text and replaced / len(text) > cfg.max_invalid_char_ratio:
        return text, ("invalid utf-8", replaced / len(text)), replaced
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = _HSPACE.sub(" ", text)
    text = _LINE_EDGES.sub("\n", text)
    text = _BLANKS.sub("\n\n", text).strip()
    if not text:
        return text, ("empty document", 0.0), replaced
    return text, None, replaced
