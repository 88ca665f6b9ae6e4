"""SFT and the reward model under torchrun (2 processes, gloo): the single-process losses."""

import os
import random
import shutil
import subprocess
import sys

import pytest
from align_helpers import random_words, tiny_run, write_jsonl
from conftest import ROOT, run_cli

from scratchlm.train.metrics import read_metrics

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def losses(run, stage):
    return [
        r["loss"]
        for r in read_metrics(run / "metrics.jsonl")
        if r["stage"] == stage and "loss" in r
    ]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.dp_replicate=2", "parallel.dp_shard=2"])
def test_sft_and_reward_data_parallel_match_one_process(tmp_path, layout):
    rng = random.Random(0)
    chats = [
        {"instruction": random_words(rng, 4), "output": random_words(rng, 5)} for _ in range(40)
    ]
    pairs = [{"prompt": random_words(rng, 3), "chosen": "yes " + random_words(rng, 2),
              "rejected": random_words(rng, 3)} for _ in range(40)]  # fmt: skip
    chat_file = write_jsonl(tmp_path / "chat.jsonl", chats)
    pair_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    sets = [f'sft.data=["{chat_file}"]', "sft.max_steps=3", "sft.rows_per_step=4",
            "sft.micro_batch_size=2", "sft.device='cpu'", f'reward.data=["{pair_file}"]',
            "reward.max_steps=3", "reward.pairs_per_step=8", "reward.micro_batch_size=4",
            "reward.device='cpu'", "align.max_new_tokens=2"]  # fmt: skip
    args = [a for s in sets for a in ("--set", s)]
    first = tiny_run(tmp_path, [random_words(rng, 40) for _ in range(20)])
    runs = {}
    for name, launcher in [("one", None), ("two", layout)]:
        run = runs[name] = shutil.copytree(first, tmp_path / name)
        for stage in ("sft", "reward"):
            if launcher is None:
                result = run_cli(stage, "--run-dir", str(run), *args)
            else:
                torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
                cmd = [*torchrun, "-m", "scratchlm", stage, "--run-dir", str(run), *args]
                cmd += ["--set", launcher]
                result = subprocess.run(cmd, env=ENV, text=True, capture_output=True, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("sft", "reward"):
        assert losses(runs["two"], stage) == pytest.approx(losses(runs["one"], stage), rel=1e-4)
