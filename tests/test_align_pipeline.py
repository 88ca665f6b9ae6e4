"""The alignment stages inside `scratchlm pipeline`, then evaluated, generated from and reported."""

import gzip
import json
import random

from align_helpers import random_words, write_jsonl
from conftest import ROOT
from test_pretrain import TINY

from scratchlm.loading import latest_checkpoint_dir


def test_pipeline_runs_align_stages_then_skips_them(cli, tmp_path):
    with gzip.open(ROOT / "data/tinystories/tinystories_train_head_lowercase.txt.gz", "rt") as f:
        (tmp_path / "stories.txt").write_text(f.read(60_000))
    rng = random.Random(0)
    chats, pairs = [], []
    for i in range(80):
        question = f"tell me about the {random_words(rng, 2)} {i}"
        chats.append({"instruction": question, "input": "", "output": random_words(rng, 5)})
        pairs.append({"prompt": question, "chosen": "yes " + random_words(rng, 3),
                      "rejected": random_words(rng, 4)})  # fmt: skip
    chat_file = write_jsonl(tmp_path / "chat.jsonl", chats)
    pair_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run = tmp_path / "run"
    sets = [
        f'data.inputs=["{tmp_path / "stories.txt"}"]',
        "curate.text_separator='(?<!\\n)\\n(?!\\n)'",
        *TINY,
        "model.max_seq_len=64",
        "pretrain.max_steps=6",
        'align.stages=["sft", "reward", "dpo"]',
        "align.prompts=['tell me about the cat']",
        "align.max_new_tokens=6",
        *(f"{s}.device='cpu'" for s in ("sft", "reward", "dpo")),
        f'sft.data=["{chat_file}"]',
        "sft.max_steps=3",
        "sft.rows_per_step=4",
        f'reward.data=["{pair_file}"]',
        "reward.max_steps=3",
        "reward.pairs_per_step=8",
        f'dpo.data=["{pair_file}"]',
        "dpo.max_steps=3",
        "dpo.pairs_per_step=8",
        "sample.prompts=['the cat']",
        "sample.max_new_tokens=4",
    ]
    args = ["pipeline", "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    for stage in ["sft", "reward", "dpo", "eval"]:
        assert f"== {stage}\n" in out
    # Every stage ends with one line saying what it made.
    for start in ["curate: ", "tokenizer: vocabulary of ", "tokenize: ", "pretrain: step 6",
                  "sft: 3 steps on ", "reward: 3 steps on ", "dpo: 3 steps on "]:  # fmt: skip
        assert any(line.startswith(start) for line in out.splitlines()), start
    assert ">>> tell me about the cat\n[sft] " in out and "\n[dpo] " in out
    assert "<h2>Alignment</h2>" in (run / "report.html").read_text()
    assert latest_checkpoint_dir(run) == run / "dpo"  # generate and load() use the last stage
    stages = json.loads((run / "stages.json").read_text())
    assert stages["reward"]["result"]["data"]["train"] + stages["reward"]["result"]["data"][
        "val"
    ] == len(pairs)

    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ["pretrain", "sft", "reward", "dpo"]:
        assert f"== {stage}: up to date, skipped" in again.stdout

    # A reward model on preference pairs (a run folder means its reward model) ...
    scored = cli("eval", str(run), "--tasks", "preference", "--data", str(pair_file), "--json")
    assert scored.returncode == 0, scored.stderr
    figures = json.loads(scored.stdout.strip().splitlines()[-1])["tasks"]["preference"]
    assert figures["scorer"] == "reward model" and figures["n"] == len(pairs)
    assert 0 <= figures["ci95"][0] <= figures["accuracy"] <= figures["ci95"][1] <= 1
    assert figures["usable_pairs"] == len(pairs)
    limited = cli("eval", str(run), "--tasks", "preference", "--data", str(pair_file),
                  "--limit", "3", "--json")  # fmt: skip
    assert limited.returncode == 0, limited.stderr
    assert f"the first 3 of the {len(pairs)} usable pairs in {pair_file}" in limited.stdout
    assert json.loads(limited.stdout.strip().splitlines()[-1])["tasks"]["preference"]["n"] == 3
    # ... and a policy by its implicit reward against the SFT model it started from.
    implicit = cli("eval", str(run / "dpo"), "--tasks", "preference", "--data", str(pair_file),
                   "--json")  # fmt: skip
    assert implicit.returncode == 0, implicit.stderr
    implicit_figures = json.loads(implicit.stdout.splitlines()[-1])["tasks"]["preference"]
    assert "implicit reward against" in implicit_figures["scorer"]
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": "not a pair"}])
    refused = cli("eval", str(run), "--tasks", "preference", "--data", str(empty))
    assert refused.returncode == 2 and refused.stderr.startswith("error: no usable preference")
