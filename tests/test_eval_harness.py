"""Same numbers as lm-evaluation-harness: the in-house tasks against the harness running the
scratchlm_* task files through the ScratchLM adapter, example by example."""

import gzip
import random

import pytest
import torch
from conftest import ROOT

from scratchlm.evaluate.harness import ScratchLM, run_harness
from scratchlm.evaluate.harness_yaml import PACKAGE_TASKS, write_task_files
from scratchlm.evaluate.scoring import rolling_windows
from scratchlm.evaluate.tasks import EvalOptions, get_task
from scratchlm.model import ModelConfig, Transformer
from scratchlm.tokenizer import train_tokenizer

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with gzip.open(ROOT / "data/tinystories/tinystories_train_head_lowercase.txt.gz", "rt") as f:
        text = f.read(200_000)
    folder = tmp_path_factory.mktemp("tok")
    tokenizer = train_tokenizer(text.split("\n"), 512, folder / "tokenizer.json")
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96, vocab_size=512)
    return Transformer(cfg).eval(), tokenizer


@pytest.mark.parametrize("task, shots", [("arc_easy", 2), ("winogrande", 1)])
def test_in_house_scores_equal_the_harness(tiny, task, shots):
    model, tokenizer = tiny
    options = EvalOptions(limit=25, shots=shots, batch_size=8, examples=True)
    ours = get_task(task).run(model, tokenizer, options)
    scores, samples = run_harness(
        ScratchLM(model, tokenizer, options), [task], options, log_samples=True
    )
    theirs = scores[task]
    assert ours["n"] == theirs["n"] == 25
    for metric in ("acc", "acc_norm"):
        if metric in theirs:
            assert abs(ours[metric] - theirs[metric]) * 100 <= 0.1, metric
    # Every request's log-likelihood, so the same choice on every example.
    harness_lls = {
        s["doc_id"]: [r[0][0] for r in s["resps"]] for s in samples[task][f"scratchlm_{task}"]
    }
    assert sorted(harness_lls) == list(range(25))
    for doc_id, example in enumerate(ours["examples"]):
        assert [ll for ll, _ in example] == pytest.approx(harness_lls[doc_id], abs=1e-3)


def test_rolling_windows_match_the_harness():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(1)
    for length in [1, 5, 16, 17, 40, 100]:
        tokens = [rng.randrange(50) for _ in range(length)]
        want = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(
                tokens, prefix_token=0, max_seq_len=16, context_len=1
            )
        ]
        assert rolling_windows(tokens, 0, 16) == [tuple(w) for w in want]


def test_packaged_task_files_are_up_to_date(tmp_path):
    write_task_files(tmp_path, "data/eval")
    written = {p.name: p.read_text() for p in tmp_path.iterdir()}
    packaged = {p.name: p.read_text() for p in PACKAGE_TASKS.iterdir() if p.is_file()}
    assert written == packaged
    assert "scratchlm_hellaswag.yaml" in written and "scratchlm_mmlu.yaml" in written
