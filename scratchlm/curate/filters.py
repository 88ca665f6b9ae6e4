"""Heuristic quality filters: Gopher quality, Gopher repetition, C4 lines and FineWeb's extra rules.

Each filter takes a text and its config and returns None to keep it, or (reason, score): the rule
that removed it and the measured value that broke the threshold. The C4 filter also edits the text
(it drops lines), so it returns the new text too. Reason names follow datatrove's.
"""

from __future__ import annotations

import re
import string
from itertools import repeat

import numpy as np

from scratchlm.curate.config import C4Config, FineWebConfig, GopherQualityConfig
from scratchlm.curate.config import GopherRepetitionConfig as RepetitionConfig

Rejection = tuple[str, float]

END_PUNCTUATION = (".", "?", "!", '"', "'", "\u201d", "\u2019")
ELLIPSES = ("...", "\u2026")
BULLETS = ("\u25cf", "\u2022", "*", "-", "\u2013", "\u25aa", "\u2023", "\u25e6")
_STRIP = string.punctuation + "\u2018\u2019\u201c\u201d\u2026\u2013\u2014"
POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.I)
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)]*(?:\s|$)")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_LETTER = re.compile(r"[^\W\d_]")


def gopher_quality(text: str, cfg: GopherQualityConfig) -> Rejection | None:
    raw_words = text.split()
    words = list(filter(None, map(str.strip, raw_words, repeat(_STRIP))))
    n_words = len(words)
    if n_words < cfg.min_doc_words:
        return "gopher_short_doc", float(n_words)
    if n_words > cfg.max_doc_words:
        return "gopher_long_doc", float(n_words)
    avg_len = sum(map(len, words)) / n_words
    if avg_len < cfg.min_avg_word_length:
        return "gopher_below_avg_word_length", avg_len
    if avg_len > cfg.max_avg_word_length:
        return "gopher_above_avg_word_length", avg_len
    hashes = text.count("#") / n_words
    if hashes > cfg.max_symbol_word_ratio:
        return "gopher_too_many_hashes", hashes
    ellipses = (text.count("...") + text.count("\u2026")) / n_words
    if ellipses > cfg.max_symbol_word_ratio:
        return "gopher_too_many_ellipsis", ellipses
    lines = text.splitlines() or [""]
    bullets = sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines)
    if bullets > cfg.max_bullet_lines_ratio:
        return "gopher_too_many_bullets", bullets
    ellipsis_lines = sum(line.rstrip().endswith(ELLIPSES) for line in lines) / len(lines)
    if ellipsis_lines > cfg.max_ellipsis_lines_ratio:
        return "gopher_too_many_end_ellipsis", ellipsis_lines
    alpha = sum(map(bool, map(_LETTER.search, raw_words))) / len(raw_words)
    if alpha < cfg.max_non_alpha_words_ratio:
        return "gopher_below_alpha_threshold", alpha
    stop_words = len(set(cfg.stop_words).intersection(map(str.lower, words)))
    if stop_words < cfg.min_stop_words:
        return "gopher_enough_stop_words", float(stop_words)
    return None


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """How many elements repeat an earlier one, and their characters."""
    seen: set[str] = set()
    count = chars = 0
    for element in elements:
        if element in seen:
            count += 1
            chars += len(element)
        else:
            seen.add(element)
    return count, chars


