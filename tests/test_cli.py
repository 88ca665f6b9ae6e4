"""User mistakes get one line on stderr and exit code 2, never a traceback."""

import argparse
import json

import pytest
from run_snapshot import snapshot
from tiny_run import make_run

from scratchlm.cli import build_parser, build_train_quality_parser, main


def _one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


def test_missing_run_folder(cli, tmp_path):
    _one_line_error(cli("pretrain", "--run-dir", str(tmp_path / "nope")), "run folder not found")


def test_missing_recipe_file(cli, tmp_path):
    r = cli("pipeline", str(tmp_path / "missing.toml"), "--run-dir", str(tmp_path / "run"))
    _one_line_error(r, "recipe file not found")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.widht=3", "unknown recipe key 'model.widht'"),
        ("pretrain.max_steps=ten", "pretrain.max_steps = 'ten': expected an integer"),
    ],
)
def test_bad_recipe_key(cli, tmp_path, override, fragment):
    _one_line_error(cli("tokenize", "--run-dir", str(tmp_path), "--set", override), fragment)


def test_generate_without_checkpoint(cli, tmp_path):
    (tmp_path / "recipe.toml").write_text("")
    _one_line_error(cli("generate", str(tmp_path), "--prompt", "hi"), "no checkpoint")
    _one_line_error(cli("generate", str(tmp_path / "nope"), "--prompt", "hi"), "not found")


def test_empty_corpus(cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = cli("pipeline", "--run-dir", str(tmp_path / "run"), "--set", f'data.inputs=["{empty}"]')
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_bad_until_stage(cli, tmp_path):
    _one_line_error(cli("pipeline", "--run-dir", str(tmp_path), "--until", "train"), "--until")


def _refused(capsys, argv: list[str], fragment: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


@pytest.fixture
def trained_run(tmp_path):
    """A run with a pretrain and an sft checkpoint, and the recipe it was made with."""
    from scratchlm.checkpoint import load_checkpoint, save_checkpoint
    from scratchlm.config import load_recipe, save_recipe

    run = make_run(tmp_path / "run")
    ckpt = load_checkpoint(run / "pretrain")
    save_checkpoint(run / "sft", 10, ckpt.tensors, ckpt.model_config, {"step": 10})
    save_recipe(load_recipe(None, ["sft.max_steps=10"]), run / "recipe.toml")
    return run


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["sft", "--set", 'sft.data=["bad.jsonl"]'], "data file not found: bad.jsonl"),
        (["sft", "--set", "sft.data=[GARBAGE]"], "sft.data: no usable conversations in"),
        (["reward", "--set", "reward.data=[GARBAGE]"], "reward.data: no usable preference pairs"),
        (["grpo", "--set", "grpo.data=[GARBAGE]"], "grpo.data: no usable prompts in"),
        (["ppo"], "ppo scores answers with the reward model, but"),
        (["grpo", "--set", "grpo.reward_fn=nope:fn"], "grpo.reward_fn"),
        (["sft", "--set", "sft.init_from=nowhere"], "sft.init_from = 'nowhere': not found"),
        (["sft", "--set", "sft.lr=nan"], "recipe key sft.lr = nan"),
        (["sft", "--set", "ppo.rollout_batch=10"], "rollout_batch must be a multiple of"),
        (["pretrain", "--set", "pretrain.micro_batch_size=0"], "micro_batch_size = 0"),
        (["pretrain"], "pretrain reads"),
        (["tokenize"], "tokenize reads"),
        (["dpo", "--resume", "--set", "dpo.data=[]"], "dpo.data: no usable preference pairs"),
        (["curate", "--set", "curate.steps=['html', 'nope']"], "unknown curate step 'nope'"),
        (["curate", "--set", "curate.steps=['quality']"], "needs curate.quality_model"),
        (["pipeline", "--set", "curate.steps=['pii', 'pii']"], "names a step twice"),
        (["pipeline", "--until", "pretrian"], "--until 'pretrian': expected one of"),
        (["pipeline", "--set", 'data.inputs=["nowhere/*.txt"]'], "input not found"),
    ],
)
def test_a_refused_command_leaves_the_run_as_it_was(trained_run, tmp_path, capsys, argv, fragment):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('not json\n{"text": "no messages"}\n[1, 2]\n')
    argv = [a.replace("GARBAGE", json.dumps(str(garbage))) for a in argv]
    before = snapshot(trained_run)
    _refused(capsys, [argv[0], "--run-dir", str(trained_run), *argv[1:]], fragment)
    assert snapshot(trained_run) == before
    assert not (trained_run.parent / "run" / "sft.prev").exists()


def test_a_stage_out_of_order_or_a_typo_makes_no_folder(tmp_path, capsys):
    fresh = tmp_path / "fresh"
    _refused(capsys, ["pipeline", "--run-dir", str(fresh), "--until", "pretrian"], "--until")
    _refused(capsys, ["pipeline", "--run-dir", str(fresh), "--set", "pretrain.lr=-1"], "lr = -1")
    assert not fresh.exists()
    run = make_run(tmp_path / "run")
    before = snapshot(run)
    _refused(capsys, ["ppo", "--run-dir", str(run)], "ppo starts from the sft model")
    _refused(capsys, ["dpo", "--run-dir", str(run)], "dpo starts from the sft model")
    assert snapshot(run) == before and not (run / "sft").exists() and not (run / "ppo").exists()


def test_a_rejected_override_is_not_saved(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text("[pretrain]\nlr = 0.001\n")
    result = cli("report", "--run-dir", str(run), "--set", "pretrain.beta2=2")
    assert result.returncode == 2 and "pretrain.beta2 = 2.0: expected" in result.stderr
    assert (run / "recipe.toml").read_text() == "[pretrain]\nlr = 0.001\n"
    assert sorted(p.name for p in run.iterdir()) == ["recipe.toml"]


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_of_every_subcommand_has_help():
    parsers = [("scratchlm", build_parser()), *_subparsers(build_parser())]
    parsers.append(("curate train-quality", build_train_quality_parser()))
    missing = [
        f"{name} {action.dest}"
        for name, parser in parsers
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert len(parsers) > 15 and missing == []


def test_generate_names_the_checkpoint_it_loaded(trained_run, capsys):
    args = ["--prompt", "To be", "--max-new-tokens", "3", "--temperature", "0"]
    assert main(["generate", str(trained_run), *args]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        f"generate: loaded {trained_run / 'sft' / 'step-000010'} (sft, step 10"
    )
    assert "the run's last stage with a checkpoint" in err[0]
    assert main(["generate", str(trained_run / "pretrain"), *args]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"generate: loaded {trained_run / 'pretrain' / 'step-000000'} (pretrain, step 0)"
    ]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--temperature", "nan", "--temperature nan: expected a number >= 0"),
        ("--temperature", "inf", "--temperature inf: expected a number >= 0"),
        ("--top-p", "2", "--top-p 2.0: expected a number in (0, 1]"),
        ("--top-k", "-3", "--top-k -3: expected an integer >= 0"),
        ("--max-new-tokens", "-5", "--max-new-tokens -5: expected an integer >= 0"),
    ],
)
def test_bad_sampling_options_are_refused_before_loading(tmp_path, capsys, option, value, message):
    for command in ("generate", "chat"):
        extra = ["--prompt", "hi"] if command == "generate" else []
        # the folder does not exist: the options are checked first, so that is not what is said
        _refused(capsys, [command, str(tmp_path / "nope"), *extra, option, value], message)
