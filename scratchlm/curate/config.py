"""The [curate] section of a recipe.

Each filter threshold is a key with the default its source publishes: Gopher (Rae et al. 2021, as
implemented in datatrove's GopherQualityFilter / GopherRepetitionFilter), C4 (Raffel et al. 2020,
datatrove's C4QualityFilter) and FineWeb (Penedo et al. 2024, datatrove's FineWebQualityFilter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scratchlm.errors import UserError
from scratchlm.schema import ranged

DEFAULT_STEPS = [
    "html",
    "normalize",
    "langid",
    "gopher_repetition",
    "gopher_quality",
    "c4",
    "fineweb",
    "exact_dedup",
    "near_dedup",
    "pii",
]
"""The default steps, in order (reading always runs first; `quality` is added by recipes that name
a classifier in `quality_model`)."""

ALL_STEPS = [*DEFAULT_STEPS[:7], "quality", *DEFAULT_STEPS[7:]]
"""Every known step, in the order they are meant to run."""


@dataclass
class GopherQualityConfig:
    min_doc_words: int = ranged(50, ge=0)
    max_doc_words: int = ranged(100_000, ge=0)
    min_avg_word_length: float = ranged(3.0, ge=0)
    max_avg_word_length: float = ranged(10.0, ge=0)
    max_symbol_word_ratio: float = ranged(0.1, ge=0)
    """Hash signs and ellipses per word."""
    max_bullet_lines_ratio: float = ranged(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float = ranged(0.3, ge=0, le=1)
    max_non_alpha_words_ratio: float = ranged(0.8, ge=0, le=1)
    """At least this share of words must contain a letter (the name follows datatrove)."""
    min_stop_words: int = ranged(2, ge=0)
    stop_words: list[str] = field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"]
    )


@dataclass
class GopherRepetitionConfig:
    dup_line_frac: float = ranged(0.3, ge=0, le=1)
    dup_para_frac: float = ranged(0.3, ge=0, le=1)
    dup_line_char_frac: float = ranged(0.2, ge=0, le=1)
    dup_para_char_frac: float = ranged(0.2, ge=0, le=1)
    top_ngram_sizes: list[int] = ranged(factory=lambda: [2, 3, 4], ge=1, le=100)
    top_ngram_max_fracs: list[float] = ranged(factory=lambda: [0.20, 0.18, 0.16], ge=0, le=1)
    dup_ngram_sizes: list[int] = ranged(factory=lambda: [5, 6, 7, 8, 9, 10], ge=1, le=100)
    dup_ngram_max_fracs: list[float] = ranged(
        factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10], ge=0, le=1
    )

    def __post_init__(self) -> None:
        pairs = [
            ("top_ngram_sizes", "top_ngram_max_fracs"),
            ("dup_ngram_sizes", "dup_ngram_max_fracs"),
        ]
        for sizes, fracs in pairs:
            if len(getattr(self, sizes)) != len(getattr(self, fracs)):
                raise UserError(
                    f"recipe keys curate.gopher_repetition.{sizes} and "
                    f"curate.gopher_repetition.{fracs} must have the same length"
                )


@dataclass
class C4Config:
    filter_no_terminal_punct: bool = True
    """Drop lines that do not end in terminal punctuation (or end in an ellipsis)."""
    min_words_per_line: int = ranged(3, ge=0)
    max_word_length: int = ranged(1000, ge=1)
    min_num_sentences: int = ranged(5, ge=0)
    filter_javascript: bool = True
    filter_lorem_ipsum: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    remove_citations: bool = True
    """Remove Wikipedia-style citation marks such as [1] or [citation needed]."""


@dataclass
class FineWebConfig:
    line_punct_thr: float = ranged(0.12, ge=0, le=1)
    """Minimum share of lines ending in terminal punctuation."""
    short_line_thr: float = ranged(0.67, ge=0, le=1)
    """Maximum share of lines of at most short_line_length characters."""
    short_line_length: int = ranged(30, ge=0)
    char_duplicates_ratio: float = ranged(0.01, ge=0, le=1)
    """Maximum share of characters in lines that repeat an earlier line."""
    new_line_ratio: float = ranged(0.3, ge=0)
    """Maximum newlines per word (list-like pages)."""


@dataclass
class CurateConfig:
    steps: list[str] = field(default_factory=lambda: list(DEFAULT_STEPS))
    """The curation steps, in order. Known: html, normalize, langid, gopher_repetition,
    gopher_quality, c4, fineweb, quality, exact_dedup, near_dedup, pii."""

    # Reading
    text_field: str = "text"
    """Field holding the text in JSON Lines and Parquet inputs."""
    id_field: str = "id"
    text_separator: str = ""
    """Regular expression splitting plain-text files into documents; empty: a file is a document.
    TinyStories (stories on single newlines, paragraphs on blank lines): '(?<!\\n)\\n(?!\\n)'."""
    max_doc_chars: int = ranged(5_000_000, ge=1)
    """Longer documents are set aside as bad input."""
    max_line_chars: int = ranged(1_000_000, ge=1)
    """A document with a longer line is set aside as bad input."""
    max_invalid_char_ratio: float = ranged(0.05, ge=0, le=1)
    """Documents with more characters decoded by replacement than this share are set aside."""

    # Language ID (fastText lid.176)
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_lang_score: float = ranged(0.65, ge=0, le=1)

    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)

    # Quality classifier
    quality_model: str = ""
    """fastText model from `scratchlm curate train-quality`; required by the quality step."""
    quality_threshold: float = ranged(0.5, ge=0, le=1)
    """Documents whose probability of being reference-like text is lower are dropped."""

    # Dedup
    minhash_ngram: int = ranged(5, ge=1, le=1000)
    minhash_bands: int = ranged(14, ge=1, le=1024)
    minhash_rows: int = ranged(8, ge=1, le=1024)
    minhash_seed: int = ranged(1, ge=0, le=2**32 - 1)
    near_dedup_threshold: float = ranged(0.8, ge=0, le=1)
    """An LSH candidate pair is a duplicate only when the exact Jaccard of the two documents'
    shingle sets is at least this; 0 trusts LSH alone."""

    # PII
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP>"

    # Execution
    executor: Literal["local", "ray"] = "local"
    """local: processes on this machine; ray: tasks on a Ray cluster (pip install 'scratchlm[ray]').
    Also used by `scratchlm tokenize`. The results are the same."""
    ray_address: str = ""
    """The Ray cluster: "" starts one on this machine for the run, "auto" joins the cluster this
    machine is part of, "HOST:PORT" joins that one."""
    workers: int = ranged(0, ge=0, le=4096)
    """Tasks run at once: processes (local) or Ray tasks; 0 means one per core of the machine or
    of the Ray cluster."""
    shard_bytes: int = ranged(64 * 2**20, ge=0)
    """Uncompressed JSON Lines, WARC/WET (plain or gzipped per record) and Parquet files larger
    than this are split into ranges of about this size, read by separate tasks; 0: never split."""
    dedup_docs_per_task: int = ranged(100_000, ge=1)
    """Documents per dedup task (shuffle partitions and map groups hold about this many), which
    bounds each task's memory (about 60 MB per 100,000 documents); results do not depend on it."""


EXECUTION_KEYS = {"executor", "ray_address", "workers"}
"""Keys that change how a run executes, never its results."""
