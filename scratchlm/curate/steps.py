"""The per-document steps: each edits doc["text"] in place or returns why the document goes.

Dedup is not here: it needs every document of the run at once, so the pipeline runs it between
two per-document passes (see pipeline.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import lru_cache

from scratchlm.curate import filters
from scratchlm.curate.config import CurateConfig
from scratchlm.curate.pii import scrub
from scratchlm.curate.text import html_to_text, normalize
from scratchlm.paths import resolve

Rejection = tuple[str, float]

BAD_INPUT_REASONS = {
    "no text in html",
    "empty document",
    "line too long",
    "document too long",
    "invalid utf-8",
}
"""Rejections of later steps that count as bad input in stats.json (besides everything the reader
sets aside)."""


@lru_cache(maxsize=1)
def _language_identifier():
    from scratchlm.curate.langid import LanguageIdentifier

    return LanguageIdentifier()


@lru_cache(maxsize=2)
def _quality_scorer(path: str):
    from scratchlm.curate.quality import QualityScorer

    return QualityScorer(path)


class StepContext:
    """What the steps see of one shard: the config, models (loaded once per process), counters."""

    def __init__(self, cfg: CurateConfig) -> None:
        self.cfg = cfg
        self.counters: Counter[str] = Counter()

    def langid(self, text: str) -> tuple[str, float]:
        return _language_identifier()(text)

    def quality(self, text: str) -> float:
        return _quality_scorer(str(resolve(self.cfg.quality_model)))(text)


def step_html(doc: dict, ctx: StepContext) -> Rejection | None:
    if doc["meta"].get("format") != "html":
        return None
    text = html_to_text(doc["text"])
    del doc["meta"]["format"]
    doc["text"] = text
    return None if text.strip() else ("no text in html", 0.0)


def step_normalize(doc: dict, ctx: StepContext) -> Rejection | None:
    text, rejection, replaced, repaired = normalize(doc["text"], ctx.cfg)
    ctx.counters["docs_mojibake_repaired"] += repaired
    ctx.counters["replacement_chars"] += replaced
    if replaced:
        ctx.counters["docs_with_replacement_chars"] += 1
    doc["text"] = text
    return rejection


def step_langid(doc: dict, ctx: StepContext) -> Rejection | None:
    lang, score = ctx.langid(doc["text"])
    doc["meta"]["language"] = lang
    doc["meta"]["language_score"] = round(score, 4)
    if lang not in ctx.cfg.languages:
        return f"language {lang}", score
    if score < ctx.cfg.min_lang_score:
        return "low language score", score
    return None


def step_gopher_repetition(doc: dict, ctx: StepContext) -> Rejection | None:
    return filters.gopher_repetition(doc["text"], ctx.cfg.gopher_repetition)


def step_gopher_quality(doc: dict, ctx: StepContext) -> Rejection | None:
    return filters.gopher_quality(doc["text"], ctx.cfg.gopher_quality)


def step_c4(doc: dict, ctx: StepContext) -> Rejection | None:
    text, rejection, dropped = filters.c4_lines(doc["text"], ctx.cfg.c4)
    ctx.counters["c4_lines_dropped"] += dropped
    if rejection is None:
        doc["text"] = text
    return rejection


def step_fineweb(doc: dict, ctx: StepContext) -> Rejection | None:
    return filters.fineweb(doc["text"], ctx.cfg.fineweb)


def step_quality(doc: dict, ctx: StepContext) -> Rejection | None:
    score = ctx.quality(doc["text"])
    doc["meta"]["quality_score"] = round(score, 4)
    return ("quality below threshold", score) if score < ctx.cfg.quality_threshold else None


def step_pii(doc: dict, ctx: StepContext) -> Rejection | None:
    text, emails, ips = scrub(doc["text"], ctx.cfg.email_placeholder, ctx.cfg.ip_placeholder)
    ctx.counters["pii_emails_replaced"] += emails
    ctx.counters["pii_ips_replaced"] += ips
    doc["text"] = text
    return None


PER_DOC_STEPS: dict[str, Callable[[dict, StepContext], Rejection | None]] = {
    "html": step_html,
    "normalize": step_normalize,
    "langid": step_langid,
    "gopher_repetition": step_gopher_repetition,
    "gopher_quality": step_gopher_quality,
    "c4": step_c4,
    "fineweb": step_fineweb,
    "quality": step_quality,
    "pii": step_pii,
}
DEDUP_STEPS = ("exact_dedup", "near_dedup")
EDITING_STEPS = {"html", "normalize", "c4", "pii"}
"""Steps that change the text (the others keep or drop a document as it is)."""
