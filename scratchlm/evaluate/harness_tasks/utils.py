"""Prompt functions of the scratchlm_* harness tasks that a Jinja template cannot express.

lm-evaluation-harness loads `!function utils.NAME` from this file; the definitions are those of
its own copa and winogrande tasks. mmlu_<subject> picks one subject's questions of the split
being read (test, or dev for the few-shot examples) out of the single MMLU file.
"""


def copa_text(doc):
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def _lowercase_first(choice):
    return choice[0].lower() + choice[1:]


def copa_choices(doc):
    return [" " + _lowercase_first(doc["choice1"]), " " + _lowercase_first(doc["choice2"])]


def copa_target(doc):
    return copa_choices(doc)[doc["label"]]


def winogrande_text(doc):
    # An index: the choices are the contexts, and this one is correct.
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_choices(doc):
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def __getattr__(name):
    """mmlu_<subject>: the subject's records of the split being read."""
    if not name.startswith("mmlu_"):
        raise AttributeError(name)
    subject = name.removeprefix("mmlu_")

    def select(dataset):
        split = str(dataset.split)
        return dataset.filter(lambda d: d["subject"] == subject and d["split"] == split)

    return select
