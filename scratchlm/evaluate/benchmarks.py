"""The multiple-choice benchmarks, each prompted as its lm-evaluation-harness task is.

Each class says where the harness's YAML of the same name (lm_eval/tasks/...) puts the question,
the choices and the answer; the files are the ones in data/eval (see its README for origins).
"""

from __future__ import annotations

from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.evaluate.tasks import (
    MultipleChoiceTask,
    PartialScoringTask,
    Subset,
    register_task,
)


class HellaSwag(MultipleChoiceTask):
    """hellaswag.yaml; the file holds the harness's preprocessed query and endings already."""

    name, harness_name = "hellaswag", "scratchlm_hellaswag"
    file = "hellaswag_val_subsample1000_olmes.jsonl.gz"
    fields = ("query", "choices", "gold")

    def text(self, doc):
        return doc["query"]

    def choices(self, doc):
        return doc["choices"]

    def gold(self, doc):
        return int(doc["gold"])


class ArcEasy(MultipleChoiceTask):
    """arc/arc_easy.yaml."""

    name, harness_name = "arc_easy", "scratchlm_arc_easy"
    file = "arc_easy_validation.jsonl.gz"
    fields = ("question", "choices", "answerKey")

    def text(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def choices(self, doc):
        return doc["choices"]["text"]

    def gold(self, doc):
        return doc["choices"]["label"].index(doc["answerKey"])


class ArcChallenge(ArcEasy):
    name, harness_name = "arc_challenge", "scratchlm_arc_challenge"
    file = "arc_challenge_validation.jsonl.gz"


class Piqa(MultipleChoiceTask):
    """piqa/piqa.yaml."""

    name, harness_name = "piqa", "scratchlm_piqa"
    file = "piqa_validation.jsonl.gz"
    fields = ("goal", "sol1", "sol2", "label")

    def text(self, doc):
        return f"Question: {doc['goal']}\nAnswer:"

    def choices(self, doc):
        return [doc["sol1"], doc["sol2"]]

    def gold(self, doc):
        return int(doc["label"])


class OpenBookQA(MultipleChoiceTask):
    """openbookqa/openbookqa.yaml: the bare question stem, no "Question:" prefix."""

    name, harness_name = "openbookqa", "scratchlm_openbookqa"
    file = "openbookqa_validation.jsonl.gz"
    fields = ("question_stem", "choices", "answerKey")

    def text(self, doc):
        return doc["question_stem"]

    def choices(self, doc):
        return doc["choices"]["text"]

    def gold(self, doc):
        return doc["choices"]["label"].index(doc["answerKey"].lstrip())


class Copa(MultipleChoiceTask):
    """super_glue/copa: the premise without its period, joined by "because" or "therefore";
    the choices start lowercase after a space (and the target delimiter adds another)."""

    name, harness_name = "copa", "scratchlm_copa"
    file = "copa_validation.jsonl.gz"
    fields = ("premise", "choice1", "choice2", "question", "label")
    reported = ("acc",)

    def text(self, doc):
        connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
        return doc["premise"].strip()[:-1] + f" {connector}"

    def choices(self, doc):
        return [" " + c[0].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]

    def gold(self, doc):
        return int(doc["label"])


class BoolQ(MultipleChoiceTask):
    """super_glue/boolq."""

    name, harness_name = "boolq", "scratchlm_boolq"
    file = "boolq_validation.jsonl.gz"
    fields = ("passage", "question", "answer")
    reported = ("acc",)

    def text(self, doc):
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"

    def choices(self, doc):
        return ["no", "yes"]

    def gold(self, doc):
        return int(bool(doc["answer"]))


class CommonsenseQA(MultipleChoiceTask):
    """commonsense_qa/default.yaml: the options listed in the prompt, the letter scored."""

    name, harness_name = "commonsense_qa", "scratchlm_commonsense_qa"
    file = "commonsense_qa_validation.jsonl.gz"
    fields = ("question", "choices", "answerKey")
    reported = ("acc",)

    def text(self, doc):
        options = "".join(
            f"\n{letter}. {text}"
            for letter, text in zip("ABCDE", doc["choices"]["text"], strict=False)
        )
        return f"Question: {doc['question'].strip()}{options}\nAnswer:"

    def choices(self, doc):
        return ["A", "B", "C", "D", "E"]

    def gold(self, doc):
        return self.choices(doc).index(doc["answerKey"])


class SocialIQa(MultipleChoiceTask):
    """siqa/siqa.yaml."""

    name, harness_name = "social_iqa", "scratchlm_social_iqa"
    file = "social_i_qa_validation.jsonl.gz"
    fields = ("context", "question", "answerA", "answerB", "answerC", "label")
    reported = ("acc",)

    def text(self, doc):
        return f"Q: {doc['context']} {doc['question']}\nA:"

    def choices(self, doc):
        return [doc["answerA"], doc["answerB"], doc["answerC"]]

    def gold(self, doc):
        return int(doc["label"]) - 1


class WinoGrande(PartialScoringTask):
    """winogrande/default.yaml: each option fills the blank, and the rest of the sentence after
    the blank is the continuation scored."""

    name, harness_name = "winogrande", "scratchlm_winogrande"
    file = "winogrande_xl_validation.jsonl.gz"
    fields = ("sentence", "option1", "option2", "answer")

    def choices(self, doc):
        blank = doc["sentence"].index("_")
        return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]

    def continuation(self, doc):
        return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()

    def gold(self, doc):
        return {"1": 0, "2": 1}[str(doc["answer"])]


