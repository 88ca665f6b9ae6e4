"""PPO on a task where the truth is known: a tiny policy answers "What color is the X?" with each of
five colours equally often, and learns to say blue (from a rule, or from a reward model that learnt
the rule from pairs); checkpoints, resume, the CLI and bad input."""

import json
import math
import shutil

import pytest
import torch
from conftest import ROOT, run_cli
from rl_toy import color_chats, fine_tune, make_tokenizer, save_model, train_reward_model

from scratchlm.align import ppo
from scratchlm.checkpoint import load_checkpoint
from scratchlm.cli import main
from scratchlm.config import load_recipe
from scratchlm.errors import UserError
from scratchlm.train.metrics import read_metrics


@pytest.fixture(scope="module")
def color_run(tmp_path_factory):
    """A run folder with tokenizer.json, sft/ (the colour policy), reward/ and chats.jsonl."""
    run_dir = tmp_path_factory.mktemp("colors")
    chats = color_chats()
    (run_dir / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    tokenizer = make_tokenizer(run_dir / "tokenizer.json", chats)
    policy = fine_tune(tokenizer, chats, steps=400)
    save_model(policy, run_dir / "sft")
    save_model(train_reward_model(tokenizer, policy, steps=60), run_dir / "reward")
    return run_dir


def fresh(color_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(color_run, run_dir)
    return run_dir


def settings(run_dir, *more):
    return [
        f"ppo.data=['{run_dir / 'chats.jsonl'}']",
        "ppo.device='cpu'",
        "ppo.max_new_tokens=12",
        "ppo.rollout_batch=32",
        "ppo.minibatch_size=16",
        "ppo.micro_batch_size=8",
        "ppo.lr=5e-4",
        "ppo.min_lr=5e-4",
        "ppo.kl_coef=0.2",
        "ppo.val_fraction=0.2",
        "ppo.eval_every=0",
        "ppo.save_every=0",
        *more,
    ]


def test_ppo_against_a_rule_raises_success_to_090_within_a_kl_bound(color_run, tmp_path):
    run_dir = fresh(color_run, tmp_path)
    # The adaptive KL coefficient holds the drift near 2 nats: with a fixed 0.2 one CPU ended at
    # 1.73 nats and another at 4.14, over the bound below, for the same success.
    recipe = load_recipe(
        None,
        settings(
            run_dir, "ppo.reward_fn='rl_toy:likes_blue'", "ppo.kl_target=2.0", "ppo.kl_horizon=320"
        ),
    )
    recipe.ppo.max_steps = 40
    result = ppo.run(recipe, run_dir, progress=False)
    start = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] == 0)
    assert start["val_reward"] <= 0.4  # one answer in five says blue before PPO
    assert result["val_reward"] >= 0.9
    # Always answering blue and otherwise copying SFT costs log 5 nats per answer; PPO may
    # spend at most twice that.
    assert 0 < result["val_kl"] < 2 * math.log(5)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    logged = {"reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss"}
    logged |= {"explained_variance", "response_length", "end_rate", "generate_share"}
    logged |= {"rollout_tokens_per_s", "train_tokens_per_s", "tokens_per_s", "kl_coef"}
    assert logged <= rows[-1].keys() and {r["stage"] for r in rows} == {"ppo"}
    assert 0 < rows[-1]["generate_share"] < 1


def test_ppo_resumes_exactly(color_run, tmp_path):
    whole, part = fresh(color_run, tmp_path / "a"), fresh(color_run, tmp_path / "b")
    rule = "ppo.reward_fn='rl_toy:likes_blue'"
    ppo.run(load_recipe(None, settings(whole, rule, "ppo.max_steps=3")), whole, progress=False)
    ppo.run(load_recipe(None, settings(part, rule, "ppo.max_steps=2")), part, progress=False)
    recipe = load_recipe(None, settings(part, rule, "ppo.max_steps=3"))
    ppo.run(recipe, part, resume=True, progress=False)
    rows = [
        {r["step"]: r for r in read_metrics(d / "metrics.jsonl") if "loss" in r}
        for d in (whole, part)
    ]
    for key in ("loss", "value_loss", "reward", "kl"):
        assert rows[1][3][key] == pytest.approx(rows[0][3][key], rel=1e-5), key
    a, b = (load_checkpoint(d / "ppo") for d in (whole, part))
    for name in ("model", "critic"):
        for key, tensor in a.part(name)[0].items():
            torch.testing.assert_close(b.part(name)[0][key], tensor, msg=key)


