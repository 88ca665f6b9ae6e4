"""Recipes: the TOML schema, loading, `--set` overrides and validation.

A recipe is one section per stage. Every key has a type and a default here; a key the schema does
not know, or a value of the wrong type, is a one-line UserError naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scratchlm.curate.config import CurateConfig
from scratchlm.errors import UserError
from scratchlm.paths import resolve


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=lambda: ["data/tinystories"])
    """Raw inputs of the run: files, folders or globs, relative to the working directory."""


@dataclass
class TokenizerConfig:
    max_chars: int = 50_000_000
    """Characters of the documents the BPE merges are learned from (the rest is only tokenized)."""
    min_frequency: int = 2


@dataclass
class TokensConfig:
    val_fraction: float = 0.02
    """Share of documents held out for validation."""
    workers: int = 0
    """Tokenizer processes; 0 means one per core."""


@dataclass
class ModelSection:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq_len: int = 256
    vocab_size: int = 2048
    """Also the size the tokenizer is trained to."""
    ffn_dim: int = 0
    """SwiGLU hidden size; 0 derives it from dim (8/3 * dim rounded up to a multiple of 64)."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True


@dataclass
class TrainConfig:
    """The keys every training stage has (pretrain, sft, reward, dpo, ppo, grpo); a stage's
    section adds its own and may change the defaults."""

    max_steps: int = 1000
    max_seconds: float = 0.0
    """Stop by wall clock after this many seconds of the stage (0: no limit)."""
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: Literal["adamw", "muon"] = "adamw"
    """muon: Muon for the 2-D hidden matrices (attention, MLP), AdamW (lr, weight_decay, beta1,
    beta2) for embeddings, the output head and norms."""
    muon_lr: float = 0.02
    """Muon's peak learning rate; the schedule scales it like lr."""
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    schedule: Literal["cosine", "wsd"] = "cosine"
    """After the warmup: cosine decay to min_lr, or wsd (warmup-stable-decay): the peak until the
    last decay_fraction of the run, then a linear decay to min_lr."""
    decay_fraction: float = 0.2
    """wsd: the share of the run (steps or max_seconds) spent decaying."""
    micro_batch_size: int = 32
    """Rows per forward pass; lowered (with a note) when a rank's share of the batch is smaller."""
    seed: int = 1337
    eval_every: int = 250
    save_every: int = 500
    keep_checkpoints: int = 2
    compile: bool = False
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPUs that support it, fp32 otherwise."""

    def __post_init__(self) -> None:
        if not 0.0 < self.decay_fraction <= 1.0:
            raise UserError(
                f"recipe key decay_fraction = {self.decay_fraction}: expected a number in (0, 1]"
            )


@dataclass
class PretrainConfig(TrainConfig):
    tokens_per_step: int = 8192
    """The global batch in tokens; gradient accumulation is derived from it."""
    eval_tokens: int = 65536
    """Validation tokens per evaluation."""
    init_from: str = ""
    """A checkpoint (or run folder) whose model and weights training starts from, instead of a
    freshly initialised [model] (for example one made by `scratchlm import-hf`)."""


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    seed: int = 0


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = 1
    """FSDP2 degree; -1: the world size divided by dp_replicate x tp x pp."""
    tp: int = 1
    pp: int = 1
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    activation_checkpointing: bool = False
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = 3


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the type `tp`; a UserError naming `key` when it does not fit."""
    origin = typing.get_origin(tp)
    ok = False
    if origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, key) for v in value]
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"recipe key {key} = {value!r}: expected {_describe(tp)}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise UserError(
                f"unknown recipe key {full!r}; {prefix.rstrip('.') or 'a recipe'} "
                f"accepts: {', '.join(names)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"recipe key {full!r} must be a [section] table")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value`, the value parsed as TOML; a bare word is a string."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def merge_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {text!r}: {part} is not a section")
        node[path[-1]] = value
    return values


def load_recipe(path: Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe (or the defaults when path is None), apply overrides and validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve(path)
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"recipe {path} is not valid TOML: {e}") from None
    values = merge_overrides(values, overrides or [])
    return _build(Recipe, values, "")


def to_toml(data: dict[str, Any]) -> str:
    """Write a recipe dict as TOML (nested sections of scalars and lists: all this schema needs)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # JSON's escapes are valid in TOML
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []

    def section(name: str, body: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in body.items() if not isinstance(v, dict))
        lines.append("")
        for k, v in body.items():
            if isinstance(v, dict):
                section(f"{name}.{k}", v)

    for name, body in data.items():
        section(name, body)
    return "\n".join(lines)


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(recipe.to_dict()))
