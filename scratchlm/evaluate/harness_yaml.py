"""lm-evaluation-harness task files (scratchlm_<task>.yaml) for the files the in-house tasks read.

The prompts are those of the harness's own tasks of the same name; only where the data lives
changes (`dataset_path: json` with `data_files`, so the harness runs offline) and, for
HellaSwag and LAMBADA, the field names of the files used here. The folder
scratchlm/evaluate/harness_tasks holds them for the bundled data/eval (paths relative to the
repository root); `scratchlm eval --write-harness-tasks DIR --data-dir D` writes them for
another copy of the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from scratchlm.evaluate.benchmarks import MMLU, paradigm_files, paradigm_name
from scratchlm.evaluate.data import read_jsonl
from scratchlm.evaluate.gsm8k import STOP_STRINGS
from scratchlm.evaluate.language_model import Perplexity
from scratchlm.evaluate.tasks import get_task
from scratchlm.paths import resolve

PACKAGE_TASKS = Path(__file__).parent / "harness_tasks"


class Function(str):
    """A `!function utils.name` reference to harness_tasks/utils.py."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Function, lambda d, v: d.represent_scalar("!function", str(v)))
# Prompts with newlines read best as one double-quoted line with \n escapes, as in the harness.
_Dumper.add_representer(
    str,
    lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style='"' if "\n" in v else None),
)

ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
VERSION = {"version": 1.0}


def _json(files: dict[str, str], **splits: str) -> dict[str, Any]:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": files}, **splits}


def _multiple_choice(name: str, file: str, text: Any, target: Any, choice: Any, norm=True):
    return {
        "task": name,
        **_json({"validation": file}, validation_split="validation"),
        "output_type": "multiple_choice",
        "doc_to_text": text,
        "doc_to_target": target,
        "doc_to_choice": choice,
        "metric_list": [ACC, ACC_NORM] if norm else [ACC],
        "metadata": VERSION,
    }


def task_configs(data_dir: str, files: dict[str, str] | None = None) -> dict[str, dict]:
    """File name -> YAML content, for tasks reading data_dir (or files[task] where given)."""

    def where(task: str) -> str:
        if files and task in files:
            return files[task]
        if task == "perplexity":  # a bundled file, wherever data_dir is
            absolute = Path(data_dir).is_absolute()
            return (
                str(resolve(Perplexity.default_file).resolve())
                if absolute
                else Perplexity.default_file
            )
        return f"{data_dir.rstrip('/')}/{get_task(task).file}"

    question = "Question: {{question}}\nAnswer:"
    configs = {
        "hellaswag": _multiple_choice(
            "scratchlm_hellaswag", where("hellaswag"), "{{query}}", "{{gold}}", "choices"
        ),
        "arc_easy": _multiple_choice(
            "scratchlm_arc_easy",
            where("arc_easy"),
            question,
            "{{choices.label.index(answerKey)}}",
            "{{choices.text}}",
        ),
        "arc_challenge": _multiple_choice(
            "scratchlm_arc_challenge",
            where("arc_challenge"),
            question,
            "{{choices.label.index(answerKey)}}",
            "{{choices.text}}",
        ),
        "piqa": _multiple_choice(
            "scratchlm_piqa",
            where("piqa"),
            "Question: {{goal}}\nAnswer:",
            "label",
            "{{[sol1, sol2]}}",
        ),
        "openbookqa": _multiple_choice(
            "scratchlm_openbookqa",
            where("openbookqa"),
            "question_stem",
            "{{choices.label.index(answerKey.lstrip())}}",
            "{{choices.text}}",
        ),
        "copa": _multiple_choice(
            "scratchlm_copa",
            where("copa"),
            Function("utils.copa_text"),
            Function("utils.copa_target"),
            Function("utils.copa_choices"),
            norm=False,
        ),
        "boolq": _multiple_choice(
            "scratchlm_boolq",
            where("boolq"),
            "{{passage}}\nQuestion: {{question}}?\nAnswer:",
            "{{1 if answer else 0}}",
            ["no", "yes"],
            norm=False,
        ),
        "commonsense_qa": _multiple_choice(
            "scratchlm_commonsense_qa",
            where("commonsense_qa"),
            "Question: {{ question.strip() }}\nA. {{choices['text'][0]}}\n"
            "B. {{choices['text'][1]}}\nC. {{choices['text'][2]}}\nD. {{choices['text'][3]}}\n"
            "E. {{choices['text'][4]}}\nAnswer:",
            "answerKey",
            ["A", "B", "C", "D", "E"],
            norm=False,
        ),
        "social_iqa": _multiple_choice(
            "scratchlm_social_iqa",
            where("social_iqa"),
            "Q: {{context}} {{question}}\nA:",
            "{{ (label|int) - 1 }}",
            "{{[answerA, answerB, answerC]}}",
            norm=False,
        ),
        "winogrande": _multiple_choice(
            "scratchlm_winogrande",
            where("winogrande"),
            Function("utils.winogrande_text"),
            Function("utils.winogrande_target"),
            Function("utils.winogrande_choices"),
            norm=False,
        ),
        "lambada": {
            "task": "scratchlm_lambada",
            # A validation split, as the other one-file tasks: few-shot examples then leave
            # out the example itself (the harness does not for a test split without a pool).
            **_json({"validation": where("lambada")}, validation_split="validation"),
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{' ' + continuation}}",
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                ACC,
            ],
            "metadata": VERSION,
        },
        "gsm8k": _gsm8k(where("gsm8k"), f"{data_dir.rstrip('/')}/gsm8k/train.jsonl.gz"),
        "perplexity": {
            "task": "scratchlm_perplexity",
            "dataset_path": "text",
            "dataset_kwargs": {
                "data_files": {"test": where("perplexity")},
                "sample_by": "paragraph",
            },
            "test_split": "test",
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": m, "aggregation": a, "higher_is_better": False}
                for m, a in [
                    ("word_perplexity", "weighted_perplexity"),
                    ("byte_perplexity", "weighted_perplexity"),
                    ("bits_per_byte", "bits_per_byte"),
                ]
            ],
            "metadata": VERSION,
        },
    }
    out = {f"scratchlm_{name}.yaml": config for name, config in configs.items()}
    out |= _mmlu(where("mmlu"))
    out |= _blimp(where("blimp"))
    return out


