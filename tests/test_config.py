import dataclasses
import typing
from pathlib import Path

import pytest

from scratchlm import tokenizer
from scratchlm.config import MIN_VOCAB_SIZE, Recipe, load_recipe, parse_override, save_recipe
from scratchlm.errors import UserError
from scratchlm.schema import field_range

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


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.micro_batch_size=0", "pretrain.micro_batch_size = 0: expected an integer >= 1"),
        ("pretrain.tokens_per_step=-8", "pretrain.tokens_per_step = -8: expected an integer >= 1"),
        ("model.ffn_dim=-64", "model.ffn_dim = -64: expected an integer in [0, 262144]"),
        ("pretrain.seed=-1", "pretrain.seed = -1: expected an integer in [0, 4294967295]"),
        ("pretrain.lr=inf", "pretrain.lr = inf: expected a number in [0, 100]"),
        ("pretrain.lr=nan", "pretrain.lr = nan: expected a number in [0, 100]"),
        ("pretrain.lr=-1", "pretrain.lr = -1.0: expected a number in [0, 100]"),
        ("pretrain.beta2=2", "pretrain.beta2 = 2.0: expected a number in [0, 1)"),
        ("pretrain.max_steps=-1", "pretrain.max_steps = -1: expected an integer >= 1"),
        ("sft.max_steps=0", "sft.max_steps = 0: expected an integer >= 1"),
        ("grpo.group_size=1", "grpo.group_size = 1: expected an integer >= 2"),
        ("reward.margin=-inf", "reward.margin = -inf: expected a finite number"),
        ("eval.batch_size=0", "eval.batch_size = 0: expected an integer >= 1"),
        ("tokenizer.min_frequency=0", "tokenizer.min_frequency = 0: expected an integer >= 1"),
        ("model.vocab_size=100", "model.vocab_size = 100: expected an integer in [263, 2097152]"),
        ("curate.fineweb.line_punct_thr=1.5", "line_punct_thr = 1.5: expected a number in [0, 1]"),
        ("curate.gopher_repetition.dup_ngram_sizes=[5, 0]", "dup_ngram_sizes = 0: expected"),
        ("parallel.dp_shard=0", "parallel.dp_shard = 0: expected an integer >= 1, or -1"),
        ("model.dim=130", "model.dim = 130, model.n_heads = 4: dim must be n_heads x an even"),
        ("model.n_kv_heads=3", "n_heads must be a multiple of n_kv_heads"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(override, message):
    with pytest.raises(UserError) as e:
        load_recipe(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_deeply_nested_and_long_values_are_one_short_line():
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(UserError, match="pretrain.lr': the value is nested too deeply"):
        load_recipe(None, [f"pretrain.lr={deep}"])
    with pytest.raises(UserError) as e:
        load_recipe(None, ["pretrain.lr=" + "[" * 50 + "]" * 50])
    with pytest.raises(UserError) as long_key:
        load_recipe(None, ["model." + "x" * 5000 + "=1"])
    for error in (e, long_key):
        assert len(str(error.value)) < 1000 and "\n" not in str(error.value)


def _numeric_fields(cls: type, prefix: str = ""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        elif (typing.get_args(tp) or (tp,))[0] in (int, float) and tp is not bool:
            yield cls, f.name, f"{prefix}{f.name}"


def test_every_numeric_key_has_a_range_that_holds_its_default():
    recipe = Recipe()
    keys = []
    for cls, name, key in _numeric_fields(Recipe):
        bounds = field_range(cls, name)
        assert bounds is not None, f"{key} has no range"
        value: object = recipe
        for part in key.split("."):
            value = getattr(value, part)
        for number in value if isinstance(value, list) else [value]:
            assert bounds.contains(number), key
        keys.append(key)
    assert len(keys) > 100 and "curate.minhash_bands" in keys and "ppo.kl_coef" in keys
    assert MIN_VOCAB_SIZE == tokenizer.MIN_VOCAB_SIZE


def test_a_saved_recipe_reads_back_with_control_characters_in_strings(tmp_path):
    """TOML forbids a raw DEL (U+007F) in a string, which JSON's escaping lets through."""
    recipe = load_recipe(None, ['sft.data=["a\\u007fb\\u0001c"]'])
    assert recipe.sft.data == ["a\x7fb\x01c"]
    save_recipe(recipe, tmp_path / "recipe.toml")
    assert load_recipe(tmp_path / "recipe.toml") == recipe
