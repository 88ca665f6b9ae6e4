"""lm-evaluation-harness as a client: a scratchlm model behind the harness's LM interface.

`ScratchLM` answers the harness's three requests the plain way, one row per request (right
padded, longest first), with none of the in-house scorer's sharing, so that comparing the two is
a real check. `run_harness` runs scratchlm_* tasks (harness_yaml.py) offline through it:

    lm_eval.simple_evaluate(model=ScratchLM(model, tokenizer), tasks=["scratchlm_arc_easy"], ...)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scratchlm.errors import UserError
from scratchlm.evaluate.generation import generate_until, generation_budget
from scratchlm.evaluate.scoring import TextEncoder
from scratchlm.evaluate.tasks import EvalOptions, get_task
from scratchlm.tokenizer import Tokenizer

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the `eval` extra is not installed; run_harness says so
    TemplateLM = object  # type: ignore[assignment,misc]


class ScratchLM(TemplateLM):
    """A scratchlm Transformer and Tokenizer as an lm_eval LM."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        options: EvalOptions | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.scratch_tokenizer = tokenizer
        self.options = options or EvalOptions()
        self._encode = TextEncoder(tokenizer)

    @property
    def eot_token_id(self) -> int:
        return self.scratch_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.scratch_tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return generation_budget(self.max_length, self.options.max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        return "scratchlm"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self._encode(string)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.scratch_tokenizer.decode(tokens, skip_special=skip_special_tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.scratch_tokenizer.render_chat(chat_history, add_generation_prompt)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        runtime = self.options.runtime
        rows = []
        for index, (_, context, continuation) in enumerate(requests):
            continuation = continuation[-self.max_length :]  # as the in-house scorer does
            tokens = (context + continuation)[-(self.max_length + 1) :][:-1]
            rows.append((index, tokens, continuation))
        rows.sort(key=lambda r: -len(r[1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        size = self.options.batch_size
        for first in range(0, len(rows), size):
            batch = rows[first : first + size]
            width = len(batch[0][1])
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for b, (_, inp, _) in enumerate(batch):
                tokens[b, : len(inp)] = torch.tensor(inp)
            with runtime.autocast():
                logits = self.model(tokens.to(runtime.device))
            logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
            for b, (index, inp, continuation) in enumerate(batch):
                cont = torch.tensor(continuation)
                scored = logprobs[b, len(inp) - len(continuation) : len(inp)]
                greedy = bool((scored.argmax(-1) == cont).all())
                results[index] = (float(scored.gather(1, cont[:, None]).sum()), greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            (text,) = request.args
            windows = [
                ((None, None), *make_disjoint_window(w))
                for w in get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1
                )
            ]
            totals.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tokenizer = self.scratch_tokenizer
        stop_ids = [tokenizer.eos_id, *([tokenizer.end_id] if self.options.chat else [])]
        outputs: list[str] = [""] * len(requests)
        # Requests with the same settings run through the engine together.
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            _, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            budget = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault((until, budget), []).append(index)
        for (until, budget), indexes in groups.items():
            prompts = [self.tok_encode(requests[i].args[0]) for i in indexes]
            texts = generate_until(
                self.model, tokenizer, prompts, until, budget, stop_ids, self.options.batch_size
            )
            for i, text in zip(indexes, texts, strict=True):
                outputs[i] = text
        return outputs


METRIC_NAMES = {
    "exact_match,strict-match": "exact_match",
    "exact_match,flexible-extract": "exact_match_flexible",
}


def harness_tasks_for(names: list[str], options: EvalOptions, out_dir: Path) -> dict[str, str]:
    """Write the harness task files for the data these options read; in-house name -> harness
    task name."""
    from scratchlm.evaluate.harness_yaml import write_task_files
    from scratchlm.paths import resolve

    tasks = {name: get_task(name) for name in names}
    missing = [name for name, task in tasks.items() if task.harness_name is None]
    if missing:
        raise UserError(f"no lm-evaluation-harness task for {', '.join(missing)}")
    files = {}
    if options.data:
        files = {name: str(Path(options.data).expanduser().resolve()) for name in names}
    write_task_files(out_dir, str(resolve(options.data_dir).resolve()), files)
    return {name: task.harness_name for name, task in tasks.items()}  # type: ignore[misc]


def run_harness(
    lm: Any,
    names: list[str],
    options: EvalOptions,
    model_args: str | None = None,
    log_samples: bool = False,
    gen_kwargs: dict | None = None,
) -> tuple[dict[str, dict], dict]:
    """Run in-house task names through lm-evaluation-harness with `lm` (a ScratchLM, or a
    harness model name such as "hf" with its model_args); scores in the in-house layout, and
    the harness's per-example samples when log_samples."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "--harness needs lm-evaluation-harness: pip install 'scratchlm[eval]' "
            "(with torch pinned in the same command)"
        ) from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstrap errors in-process: no pool start
    scores: dict[str, dict] = {}
    samples: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        mapping = harness_tasks_for(names, options, Path(folder))
        manager = TaskManager(include_path=folder, include_defaults=False)
        for name, harness_name in mapping.items():
            task = get_task(name)
            shots = getattr(task, "default_shots", 0) if options.shots is None else options.shots
            out = lm_eval.simple_evaluate(
                model=lm,
                model_args=model_args,
                tasks=[harness_name],
                num_fewshot=shots,
                limit=options.limit or None,
                task_manager=manager,
                bootstrap_iters=1000,
                log_samples=log_samples,
                apply_chat_template=options.chat,
                fewshot_as_multiturn=options.chat,
                gen_kwargs=gen_kwargs,
                batch_size=options.batch_size,
            )
            scores[name] = _scores(out, harness_name)
            if log_samples:
                samples[name] = out.get("samples", {})
    return scores, samples


def _scores(out: dict, harness_name: str) -> dict[str, Any]:
    table = out["results"][harness_name]
    result: dict[str, Any] = {}
    for key, value in table.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        stderr = "_stderr," in key
        name = METRIC_NAMES.get(
            key.replace("_stderr", ""), key.split(",")[0].replace("_stderr", "")
        )
        result[f"{name}_stderr" if stderr else name] = float(value)
    counts = out.get("n-samples", {})
    group = out.get("group_subtasks", {}).get(harness_name) or [harness_name]
    result["n"] = sum(int(counts.get(t, {}).get("effective", 0)) for t in group)
    return result