def ngram_ids(word_ids: np.ndarray, max_n: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For n = 2..max_n: dense ids of the word n-grams (equal exactly when the n-grams are equal),
    and for each id the position where it first occurs.

    Each n extends the (n-1)-gram ids by one word, so all sizes cost max_n - 1 sorts in total.
    """
    result = {}
    ids = word_ids.astype(np.int64)
    base = int(word_ids.max()) + 1
    for n in range(2, max_n + 1):
        m = len(word_ids) - n + 1
        if m <= 0:
            break
        _, first, ids = np.unique(
            ids[:m] * base + word_ids[n - 1 : n - 1 + m], return_index=True, return_inverse=True
        )
        ids = ids.reshape(-1)
        result[n] = (ids, first)
    return result


def gopher_repetition(text: str, cfg: RepetitionConfig) -> Rejection | None:
    """Gopher's repetition rules (Rae et al. 2021, table A1), vectorised over word ids.

    Duplicated n-gram characters follow the paper's definition: the characters of words covered by
    any n-gram that occurred earlier in the document, each character counted once.
    """
    total = len(text)
    if total == 0:
        return None
    paragraphs = _PARAGRAPHS.split(text.strip())
    dup, chars = _duplicates(paragraphs)
    if dup / len(paragraphs) > cfg.dup_para_frac:
        return "dup_para_frac", dup / len(paragraphs)
    if chars / total > cfg.dup_para_char_frac:
        return "dup_para_char_frac", chars / total
    lines = _LINES.split(text)
    dup, chars = _duplicates(lines)
    if dup / len(lines) > cfg.dup_line_frac:
        return "dup_line_frac", dup / len(lines)
    if chars / total > cfg.dup_line_char_frac:
        return "dup_line_char_frac", chars / total
    words = text.split()
    if len(words) < 2:
        return None
    vocab: dict[str, int] = {}
    word_ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.int64, len(words))
    word_lens = np.fromiter(map(len, words), np.int64, len(words))
    cum = np.concatenate([[0], np.cumsum(word_lens)])
    grams = ngram_ids(word_ids, max([*cfg.top_ngram_sizes, *cfg.dup_ngram_sizes, 1]))
    for n, max_frac in zip(cfg.top_ngram_sizes, cfg.top_ngram_max_fracs, strict=True):
        if n not in grams:
            continue
        ids, first_index = grams[n]
        counts = np.bincount(ids)
        top = int(np.argmax(counts))
        first = int(first_index[top])
        top_chars = (cum[first + n] - cum[first] + n - 1) * counts[top]
        if counts[top] > 1 and top_chars / total > max_frac:
            return f"top_{n}_gram", float(top_chars / total)
    for n, max_frac in zip(cfg.dup_ngram_sizes, cfg.dup_ngram_max_fracs, strict=True):
        if n not in grams:
            continue
        ids, first_index = grams[n]
        is_dup = first_index[ids] != np.arange(len(ids))
        delta = np.zeros(len(words) + 1, np.int64)
        starts = np.flatnonzero(is_dup)
        delta[starts] += 1  # starts are distinct, so plain fancy indexing adds once each
        delta[starts + n] -= 1
        covered = np.cumsum(delta[:-1]) > 0
        frac = float(word_lens[covered].sum() / total)
        if frac > max_frac:
            return f"duplicated_{n}_n_grams", frac
    return None


def c4_lines(text: str, cfg: C4Config) -> tuple[str, Rejection | None, int]:
    """C4's rules (Raffel et al. 2020): the kept text, a rejection or None, and lines dropped.

    Blank lines are kept as paragraph breaks (C4 itself joins the kept lines with single newlines).
    """
    kept: list[str] = []
    dropped = 0
    for raw_line in text.split("\n"):
        line = raw_line.strip()
        if not line:
            kept.append("")
            continue
        if cfg.remove_citations:
            line = _CITATION.sub("", line)
        lower = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in lower:
            return "", ("lorem_ipsum", 1.0), dropped
        if cfg.filter_curly_bracket and "{" in line:
            return "", ("curly_bracket", 1.0), dropped
        words = line.split()
        if (
            (
                cfg.filter_no_terminal_punct
                and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSES))
            )
            or len(words) < cfg.min_words_per_line
            or max(map(len, words)) > cfg.max_word_length
            or (cfg.filter_javascript and "javascript" in lower)
            or (cfg.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS))
        ):
            dropped += 1
            continue
        kept.append(line)
    new_text = _PARAGRAPHS.sub("\n\n", "\n".join(kept)).strip()
    sentences = len(_SENTENCE_END.findall(new_text))
    if sentences < cfg.min_num_sentences:
        return new_text, ("too_few_sentences", float(sentences)), dropped
    return new_text, None, dropped


def fineweb(text: str, cfg: FineWebConfig) -> Rejection | None:
    """FineWeb's extra rules (Penedo et al. 2024, datatrove FineWebQualityFilter)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "empty", 0.0
    punct = sum(line.rstrip().endswith(END_PUNCTUATION) for line in lines) / len(lines)
    if punct < cfg.line_punct_thr:
        return "line_punct_ratio", punct
    short = sum(len(line) <= cfg.short_line_length for line in lines) / len(lines)
    if short > cfg.short_line_thr:
        return "short_line_ratio", short
    _, dup_chars = _duplicates(lines)
    dup_ratio = dup_chars / max(1, len(text.replace("\n", "")))
    if dup_ratio > cfg.char_duplicates_ratio:
        return "char_dup_ratio", dup_ratio
    newlines = text.count("\n") / max(1, len(text.split()))
    if newlines > cfg.new_line_ratio:
        return "list_ratio", newlines
    return None
