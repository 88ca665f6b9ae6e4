"""GSM8K: greedy generation after solved examples, the answer read after "#### " (exact match).

gsm8k/gsm8k.yaml of lm-evaluation-harness: "Question: ...\\nAnswer:" prompts with 5 random solved
examples from the train split, generation until "Question:", and two readings of the output:
strict ("#### N") and flexible (the last number in it).
"""

from __future__ import annotations

import re

import numpy as np

from scratchlm.evaluate.data import data_path
from scratchlm.evaluate.generation import generate_until, generation_budget
from scratchlm.evaluate.scoring import TextEncoder, mean_stderr
from scratchlm.evaluate.tasks import PromptTask, Subset, Turn, register_task, render

STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# Removed from both the answer and the reference before comparing, as the harness's metric does.
IGNORED = (",", r"\$", "(?s).*#### ", r"\.$")


def extract(text: str, pattern: re.Pattern, last: bool = False) -> str:
    """The first (or last) match of pattern in text, "[invalid]" when there is none."""
    matches = pattern.findall(text)
    if not matches:
        return "[invalid]"
    match = matches[-1 if last else 0]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "[invalid]")
    return match.strip()


def exact_match(prediction: str, reference: str) -> bool:
    for pattern in IGNORED:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    return prediction.lower() == reference.lower()


class GSM8K(PromptTask):
    name, harness_name = "gsm8k", "scratchlm_gsm8k"
    file = "gsm8k/test.jsonl.gz"
    train_file = "gsm8k/train.jsonl.gz"
    fields = ("question", "answer")
    default_shots = 5

    def subsets(self, path, options):
        pool = self.read(data_path(options.data_dir, self.train_file))
        return [Subset(self.name, self.read(path), pool, pool_is_docs=False)]

    def text(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def answer(self, doc):
        return doc["answer"]

    def evaluate(self, model, tokenizer, prepared, options):
        encode = TextEncoder(tokenizer)
        budget = generation_budget(model.config.max_seq_len, options.max_gen_toks)
        stop_ids = [tokenizer.eos_id, *([tokenizer.end_id] if options.chat else [])]
        parts = {}
        for name, docs, openings in prepared:
            prompts = [
                encode(render([*opening, Turn("user", self.text(doc))], tokenizer, options.chat))
                for doc, opening in zip(docs, openings, strict=True)
            ]
            outputs = generate_until(
                model, tokenizer, prompts, STOP_STRINGS, budget, stop_ids, options.batch_size
            )
            strict = [
                float(exact_match(extract(out, STRICT), doc["answer"]))
                for out, doc in zip(outputs, docs, strict=True)
            ]
            flexible = [
                float(exact_match(extract(out, FLEXIBLE, last=True), doc["answer"]))
                for out, doc in zip(outputs, docs, strict=True)
            ]
            parts[name] = {
                "n": len(docs),
                "exact_match": float(np.mean(strict)),
                "exact_match_stderr": mean_stderr(strict),
                "exact_match_flexible": float(np.mean(flexible)),
                "exact_match_flexible_stderr": mean_stderr(flexible),
                "chance": 0.0,
                "max_gen_toks": budget,
            }
        return parts


register_task(GSM8K())
