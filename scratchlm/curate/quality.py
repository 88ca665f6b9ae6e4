"""The quality classifier: fastText, reference text (books, Wikipedia) against raw web text.

This is the classifier recipe of GPT-3 and DCLM: a linear bag of word n-grams is fast enough to
score every document of a crawl, and tells curated prose from boilerplate well. Text is lowercased
before training and scoring, so casing (e.g. an all-lowercase corpus) does not decide the score.
"""

from __future__ import annotations

import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from scratchlm.curate.config import CurateConfig
from scratchlm.curate.langid import load_fasttext
from scratchlm.curate.readers import find_shards, read_shard
from scratchlm.curate.text import normalize
from scratchlm.errors import UserError

GOOD, BAD = "__label__hq", "__label__lq"
_PUNCT = re.compile(r"([.,!?;:()\[\]\"“”‘’])")
MAX_WORDS = 1000


def prepare(text: str) -> str:
    """One line of lowercased words with punctuation split off (fastText tokenises on spaces)."""
    return " ".join(_PUNCT.sub(r" \1 ", text.lower()).split()[:MAX_WORDS])


def _chunks(inputs: list[str], cfg: CurateConfig, chunk_words: int) -> Iterator[str]:
    """Pieces of about chunk_words words of every readable document of the inputs, so that a
    whole book gives many examples and a web page a few."""
    shards, _ = find_shards(inputs)
    for shard in shards:
        for doc in read_shard(shard, cfg):
            if "reason" in doc or doc["meta"].get("format") == "html":
                continue
            text, rejection, *_ = normalize(doc["text"], cfg)
            if rejection is not None:
                continue
            words = _PUNCT.sub(r" \1 ", text.lower()).split()  # all of it: prepare() truncates
            for i in range(0, len(words), chunk_words):
                piece = words[i : i + chunk_words]
                if len(piece) >= min(chunk_words, 20):
                    yield " ".join(piece)


def train_quality(
    positive: list[str],
    negative: list[str],
    out: Path,
    *,
    chunk_words: int = 100,
    max_examples_per_class: int = 20_000,
    valid_fraction: float = 0.1,
    epochs: int = 10,
    dim: int = 32,
    word_ngrams: int = 2,
    seed: int = 0,
    text_separator: str = "",
) -> dict:
    """Train the classifier, save it to `out` and return held-out accuracy, precision and recall.

    Classes are balanced by subsampling the larger one; the held-out examples are never trained on.
    """
    cfg = CurateConfig(text_separator=text_separator)
    rng = random.Random(seed)
    examples = {}
    for label, inputs in ((GOOD, positive), (BAD, negative)):
        texts = list(_chunks(inputs, cfg, chunk_words))
        if not texts:
            raise UserError(f"no usable text in {', '.join(inputs)} for the quality classifier")
        rng.shuffle(texts)
        examples[label] = texts
    n = min(len(v) for v in examples.values())
    n = min(n, max_examples_per_class)
    n_valid = max(1, int(n * valid_fraction))
    if n - n_valid < 10:
        raise UserError(f"too little text to train a quality classifier ({n} examples per class)")
    train = [(lab, t) for lab, texts in examples.items() for t in texts[n_valid:n]]
    valid = [(lab, t) for lab, texts in examples.items() for t in texts[:n_valid]]
    rng.shuffle(train)
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("".join(f"{lab} {t}\n" for lab, t in train))
        import fasttext

        model = fasttext.train_supervised(
            input=str(train_file),
            epoch=epochs,
            dim=dim,
            wordNgrams=word_ngrams,
            lr=0.5,
            minCount=2,
            bucket=200_000,
            thread=1,
            seed=seed,
            verbose=0,
        )
    labels, _ = model.predict([t for _, t in valid], k=1)
    predicted = [lab[0] for lab in labels]
    truth = [lab for lab, _ in valid]
    hits = sum(p == t for p, t in zip(predicted, truth, strict=True))
    true_good = sum(p == t == GOOD for p, t in zip(predicted, truth, strict=True))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_model(str(out))
    return {
        "accuracy": hits / len(valid),
        "precision": true_good / max(1, predicted.count(GOOD)),
        "recall": true_good / max(1, truth.count(GOOD)),
        "n_train": len(train),
        "n_valid": len(valid),
        "model": str(out),
    }


class QualityScorer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"quality model not found: {path} (train one: scratchlm curate train-quality)"
            )
        self.model = load_fasttext(path)

    def __call__(self, text: str) -> float:
        """Probability that the text is reference-like."""
        # k=1 only: with k=2, fasttext-wheel under numpy 2 repeats the top probability.
        labels, probs = self.model.predict([prepare(text)], k=1)
        top = float(probs[0][0])
        return top if labels[0][0] == GOOD else 1.0 - top