def test_ppo_cli_against_the_reward_model(color_run, tmp_path):
    run_dir = fresh(color_run, tmp_path)
    sets = [
        x for s in settings(run_dir, "ppo.max_steps=12", "ppo.eval_every=6") for x in ("--set", s)
    ]
    done = run_cli("ppo", "--run-dir", str(run_dir), *sets, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("ppo: step 12, held-out reward") and "saved" in summary
    rows = read_metrics(run_dir / "metrics.jsonl")
    val = [r["val_reward"] for r in rows if "val_reward" in r]
    assert len(val) == 3 and val[-1] > val[0] + 1.0  # the reward model's scores rise
    ckpt = load_checkpoint(run_dir / "ppo")
    assert ckpt.part("critic")[1]["head"] == "scalar" and ckpt.model_config["head"] == "lm"
    assert ckpt.optimizer_state("critic") is not None
    again = run_cli(
        "ppo", "--run-dir", str(run_dir), "--resume", "--set", "ppo.max_steps=13",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 14))


def test_nan_rewards_skip_the_rollout_then_stop_with_a_checkpoint(color_run, tmp_path):
    import rl_toy

    run_dir = fresh(color_run, tmp_path)
    nan_first = "ppo.reward_fn='rl_toy:nan_at_first'"
    recipe = load_recipe(None, settings(run_dir, nan_first, "ppo.val_fraction=0.0"))
    recipe.ppo.max_steps = 2
    rl_toy.NAN_CALLS = 32  # one rollout batch of NaN rewards
    result = ppo.run(recipe, run_dir, progress=False)
    assert result["skipped_rollouts"] == 1 and result["step"] == 2

    rl_toy.NAN_CALLS = 10**9
    recipe.ppo.max_skipped_rollouts = 2
    with pytest.raises(UserError, match="3 rollouts had NaN rewards") as stop:
        ppo.run(recipe, run_dir, progress=False)
    assert "step-000000" in str(stop.value)
    assert load_checkpoint(run_dir / "ppo").trainer_state["step"] == 0