class MMLU(MultipleChoiceTask):
    """mmlu/default: one subtask per subject, few-shot examples the first K of the subject's dev
    split; the group score weights subjects by their number of questions."""

    name, harness_name = "mmlu", "scratchlm_mmlu"
    file = "mmlu_test_val_dev.jsonl.gz"
    fields = ("question", "subject", "choices", "answer", "split")
    reported = ("acc",)
    sampler = "first_n"

    def subsets(self, path, options):
        records = self.read(path)
        subjects = sorted({r["subject"] for r in records})
        subsets = []
        for subject in subjects:
            docs = [r for r in records if r["subject"] == subject and r["split"] == "test"]
            dev = [r for r in records if r["subject"] == subject and r["split"] == "dev"]
            if docs:
                subsets.append(Subset(subject, docs, dev, pool_is_docs=False))
        if not subsets:
            raise UserError(f"{path}: no records with split 'test' for the {self.name} task")
        return subsets

    def description(self, doc):
        subject = doc["subject"].replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n"

    def text(self, doc):
        options = "".join(
            f"\n{letter}. {text}" for letter, text in zip("ABCD", doc["choices"], strict=False)
        )
        return f"{doc['question'].strip()}{options}\nAnswer:"

    def choices(self, doc):
        return ["A", "B", "C", "D"]

    def gold(self, doc):
        return int(doc["answer"])


class MMLUFiveShot(MMLU):
    name = "mmlu_5shot"
    default_shots = 5


class BLiMP(MultipleChoiceTask):
    """blimp: each minimal pair scored whole after the bos token, the grammatical sentence
    first; one subtask per paradigm file, the group score their plain mean."""

    name, harness_name = "blimp", "scratchlm_blimp"
    file = "blimp"
    fields = ("sentence_good", "sentence_bad")
    reported = ("acc",)
    fixed_shots = True
    weight_by_size = False

    def subsets(self, path, options):
        files = [path] if path.is_file() else paradigm_files(path)
        return [Subset(paradigm_name(f), self.read(f), [], pool_is_docs=True) for f in files]

    def text(self, doc):
        return ""

    def choices(self, doc):
        return [doc["sentence_good"], doc["sentence_bad"]]

    def gold(self, doc):
        return 0


def paradigm_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"evaluation data not found: {folder} (a folder of BLiMP .jsonl files)")
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise UserError(f"{folder}: no .jsonl or .jsonl.gz files for the blimp task")
    return files


def paradigm_name(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".jsonl")


for _task in (
    HellaSwag,
    ArcEasy,
    ArcChallenge,
    Piqa,
    OpenBookQA,
    Copa,
    BoolQ,
    CommonsenseQA,
    SocialIQa,
    WinoGrande,
    MMLU,
    MMLUFiveShot,
    BLiMP,
):
    register_task(_task())
