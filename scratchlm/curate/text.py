"""HTML to main text, and text normalisation (mojibake repair included)."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from scratchlm.curate.config import CurateConfig

Rejection = tuple[str, float]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
_HSPACE = re.compile(r"[^\S\n]+")
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANKS = re.compile(r"\n{3,}")
REPLACEMENT = "\ufffd"
# "â€" then no byte that could continue it: U+201D (right double quote) read as Windows-1252,
# whose third byte, 0x9D, that code page cannot show and a copy dropped. ftfy reads the byte
# after it as 0xA0 and writes a dagger; the quote is what such text held.
_LOST_RIGHT_QUOTE = re.compile("\u00e2\u20ac(?=[\x00-\x7f]|$)")


@lru_cache(maxsize=1)
def _ftfy_config():
    from ftfy import TextFixerConfig

    # Encoding repairs, as datatrove's FTFYFormatter: the fixes that would impose one spelling
    # of quotes, widths, ligatures or line breaks stay off; NFC and control characters are done
    # below for every document, so that the count of repaired documents means mojibake.
    return TextFixerConfig(
        unescape_html="auto",
        remove_control_chars=False,
        fix_latin_ligatures=False,
        fix_character_width=False,
        uncurl_quotes=False,
        fix_line_breaks=False,
        normalization=None,
        explain=False,
    )


# What mojibake from UTF-8 read as Windows-1252 or Latin-1 always holds: a lead byte (0xC2-0xF4
# as one of those code pages shows it) followed by a continuation byte (0x80-0xBF); and what the
# other ftfy fixes act on: HTML entities, terminal escapes, C1 controls, lone surrogates.
_CP1252_CONTINUATION = (
    "\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201a\u201c-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122"
)
_MAYBE_BROKEN = re.compile(
    f"[\u00c2-\u00f4][{_CP1252_CONTINUATION}]|&#?[0-9A-Za-z]+;|\x1b|[\x80-\x9f]|[\ud800-\udfff]"
)


def repair_mojibake(text: str) -> str:
    """Text decoded with the wrong code page (UTF-8 read as Windows-1252: "â€œ" for "“"),
    HTML entities and terminal escapes repaired by ftfy. ftfy runs only on text with a sign of
    one of them: it is slow (3 MB/s) and most text has none."""
    if not _MAYBE_BROKEN.search(text):
        return text
    import ftfy

    return ftfy.fix_text(_LOST_RIGHT_QUOTE.sub("\u201d", text), _ftfy_config())


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


def normalize(text: str, cfg: CurateConfig) -> tuple[str, Rejection | None, int, bool]:
    """Mojibake repaired; NFC, no control characters, one space between words, at most one blank
    line in a row.

    Returns the text, a rejection for bad input (or None), how many characters were replaced
    because their bytes were invalid in the input's encoding, and whether mojibake was repaired.
    """
    if longest_line(text) > cfg.max_line_chars:
        return text, ("line too long", float(longest_line(text))), 0, False
    if len(text) > cfg.max_doc_chars:
        return text, ("document too long", float(len(text))), 0, False
    replaced = text.count(REPLACEMENT)
    if text and replaced / len(text) > cfg.max_invalid_char_ratio:
        return text, ("invalid utf-8", replaced / len(text)), replaced, False
    repaired = repair_mojibake(text)
    changed = repaired != text
    text = repaired.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = _HSPACE.sub(" ", text)
    text = _LINE_EDGES.sub("\n", text)
    text = _BLANKS.sub("\n\n", text).strip()
    if not text:
        return text, ("empty document", 0.0), replaced, changed
    return text, None, replaced, changed
