from pathlib import Path

import pytest

from scratchlm.config import Recipe, load_recipe, parse_override, save_recipe
from scratchlm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_tiny_recipe_load():
    r = load_recipe(ROOT / "recipes/tiny.toml")
    assert r.model.dim == 128 and r.model.vocab_size == 2048
    assert r.pretrain.tokens_per_step == 8192
    assert isinstance(r.pretrain.lr, float)


def test_override_parses_toml_and_bare_words():
    assert parse_override("pretrain.lr=1e-3") == (["pretrain", "lr"], 1e-3)
    assert parse_override("pretrain.compile=true") == (["pretrain", "compile"], True)
    assert parse_override("pretrain.device=cuda") == (["pretrain", "device"], "cuda")
    assert parse_override('data.inputs=["a", "b"]') == (["data", "inputs"], ["a", "b"])
    r = load_recipe(None, ["model.dim=64", "pretrain.lr=1", "pretrain.device=cpu"])
    assert r.model.dim == 64 and r.pretrain.lr == 1.0 and r.pretrain.device == "cpu"


def test_unknown_key_names_itself_and_the_accepted_keys():
    with pytest.raises(
        UserError, match=r"unknown recipe key 'model\.dimm'.*accepts: dim, n_layers"
    ):
        load_recipe(None, ["model.dimm=3"])
    with pytest.raises(UserError, match="unknown recipe key 'modle'"):
        load_recipe(None, ["modle.dim=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dim=1.5", "model.dim = 1.5: expected an integer"),
        ("model.dim=true", "model.dim = True: expected an integer"),
        ("pretrain.compile=3", "pretrain.compile = 3: expected true or false"),
        ("pretrain.precision=fp8", "expected one of 'auto', 'fp32', 'bf16'"),
        ("data.inputs=[1]", "data.inputs = 1: expected a string"),
    ],
)
def test_wrong_type_is_one_line_naming_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_recipe(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_recipe_files(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndim = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(bad)


def test_saved_recipe_round_trips(tmp_path):
    r = load_recipe(ROOT / "recipes/tiny.toml", ['sample.prompts=["a \\"quoted\\" one"]'])
    save_recipe(r, tmp_path / "recipe.toml")
    again = load_recipe(tmp_path / "recipe.toml")
    assert again == r
    assert isinstance(again, Recipe)
