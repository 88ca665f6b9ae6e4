"""User mistakes get one line on stderr and exit code 2, never a traceback."""

import pytest


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
