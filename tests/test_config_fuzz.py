"""Random `--set` overrides through the path the CLI takes (load_recipe with overrides), and a
few through the CLI itself: each is accepted, with every number of the recipe in its range, or
refused with a UserError naming the key; never another exception, and a refused command leaves
the run folder as it was."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import typing
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from run_snapshot import snapshot

from scratchlm.config import Recipe, load_recipe, save_recipe
from scratchlm.errors import UserError
from scratchlm.schema import field_range


def _schema(cls: type) -> dict[str, Any]:
    """{name: nested schema for a section, or the field's type for a key}."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _schema(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name]
        for f in dataclasses.fields(cls)
    }


SCHEMA = _schema(Recipe)


def _paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, sub in node.items():
        out.append(prefix + name)
        if isinstance(sub, dict):
            out += _paths(sub, f"{prefix}{name}.")
    return out


KNOWN = _paths(SCHEMA)
NAMES = sorted({p.rsplit(".", 1)[-1] for p in KNOWN})


def named_part(key: str) -> str:
    """What a refusal of `key` must name: the key up to its first unknown part, or up to the
    recipe key it reaches (a longer path goes below a key, into its value)."""
    node: Any = SCHEMA
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return ".".join(parts[:i])
        if part not in node:
            return ".".join(parts[: i + 1])
        node = node[part]
    return key


# TOML texts of every kind a user (or a typo) can give.
integers = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 64, 255, 2**31, 2**32, 2**63 - 1, -(2**63)]),
    st.integers(-(2**70), 2**70),
).map(str)
floats = st.floats(allow_nan=True, allow_infinity=True).map(
    lambda x: "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else repr(x)
)
fractions = st.floats(-2, 2, allow_nan=False).map(repr)
booleans = st.sampled_from(["true", "false"])
strings = st.text(max_size=30).map(lambda s: json.dumps(s, ensure_ascii=False))
choices = st.sampled_from(['"adamw"', '"muon"', '"wsd"', '"bf16"', '"skip"', '"ray"', '"k3"'])
bare = st.text(alphabet="abcxyzé日本-_ .:/", min_size=1, max_size=12)
scalars = st.one_of(integers, floats, fractions, booleans, strings, choices)
arrays = st.lists(scalars, max_size=5).map(lambda items: "[" + ", ".join(items) + "]")
tables = st.dictionaries(st.sampled_from(NAMES + ["x", "ключ"]), scalars, max_size=3).map(
    lambda d: "{" + ", ".join(f'"{k}" = {v}' for k, v in d.items()) + "}"
)
deep = st.tuples(st.integers(1, 3000), st.sampled_from(["[", "{a = "])).map(
    lambda t: t[1] * t[0] + "1" + ("]" if t[1] == "[" else "}") * t[0]
)
garbage = st.text(max_size=20)
plausible = st.one_of(st.integers(0, 64).map(str), st.floats(0, 1).map(repr), booleans, choices)
values = st.one_of(plausible, scalars, arrays, tables, deep, bare, garbage)


def _leaves(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, sub in node.items():
        if isinstance(sub, dict):
            out |= _leaves(sub, f"{prefix}{name}.")
        else:
            out[prefix + name] = sub
    return out


LEAVES = _leaves(SCHEMA)


def typed_value(tp: Any) -> st.SearchStrategy[str]:
    """TOML text of the key's own type, mostly near or inside its range."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return st.sampled_from([json.dumps(a) for a in typing.get_args(tp)])
    if origin is list:
        item = typed_value(typing.get_args(tp)[0])
        return st.lists(item, max_size=4).map(lambda items: "[" + ", ".join(items) + "]")
    if tp is bool:
        return booleans
    if tp is int:
        return st.integers(-3, 300).map(str)
    if tp is float:
        return st.one_of(st.floats(-0.5, 1.5).map(repr), st.sampled_from(["1e-4", "0.5", "2.0"]))
    return strings


typed = st.sampled_from(sorted(LEAVES)).flatmap(
    lambda key: typed_value(LEAVES[key]).map(lambda value: (key, value))
)

identifiers = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_éλ日", min_size=1, max_size=10)
keys = st.one_of(
    st.sampled_from(KNOWN),
    st.sampled_from(KNOWN),
    st.tuples(st.sampled_from(KNOWN), identifiers).map(".".join),  # an unknown or deeper key
    st.tuples(identifiers, st.sampled_from(NAMES)).map(".".join),  # an unknown section
)

tried = {"overrides": 0, "accepted": 0, "refused": 0}


def check_recipe_in_range(recipe: Any, cls: type = Recipe, prefix: str = "") -> None:
    for f in dataclasses.fields(cls):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            check_recipe_in_range(value, type(value), f"{prefix}{f.name}.")
            continue
        bounds = field_range(cls, f.name)
        numbers = value if isinstance(value, list) else [value]
        numbers = [n for n in numbers if isinstance(n, (int, float)) and not isinstance(n, bool)]
        if numbers:
            assert bounds is not None and all(bounds.contains(n) for n in numbers), prefix + f.name


def apply(overrides: list[str]) -> Recipe | UserError:
    tried["overrides"] += len(overrides)
    try:
        recipe = load_recipe(None, overrides)
    except UserError as e:
        tried["refused"] += 1
        return e
    tried["accepted"] += 1
    return recipe


@settings(
    max_examples=1200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.lists(st.one_of(typed, st.tuples(keys, values)), min_size=1, max_size=2))
def fuzz_overrides(tmp_path_factory, pairs):
    overrides = [f"{key}={value}" for key, value in pairs]
    outcome = apply(overrides)
    if isinstance(outcome, UserError):
        message = str(outcome)
        assert "\n" not in message and len(message) < 2000
        assert any(named_part(key) in message for key, _ in pairs), (overrides, message)
        return
    check_recipe_in_range(outcome)
    path = tmp_path_factory.getbasetemp() / "fuzz-recipe.toml"
    save_recipe(outcome, path)
    assert load_recipe(path) == outcome  # what is saved reads back the same


def test_random_overrides_are_accepted_in_range_or_refused_naming_the_key(tmp_path_factory):
    fuzz_overrides(tmp_path_factory=tmp_path_factory)  # hypothesis draws the overrides
    print(f"fuzz: {tried}")
    assert tried["overrides"] >= 1500 and tried["accepted"] > 100 and tried["refused"] > 500


CLI_POOL = [
    "pretrain.lr=nan",
    "pretrain.micro_batch_size=0",
    "model.ffn_dim=-64",
    "pretrain.lr=" + "[" * 4000 + "]" * 4000,
    "modle.dim=3",
    "sft.data=[1, 2]",
    "pretrain.seed=-1",
    "curate.fineweb.line_punct_thr=inf",
    "ppo.kl_coef=-0.5",
    "model.dim=12.5",
    "grpo.group_size=1",
    "pretrain={lr = 1e400}",
    "eval.limit=" + str(2**64),
    'tokenizer.min_frequency="два"',
    "model.vocab_size=1e12",
]


def test_refused_overrides_through_the_cli_leave_the_run_as_it_was(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_recipe(load_recipe(None, ["pretrain.lr=0.002"]), run / "recipe.toml")
    before = snapshot(run)
    for override in random.Random(0).sample(CLI_POOL, 6):
        in_process = apply([override])
        assert isinstance(in_process, UserError), override
        result = cli("pretrain", "--run-dir", str(run), "--set", override, timeout=120)
        assert result.returncode == 2, (override, result.stderr)
        assert result.stderr == f"error: {in_process}\n", override
        assert snapshot(run) == before, override