@pytest.mark.parametrize(
    "setting, message",
    [
        ("ppo.reward_fn='no_such_module:fn'", "cannot import no_such_module"),
        ("ppo.reward_fn='rl_toy:no_such_fn'", "has no function no_such_fn"),
        ("ppo.reward_fn='rl_toy:raises'", "raised ValueError: no reward today"),
        ("ppo.init_from='nowhere'", "ppo.init_from = 'nowhere': not found"),
        ("ppo.reward_model='nowhere'", "but nowhere has no checkpoint: run `scratchlm reward"),
        ("ppo.rollout_batch=20", "multiple of ppo.minibatch_size"),
        ("ppo.data=['missing.jsonl']", "data file not found: missing.jsonl"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(color_run, tmp_path, capsys, setting, message):
    run_dir = fresh(color_run, tmp_path)
    sets = [x for s in settings(run_dir, "ppo.max_steps=1", setting) for x in ("--set", s)]
    assert main(["ppo", "--run-dir", str(run_dir), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_ppo_needs_an_sft_checkpoint(tmp_path, capsys):
    (tmp_path / "recipe.toml").write_text("")
    assert main(["ppo", str(ROOT / "recipes/tiny.toml"), "--run-dir", str(tmp_path)]) == 2
    assert "run `scratchlm sft" in capsys.readouterr().err


def test_the_kl_coefficient_adapts_toward_its_target():
    from scratchlm.align.ppo import KLController

    cfg = load_recipe(None, ["ppo.kl_coef=0.1", "ppo.kl_target=2.0", "ppo.kl_horizon=1000"]).ppo
    kl = KLController(cfg)
    kl.update(8.0, responses=100)  # far above the target: the error is clipped to +0.2
    assert kl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    kl.update(1.8, responses=100)  # 10% below: the coefficient shrinks by 0.1 * 100 / 1000
    assert kl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    fixed = KLController(load_recipe(None, ["ppo.kl_coef=0.1"]).ppo)
    fixed.update(8.0, responses=100)
    assert fixed.value == 0.1


def test_ppo_refuses_sharded_layouts(color_run, tmp_path, capsys, monkeypatch):
    run_dir = fresh(color_run, tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 would
    sets = [x for s in settings(run_dir, "ppo.max_steps=1") for x in ("--set", s)]
    assert main(["ppo", "--run-dir", str(run_dir), *sets]) == 2
    assert "set parallel.dp_replicate=2, dp_shard=1" in capsys.readouterr().err


@pytest.mark.slow
def test_ppo_data_parallel_on_two_processes(color_run, tmp_path):
    import os
    import subprocess
    import sys

    run_dir = fresh(color_run, tmp_path)
    sets = settings(run_dir, "ppo.max_steps=2", "parallel.dp_replicate=2")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m"]
    cmd += ["scratchlm", "ppo", "--run-dir", str(run_dir), *(f"--set={s}" for s in sets)]
    done = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel 2" in done.stdout
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    ckpt = load_checkpoint(run_dir / "ppo")
    assert ckpt.trainer_state["step"] == 2 and ckpt.part("critic")[0]


def test_the_seeds_path_in_the_pipeline(cli, tmp_path):
    """pretrain -> sft -> reward -> ppo in `scratchlm pipeline`: SFT and PPO answers printed side by
    side, the PPO policy is the run's model, and a second run skips every stage."""
    import gzip
    import random

    from align_helpers import random_words, write_jsonl
    from test_pretrain import TINY

    from scratchlm.loading import latest_checkpoint_dir

    with gzip.open(ROOT / "data/tinystories/tinystories_train_head_lowercase.txt.gz", "rt") as f:
        (tmp_path / "stories.txt").write_text(f.read(60_000))
    rng = random.Random(0)
    chats, pairs = [], []
    for i in range(60):
        question = f"tell me about the {random_words(rng, 2)} {i}"
        chats.append({"instruction": question, "input": "", "output": random_words(rng, 5)})
        pairs.append({"prompt": question, "chosen": "yes " + random_words(rng, 3),
                      "rejected": random_words(rng, 4)})  # fmt: skip
    pair_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    sets = [
        f'data.inputs=["{tmp_path / "stories.txt"}"]',
        "curate.text_separator='(?<!\\n)\\n(?!\\n)'",
        *TINY,
        "model.max_seq_len=64",
        "pretrain.max_steps=4",
        'align.stages=["sft", "reward", "ppo"]',
        "align.prompts=['tell me about the cat']",
        "align.max_new_tokens=6",
        *(f"{s}.device='cpu'" for s in ("sft", "reward", "ppo")),
        f'sft.data=["{write_jsonl(tmp_path / "chat.jsonl", chats)}"]',
        "sft.max_steps=2",
        "sft.rows_per_step=4",
        f'reward.data=["{pair_file}"]',
        "reward.max_steps=2",
        "reward.pairs_per_step=8",
        f'ppo.data=["{pair_file}"]',
        "ppo.max_steps=2",
        "ppo.rollout_batch=8",
        "ppo.minibatch_size=4",
        "ppo.max_new_tokens=8",
        "ppo.eval_prompts=8",
        "sample.prompts=['the cat']",
        "sample.max_new_tokens=4",
    ]
    run = tmp_path / "run"
    args = ["pipeline", "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]
    first = cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    assert "== ppo\n" in out and any(line.startswith("ppo: step 2, ") for line in out.splitlines())
    assert ">>> tell me about the cat\n[sft] " in out and "\n[ppo] " in out
    assert latest_checkpoint_dir(run) == run / "ppo"
    again = cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0 and "== ppo: up to date, skipped" in again.stdout
