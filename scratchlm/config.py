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
from scratchlm.schema import check_range, ranged, show_value

MAX_SEED = 2**32 - 1
"""numpy's and Python's generators take seeds up to this."""
MIN_VOCAB_SIZE = 263
"""The 256 byte tokens and the 7 special tokens (scratchlm.tokenizer.MIN_VOCAB_SIZE)."""


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=lambda: ["data/tinystories"])
    """Raw inputs of the run: files, folders or globs, relative to the working directory."""


@dataclass
class TokenizerConfig:
    max_chars: int = ranged(50_000_000, ge=1)
    """Characters of the documents the BPE merges are learned from (the rest is only tokenized)."""
    min_frequency: int = ranged(2, ge=1)


@dataclass
class TokensConfig:
    val_fraction: float = ranged(0.02, ge=0, lt=1)
    """Share of documents held out for validation."""
    workers: int = ranged(0, ge=0, le=4096)
    """Tokenizer processes; 0 means one per core."""


@dataclass
class ModelSection:
    dim: int = ranged(128, ge=2, le=2**16)
    n_layers: int = ranged(4, ge=1, le=1024)
    n_heads: int = ranged(4, ge=1, le=1024)
    n_kv_heads: int = ranged(2, ge=1, le=1024)
    max_seq_len: int = ranged(256, ge=1, le=2**20)
    vocab_size: int = ranged(2048, ge=MIN_VOCAB_SIZE, le=2**21)
    """Also the size the tokenizer is trained to."""
    ffn_dim: int = ranged(0, ge=0, le=2**18)
    """SwiGLU hidden size; 0 derives it from dim (8/3 * dim rounded up to a multiple of 64)."""
    norm_eps: float = ranged(1e-5, gt=0, lt=1)
    rope_theta: float = ranged(10000.0, gt=0)
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        # The ranges of the single keys are checked when the recipe is read; these relate two.
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise UserError(
                f"recipe keys model.dim = {self.dim}, model.n_heads = {self.n_heads}: dim must be "
                "n_heads x an even head size"
            )
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"recipe keys model.n_heads = {self.n_heads}, model.n_kv_heads = "
                f"{self.n_kv_heads}: n_heads must be a multiple of n_kv_heads"
            )