def _gsm8k(test: str, train: str) -> dict[str, Any]:
    return {
        "task": "scratchlm_gsm8k",
        **_json({"train": train, "test": test}, training_split="train", test_split="test"),
        "fewshot_split": "train",
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "num_fewshot": 5,
        "generation_kwargs": {"until": list(STOP_STRINGS), "do_sample": False, "temperature": 0.0},
        "filter_list": [
            {
                "name": "strict-match",
                "filter": [
                    {"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"},
                    {"function": "take_first"},
                ],
            },
            {
                "name": "flexible-extract",
                "filter": [
                    {
                        "function": "regex",
                        "group_select": -1,
                        "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)",
                    },
                    {"function": "take_first"},
                ],
            },
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": [",", r"\$", "(?s).*#### ", r"\.$"],
            }
        ],
        "metadata": VERSION,
    }


def _mmlu(file: str) -> dict[str, dict]:
    """One task per subject of the file (the test split scored, the dev split for few-shot
    examples, both picked out of the one file by utils.py) and the group scratchlm_mmlu."""
    out: dict[str, dict] = {}
    for subject in sorted({r["subject"] for r in read_jsonl(resolve(file))}):
        name = f"scratchlm_mmlu_{subject}"
        description = MMLU().description({"subject": subject})
        out[f"{name}.yaml"] = {
            "task": name,
            **_json({"test": file, "dev": file}, test_split="test"),
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "process_docs": Function(f"utils.mmlu_{subject}"),
            "description": description,
            "output_type": "multiple_choice",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
            "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer",
            "metric_list": [ACC],
            "metadata": VERSION,
        }
    out["scratchlm_mmlu.yaml"] = _group("scratchlm_mmlu", out, weight_by_size=True)
    return out


def _blimp(folder: str) -> dict[str, dict]:
    """One task per paradigm file and the group scratchlm_blimp (their plain mean)."""
    out: dict[str, dict] = {}
    for path in paradigm_files(resolve(folder)):
        uid = paradigm_name(path)
        name = f"scratchlm_blimp_{uid}"
        out[f"{name}.yaml"] = {
            "task": name,
            **_json({"validation": f"{folder.rstrip('/')}/{path.name}"}),
            "validation_split": "validation",
            "output_type": "multiple_choice",
            "doc_to_text": "",
            "doc_to_target": 0,
            "doc_to_choice": "{{[sentence_good, sentence_bad]}}",
            "num_fewshot": 0,
            "metric_list": [ACC],
            "metadata": VERSION,
        }
    out["scratchlm_blimp.yaml"] = _group("scratchlm_blimp", out, weight_by_size=False)
    return out


def _group(name: str, tasks: dict[str, dict], weight_by_size: bool) -> dict[str, Any]:
    return {
        "group": name,
        "task": [config["task"] for config in tasks.values()],
        "aggregate_metric_list": [
            {"metric": "acc", "aggregation": "mean", "weight_by_size": weight_by_size}
        ],
        "metadata": VERSION,
    }


def write_task_files(out_dir: Path, data_dir: str, files: dict[str, str] | None = None) -> Path:
    """Write every scratchlm_*.yaml and utils.py into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, config in task_configs(data_dir, files).items():
        text = yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
        (out_dir / name).write_text(text)
    (out_dir / "utils.py").write_text((PACKAGE_TASKS / "utils.py").read_text())
    return out_dir
