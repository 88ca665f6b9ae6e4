"""LAMBADA (last-word prediction) and perplexity / bits-per-byte on any text file."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np

from scratchlm.evaluate.data import read_paragraphs
from scratchlm.evaluate.scoring import mean_stderr, rolling_windows, score_requests
from scratchlm.evaluate.tasks import ScoredTask, Task, Turn, encoder, register_task
from scratchlm.paths import resolve


class Lambada(ScoredTask):
    """lambada/lambada_openai.yaml: the passage without its last word is the context, " word"
    the continuation. acc: greedy decoding gives the word exactly; perplexity: exp of minus the
    mean log-likelihood of the word (its standard error by the delta method)."""

    name, harness_name = "lambada", "scratchlm_lambada"
    file = "lambada_openai.jsonl.gz"
    fields = ("context", "continuation")
    needs_greedy = True

    def text(self, doc):
        return doc["context"]

    def answer(self, doc):
        return " " + doc["continuation"]

    def requests(self, prompt, doc, opening, delimiter):
        return [(prompt([*opening, Turn("user", self.text(doc))]), self.answer(doc))]

    def metrics(self, docs, scored):
        lls = [results[0][0] for results in scored]
        hits = [float(results[0][1]) for results in scored]
        ll_error = mean_stderr(lls)
        ppl = math.exp(-float(np.mean(lls)))
        return {
            "n": len(docs),
            "acc": float(np.mean(hits)),
            "acc_stderr": mean_stderr(hits),
            "perplexity": ppl,
            "perplexity_stderr": None if ll_error is None else ppl * ll_error,
            "chance": 0.0,
        }


class Perplexity(Task):
    """Perplexity and bits-per-byte of a text file, documents separated by blank lines, each
    scored in disjoint windows of the model's context (the harness's loglikelihood_rolling):
    bits_per_byte = -sum log p / bytes / ln 2, word and byte perplexity likewise."""

    name, harness_name = "perplexity", "scratchlm_perplexity"
    default_file = "data/eval/pride_and_prejudice_excerpt.txt"

    def run(self, model, tokenizer, options):
        started = time.perf_counter()
        path = Path(options.data).expanduser() if options.data else resolve(self.default_file)
        docs = read_paragraphs(path)
        if options.limit > 0:
            docs = docs[: options.limit]
        encode, prefix = encoder(tokenizer)
        max_len = model.config.max_seq_len
        windows = [[w] for doc in docs for w in rolling_windows(encode(doc), prefix, max_len)]
        scored = score_requests(model, windows, options.batch_size, options.runtime, greedy=False)
        total = sum(results[0][0] for results in scored)
        n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
        n_words = sum(len(re.split(r"\s+", doc)) for doc in docs)
        return {
            "n": len(docs),
            "bits_per_byte": -total / max(1, n_bytes) / math.log(2),
            "byte_perplexity": math.exp(-total / max(1, n_bytes)),
            "word_perplexity": math.exp(-total / max(1, n_words)),
            "file": str(path),
            "seconds": round(time.perf_counter() - started, 3),
        }


register_task(Lambada())
register_task(Perplexity())