@dataclass
class TrainConfig:
    """The keys every training stage has (pretrain, sft, reward, dpo, ppo, grpo); a stage's
    section adds its own and may change the defaults."""

    max_steps: int = ranged(1000, ge=1)
    max_seconds: float = ranged(0.0, ge=0)
    """Stop by wall clock after this many seconds of the stage (0: no limit)."""
    lr: float = ranged(3e-3, ge=0, le=100)
    min_lr: float = ranged(3e-4, ge=0, le=100)
    warmup_steps: int = ranged(50, ge=0)
    weight_decay: float = ranged(0.1, ge=0)
    beta1: float = ranged(0.9, ge=0, lt=1)
    beta2: float = ranged(0.95, ge=0, lt=1)
    grad_clip: float = ranged(1.0, ge=0)
    optimizer: Literal["adamw", "muon"] = "adamw"
    """muon: Muon for the 2-D hidden matrices (attention, MLP), AdamW (lr, weight_decay, beta1,
    beta2) for embeddings, the output head and norms."""
    muon_lr: float = ranged(0.02, ge=0, le=100)
    """Muon's peak learning rate; the schedule scales it like lr."""
    muon_momentum: float = ranged(0.95, ge=0, lt=1)
    muon_weight_decay: float = ranged(0.0, ge=0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    """After the warmup: cosine decay to min_lr, or wsd (warmup-stable-decay): the peak until the
    last decay_fraction of the run, then a linear decay to min_lr."""
    decay_fraction: float = ranged(0.2, gt=0, le=1)
    """wsd: the share of the run (steps or max_seconds) spent decaying."""
    micro_batch_size: int = ranged(32, ge=1)
    """Rows per forward pass; lowered (with a note) when a rank's share of the batch is smaller."""
    seed: int = ranged(1337, ge=0, le=MAX_SEED)
    eval_every: int = ranged(250, ge=0)
    save_every: int = ranged(500, ge=0)
    keep_checkpoints: int = ranged(2, ge=1)
    compile: bool = False
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPUs that support it, fp32 otherwise."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is NaN or infinite is never applied. stop: the run
    stops there; skip: the step is skipped and counted, and the run goes on."""
    nonfinite_limit: int = ranged(5, ge=1)
    """With on_nonfinite = "skip": this many skipped steps in a row stop the run, with a
    checkpoint."""


@dataclass
class PretrainConfig(TrainConfig):
    tokens_per_step: int = ranged(8192, ge=1)
    """The global batch in tokens; gradient accumulation is derived from it."""
    eval_tokens: int = ranged(65536, ge=1)
    """Validation tokens per evaluation."""
    init_from: str = ""
    """A checkpoint (or run folder) whose model and weights training starts from, instead of a
    freshly initialised [model] (for example one made by `scratchlm import-hf`)."""
    eval_tasks: list[str] = field(default_factory=list)
    """Benchmark tasks scored every eval_every steps during pretraining (cheap ones: hellaswag)."""
    eval_tasks_limit: int = ranged(200, ge=0)
    """Examples per in-loop task (the first ones of its file)."""


@dataclass
class AlignConfig:
    stages: list[Literal["sft", "reward", "dpo", "ppo", "grpo"]] = field(default_factory=list)
    """The stages after pretraining, in order (for example ["sft", "reward", "ppo"])."""
    prompts: list[str] = field(
        default_factory=lambda: ["Give three tips for staying healthy.", "What is a verb?"]
    )
    """Chat prompts each generating stage answers at its end (greedy), for the report."""
    max_new_tokens: int = ranged(64, ge=1)


@dataclass
class SFTConfig(TrainConfig):
    data: list[str] = field(default_factory=lambda: ["data/instruct"])
    """Chat files (any layout scratchlm.align.formats reads), folders or both."""
    val_fraction: float = ranged(0.1, ge=0, lt=1)
    """Share of prompts held out for validation (the same prompts in every stage)."""
    max_seq_len: int = ranged(0, ge=0)
    """Row length in tokens; 0: the model's context."""
    truncation: Literal["drop_oldest_turns", "none"] = "drop_oldest_turns"
    """A record too long loses its oldest exchanges ("none": it is set aside)."""
    init_from: str = ""
    """The checkpoint to start from; empty: RUN/pretrain."""
    rows_per_step: int = ranged(16, ge=1)
    """Packed rows of max_seq_len tokens per optimizer step."""
    max_steps: int = 300
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    micro_batch_size: int = 16
    eval_every: int = 100
    save_every: int = 100


@dataclass
class RewardConfig(TrainConfig):
    data: list[str] = field(default_factory=lambda: ["data/preference"])
    """Preference files (any layout scratchlm.align.formats reads), folders or both."""
    val_fraction: float = ranged(0.1, ge=0, lt=1)
    max_seq_len: int = ranged(0, ge=0)
    truncation: Literal["drop_oldest_turns", "none"] = "drop_oldest_turns"
    init_from: str = ""
    """The checkpoint to start from; empty: RUN/sft (the reward stage needs SFT first)."""
    pairs_per_step: int = ranged(32, ge=1)
    margin: float = ranged(0.0)
    """Bradley-Terry margin for pairs that do not carry their own "margin" field."""
    max_steps: int = 200
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    micro_batch_size: int = 16
    eval_every: int = 50
    save_every: int = 100


@dataclass
class DPOConfig(TrainConfig):
    data: list[str] = field(default_factory=lambda: ["data/preference"])
    val_fraction: float = ranged(0.1, ge=0, lt=1)
    max_seq_len: int = ranged(0, ge=0)
    truncation: Literal["drop_oldest_turns", "none"] = "drop_oldest_turns"
    init_from: str = ""
    """The policy's (and the frozen reference's) start; empty: RUN/sft."""
    pairs_per_step: int = ranged(32, ge=1)
    beta: float = ranged(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = ranged(0.0, ge=0, lt=0.5)
    """Conservative DPO: the chance that a pair's label is wrong (sigmoid loss only)."""
    sft_weight: float = ranged(0.0, ge=0)
    """Weight of the chosen responses' per-token cross-entropy added to the loss (RPO): it keeps
    DPO from lowering the likelihood of the chosen responses along with the rejected ones."""
    max_steps: int = 200
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    micro_batch_size: int = 16
    eval_every: int = 50
    save_every: int = 100


@dataclass
class RolloutConfig(TrainConfig):
    """The keys PPO and GRPO share: where prompts and the policy come from, how responses are
    sampled, and the clipped policy update."""

    data: list[str] = field(default_factory=list)
    """Prompt sources: chat, preference or GSM8K-layout files, or `arithmetic[:N]`."""
    val_fraction: float = ranged(0.1, ge=0, lt=1)
    """Share of prompts held out for evaluation: the prompts every stage holds out."""
    eval_prompts: int = ranged(64, ge=0)
    """Held-out prompts answered at each evaluation."""
    init_from: str = ""
    """The policy's starting checkpoint (or run folder); empty: RUN/sft."""
    reward_fn: str = ""
    """A reward function `module:function` called as fn(prompt, response, reference)."""
    max_new_tokens: int = ranged(64, ge=1)
    temperature: float = ranged(1.0, ge=0)
    top_k: int = ranged(0, ge=0)
    top_p: float = ranged(1.0, gt=0, le=1)
    epochs: int = ranged(2, ge=1)
    """Passes over each rollout batch."""
    minibatch_size: int = ranged(16, ge=1)
    """Responses per optimizer step (split into micro_batch_size rows per forward)."""
    clip_range: float = ranged(0.2, gt=0)
    """The policy ratio is clipped to [1 - clip_range, 1 + clip_range]."""
    kl_coef: float = ranged(0.05, ge=0)
    """Weight of the KL penalty to the reference policy (the frozen starting policy)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    max_skipped_rollouts: int = ranged(5, ge=0)
    """Rollouts with NaN rewards or logits are skipped; past this many the run stops."""


@dataclass
class PPOConfig(RolloutConfig):
    data: list[str] = field(default_factory=lambda: ["data/preference"])
    """The prompts of the reward model's data: answers it knows how to judge."""
    lr: float = 1e-4
    """Constant by default (min_lr = lr): sized for models of a few million parameters; large
    models take far less (OpenRLHF's 7B recipes use 5e-7)."""
    min_lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_steps: int = 100
    micro_batch_size: int = 16
    eval_every: int = 20
    save_every: int = 50
    rollout_batch: int = ranged(64, ge=1)
    """Prompts answered per step (one response each)."""
    kl_coef: float = 0.2
    """A small policy learns to please a small reward model with long, unended answers when the
    KL penalty is weak: at 0.05 the demo's policy drifted 10 nats per answer from SFT and a
    quarter of its answers never ended; at 0.2, 6 nats and 9% (docs/align.md)."""
    reward_model: str = ""
    """The reward model's checkpoint (or run folder); empty: RUN/reward. Unused with reward_fn."""
    critic_lr: float = ranged(0.0, ge=0, le=100)
    """The value model's peak learning rate; 0: lr."""
    kl_target: float = ranged(0.0, ge=0)
    """With a target (in nats per response) the KL coefficient adapts to reach it; 0: fixed."""
    kl_horizon: int = ranged(10000, ge=1)
    """Responses over which the adaptive coefficient moves by at most a factor of e^0.2."""
    gamma: float = ranged(1.0, ge=0, le=1)
    lam: float = ranged(0.95, ge=0, le=1)
    value_clip_range: float = ranged(0.2, gt=0)
    missing_end_penalty: float = ranged(2.0, ge=0)
    """Subtracted from the reward of a response with no <|end|> within max_new_tokens."""

    def __post_init__(self) -> None:
        if self.rollout_batch % self.minibatch_size:
            raise UserError(
                f"recipe keys ppo.rollout_batch = {self.rollout_batch}, ppo.minibatch_size = "
                f"{self.minibatch_size}: rollout_batch must be a multiple of ppo.minibatch_size"
            )


@dataclass
class GRPOConfig(RolloutConfig):
    data: list[str] = field(default_factory=lambda: ["arithmetic"])
    reward_fn: str = "scratchlm.align.tasks:answer_match"
    lr: float = 1e-4
    min_lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_steps: int = 100
    micro_batch_size: int = 16
    eval_every: int = 20
    save_every: int = 50
    epochs: int = 1
    minibatch_size: int = 64
    kl_coef: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    prompts_per_step: int = ranged(8, ge=1)
    group_size: int = ranged(8, ge=2)
    """Responses sampled per prompt (G); advantages are normalised within each group."""
    scale_rewards: bool = True
    """Divide each group's centred rewards by their standard deviation."""

    def __post_init__(self) -> None:
        responses = self.prompts_per_step * self.group_size
        if responses % self.minibatch_size:
            raise UserError(
                f"recipe keys grpo.prompts_per_step = {self.prompts_per_step} x grpo.group_size "
                f"= {self.group_size}, grpo.minibatch_size = {self.minibatch_size}: the responses "
                "of a step must be a multiple of minibatch_size"
            )


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])
    max_new_tokens: int = ranged(100, ge=0)
    temperature: float = ranged(0.8, ge=0)
    top_k: int = ranged(50, ge=0)
    top_p: float = ranged(0.95, gt=0, le=1)
    seed: int = ranged(0, ge=0, le=MAX_SEED)


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)
    """Benchmark tasks the eval stage runs (docs/evaluate.md lists them)."""
    limit: int = ranged(0, ge=0)
    """Examples per task (per subtask for mmlu and blimp), the first in file order; 0: all."""
    batch_size: int = ranged(32, ge=1)
    """Rows of up to max_seq_len tokens per forward pass."""
    data_dir: str = "data/eval"
    """The task files: the bundled subsets, or a folder of the full files with the same names."""
    chat: bool = False
    """Prompt through the chat template (few-shot examples as turns)."""
    max_gen_toks: int = ranged(256, ge=1)
    """Longest generation (GSM8K); at most half the model's context."""


@dataclass
class ParallelConfig:
    dp_replicate: int = ranged(1, ge=1)
    dp_shard: int = ranged(1, ge=-1)
    """FSDP2 degree; -1: the world size divided by dp_replicate x tp x pp."""
    tp: int = ranged(1, ge=1)
    pp: int = ranged(1, ge=1)
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    activation_checkpointing: bool = False
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = ranged(3, ge=0, le=3)

    def __post_init__(self) -> None:
        if self.dp_shard == 0:
            raise UserError(
                "recipe key parallel.dp_shard = 0: expected an integer >= 1, or -1 (what the "
                "world size leaves)"
            )


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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
        raise UserError(f"recipe key {key} = {show_value(value)}: expected {_describe(tp)}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise UserError(
                f"unknown recipe key {show_value(full)}; {prefix.rstrip('.') or 'a recipe'} "
                f"accepts: {', '.join(names)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"recipe key {show_value(full)} must be a [section] table")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
            check_range(cls, key, kwargs[key], tp, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value`, the value parsed as TOML; a bare word is a string."""
    if "=" not in text:
        raise UserError(f"--set {show_value(text)}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise UserError(f"--set {show_value(key)}: the value is nested too deeply") from None
    return key.split("."), value


def merge_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for depth, part in enumerate(path[:-1], 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(
                    f"--set {show_value('.'.join(path))}: recipe key "
                    f"{show_value('.'.join(path[:depth]))} holds a value, not a section"
                )
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
        except RecursionError:
            raise UserError(f"recipe {path}: a value is nested too deeply") from None
    values = merge_overrides(values, overrides or [])
    return _build(Recipe, values, "")


def to_toml(data: dict[str, Any]) -> str:
    """Write a recipe dict as TOML (nested sections of scalars and lists: all this schema needs)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            # JSON's escapes are valid in TOML, which also forbids a raw DEL that JSON allows.
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
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
    from scratchlm.disk import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, to_toml(recipe.to_dict()).encode())
