"""Import a Hugging Face Llama checkpoint as a run: `scratchlm import-hf HF_DIR --run-dir DIR`.

Reads config.json (LlamaForCausalLM: grouped-query attention, tied or untied embeddings, rope
theta), the safetensors weights (one file or shards with model.safetensors.index.json) and
tokenizer.json, and writes

    DIR/imported/step-000000/   a normal checkpoint (model.safetensors, config.json, manifest)
    DIR/tokenizer.json          the tokenizer, with this project's special tokens

so that generate, chat, serve and export read DIR like any run, and training continues from it
with `pretrain.init_from = "DIR/imported"` (or `sft` on top of it).

The weights are the inverse of export/hf.py: q/k rows go back from rotate-half order to adjacent
pairs, q/k/v and gate/up are fused into scratchlm's grouped layout. Nothing is rounded, so
import -> export -> import gives the same tensors bit for bit.

Special tokens: scratchlm's tokenizer needs <|bos|> <|eos|> <|pad|> <|system|> <|user|>
<|assistant|> <|end|>. The model's own bos, eos and pad tokens (from config.json or
tokenizer_config.json) are renamed to <|bos|>, <|eos|> and <|pad|>, keeping their ids and so their
trained embeddings (a pad shared with eos gets a new <|pad|>). The other markers, when missing, are
added as new special tokens after the vocabulary; their embedding rows (new rows, or unused padding
rows when the embedding is larger than the vocabulary) start as the mean embedding. The chat
template therefore works at once, but a model that never saw <|user|> and <|end|> needs an `sft`
stage before its chat answers mean anything; plain generation behaves as the original model.
The tokenizer's post-processor is dropped: scratchlm places special tokens itself.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from scratchlm.errors import UserError
from scratchlm.model import ModelConfig
from scratchlm.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer

SUPPORTED = ("LlamaForCausalLM",)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


LIMITS: dict[str, tuple[int, int]] = {
    "hidden_size": (2, 2**16),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "num_hidden_layers": (1, 1024),
    "intermediate_size": (1, 2**18),
    "vocab_size": (1, 2**22),
    "max_position_embeddings": (1, 2**24),
    "head_dim": (2, 2**12),
}
"""The integer keys of config.json and what scratchlm accepts: beyond these a checkpoint is not
a Llama that fits a machine (a vocab_size of 1e12 would ask for terabytes)."""

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _integer(hf: dict[str, Any], key: str, default: int | None = None) -> int:
    value = hf.get(key, default)
    if value is None:
        raise UserError(f"import-hf: config.json has no {key}")
    low, high = LIMITS[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(
            f"import-hf: config.json {key} = {json.dumps(value)[:40]}: expected an integer in "
            f"[{low}, {high}]"
        )
    return value


def _positive_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e30:
        raise UserError(
            f"import-hf: config.json {key} = {json.dumps(value)[:40]}: expected a positive number"
        )
    return float(value)


def model_config(hf: Any) -> ModelConfig:
    """The scratchlm config of a Llama config.json; unsupported variants, values of the wrong
    type or out of range and sizes that do not divide are refused (one line naming the key)."""
    if not isinstance(hf, dict):
        raise UserError(f"import-hf: config.json holds a {type(hf).__name__}, not an object")
    archs = hf.get("architectures") or [hf.get("model_type", "unknown")]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError("import-hf: config.json architectures must be a list of names")
    if not any(a in SUPPORTED for a in archs):
        raise UserError(f"import-hf supports {', '.join(SUPPORTED)}; this checkpoint is {archs[0]}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError("import-hf: biases in attention or MLP are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"import-hf: activation {hf['hidden_act']!r} is not supported (silu)")
    rope = hf.get("rope_parameters") or {}
    for scaling in (rope, hf.get("rope_scaling") or {}):
        if not isinstance(scaling, dict):
            raise UserError("import-hf: config.json rope_scaling must be an object")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise UserError(f"import-hf: RoPE scaling {kind!r} is not supported")
    dim, heads = _integer(hf, "hidden_size"), _integer(hf, "num_attention_heads")
    kv_heads = _integer(hf, "num_key_value_heads", hf.get("num_key_value_heads") or heads)
    if dim % heads or (dim // heads) % 2:
        raise UserError(
            f"import-hf: hidden_size {dim} must be num_attention_heads {heads} x an even head size"
        )
    if _integer(hf, "head_dim", hf.get("head_dim") or dim // heads) != dim // heads:
        raise UserError("import-hf: head_dim must be hidden_size / num_attention_heads")
    if heads % kv_heads:
        raise UserError(
            f"import-hf: num_attention_heads {heads} must be a multiple of num_key_value_heads "
            f"{kv_heads}"
        )
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise UserError("import-hf: config.json tie_word_embeddings must be true or false")
    return ModelConfig(
        vocab_size=_integer(hf, "vocab_size"),
        dim=dim,
        n_layers=_integer(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=kv_heads,
        max_seq_len=_integer(hf, "max_position_embeddings", 2048),
        ffn_dim=_integer(hf, "intermediate_size"),
        norm_eps=_positive_number("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_positive_number(
            "rope_theta", rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        ),
        tie_embeddings=tie,
    )


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of the checkpoint: one, or the shards its index names."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        index_json = _read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise UserError(f"{index} has no weight_map of tensor names to file names")
        names = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise UserError(f"{hf_dir} has no model.safetensors (or model.safetensors.index.json)")
    files = []
    for name in names:
        path = hf_dir / name
        if Path(name).name != name or not path.is_file():  # a shard outside the folder is refused
            raise UserError(f"{path} is missing (named in the safetensors index)")
        files.append(path)
    return files


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM of this config has, with its shape."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.dim),
        "model.norm.weight": (cfg.dim,),
    }
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (q, cfg.dim),
            f"{p}.self_attn.k_proj.weight": (kv, cfg.dim),
            f"{p}.self_attn.v_proj.weight": (kv, cfg.dim),
            f"{p}.self_attn.o_proj.weight": (cfg.dim, q),
            f"{p}.mlp.gate_proj.weight": (cfg.ffn_dim, cfg.dim),
            f"{p}.mlp.up_proj.weight": (cfg.ffn_dim, cfg.dim),
            f"{p}.mlp.down_proj.weight": (cfg.dim, cfg.ffn_dim),
            f"{p}.input_layernorm.weight": (cfg.dim,),
            f"{p}.post_attention_layernorm.weight": (cfg.dim,),
        }
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def _headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every tensor of the files, from their headers: nothing is loaded."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    found[name] = (tuple(part.get_shape()), part.get_dtype())
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise UserError(f"import-hf: {path} is not a readable safetensors file ({e})") from None
    return found


def check_weights(files: list[Path], cfg: ModelConfig) -> None:
    """The tensors of the files are exactly those of the config, at its shapes: a config that
    says 2 layers over weights of 4 is refused, not imported as half a model."""
    found = _headers(files)
    layers = {n.split(".")[2] for n in found if n.startswith("model.layers.")}
    n_layers = max((int(i) + 1 for i in layers if i.isdigit()), default=0)
    if n_layers != cfg.n_layers:
        raise UserError(
            f"import-hf: the weights have {n_layers} layers, config.json num_hidden_layers "
            f"says {cfg.n_layers}"
        )
    expected = expected_shapes(cfg)
    ignored = {n for n in found if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints still carry a copy
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - ignored)
    if missing or unexpected:
        what = f"lack {missing[0]}" if missing else f"have {unexpected[0]}, which Llama has not"
        more = len(missing) + len(unexpected) - 1
        raise UserError(f"import-hf: the weights {what}" + (f" (and {more} more)" if more else ""))
    for name, shape in expected.items():
        if found[name][0] != shape:
            raise UserError(
                f"import-hf: {name} has shape {list(found[name][0])}, config.json gives "
                f"{list(shape)}"
            )
        if found[name][1] not in FLOAT_DTYPES:
            raise UserError(f"import-hf: {name} is {found[name][1]}, not a floating-point tensor")


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors |= load_file(str(path))
    return tensors


def _from_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q or k projection from (i, i + head_dim/2) order to (2i, 2i+1) pairs."""
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def scratchlm_tensors(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM weights under scratchlm names, fused and in scratchlm's layout, fp32."""

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise UserError(f"import-hf: the weights lack {name}")
        return hf[name].to(torch.float32)

    rep, hd, groups = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, cfg.ffn_groups
    out = {"tok_embeddings.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        q = _from_rotate_half(take(f"{p}.self_attn.q_proj.weight"), cfg.n_heads, hd)
        k = _from_rotate_half(take(f"{p}.self_attn.k_proj.weight"), cfg.n_kv_heads, hd)
        v = take(f"{p}.self_attn.v_proj.weight")
        qkv = torch.cat(
            [
                q.view(cfg.n_kv_heads, rep, hd, cfg.dim),
                k.view(cfg.n_kv_heads, 1, hd, cfg.dim),
                v.view(cfg.n_kv_heads, 1, hd, cfg.dim),
            ],
            dim=1,
        )
        gate = take(f"{p}.mlp.gate_proj.weight").view(groups, 1, -1, cfg.dim)
        up = take(f"{p}.mlp.up_proj.weight").view(groups, 1, -1, cfg.dim)
        out |= {
            f"layers.{i}.attention_norm.weight": take(f"{p}.input_layernorm.weight"),
            f"layers.{i}.attention.wqkv.weight": qkv.reshape(-1, cfg.dim),
            f"layers.{i}.attention.wo.weight": take(f"{p}.self_attn.o_proj.weight"),
            f"layers.{i}.ffn_norm.weight": take(f"{p}.post_attention_layernorm.weight"),
            f"layers.{i}.feed_forward.w_gate_up.weight": torch.cat([gate, up], 1).reshape(
                -1, cfg.dim
            ),
            f"layers.{i}.feed_forward.w_down.weight": take(f"{p}.mlp.down_proj.weight"),
        }
    out["norm.weight"] = take("model.norm.weight")
    if not cfg.tie_embeddings:
        out["output.weight"] = take("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def _special_ids(hf_dir: Path, hf_config: dict, tok: dict) -> dict[str, int | None]:
    """The checkpoint's own bos, eos and pad ids (config.json first, then tokenizer_config.json)."""
    by_content = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    by_content |= {t: i for t, i in tok["model"].get("vocab", {}).items() if t not in by_content}
    tok_config = {}
    if (hf_dir / "tokenizer_config.json").is_file():
        tok_config = _read_json(hf_dir / "tokenizer_config.json")
    ids: dict[str, int | None] = {}
    for key in ("bos", "eos", "pad"):
        value = hf_config.get(f"{key}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            named = tok_config.get(f"{key}_token")
            named = named.get("content") if isinstance(named, dict) else named
            value = by_content.get(named) if named else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"import-hf: {key}_token_id = {json.dumps(value)[:40]}: expected an id")
        ids[key] = value
    return ids


def convert_tokenizer(hf_dir: Path, hf_config: dict) -> tuple[dict, list[int]]:
    """tokenizer.json with scratchlm's special tokens; and the ids that were added."""
    tok = _read_json(hf_dir / "tokenizer.json")
    if not (
        isinstance(tok, dict)
        and isinstance(tok.get("model"), dict)
        and isinstance(tok.get("added_tokens"), list)
    ):
        raise UserError(f"{hf_dir / 'tokenizer.json'} is not a tokenizers tokenizer.json")
    ids = _special_ids(hf_dir, hf_config, tok)
    vocab = tok["model"].setdefault("vocab", {})
    added = tok["added_tokens"]
    present = {a["content"] for a in added} | set(vocab)
    renamed: set[int] = set()
    for key, ours in (("bos", BOS), ("eos", EOS), ("pad", PAD)):
        token_id = ids[key]
        if ours in present or token_id is None or token_id in renamed:
            continue
        renamed.add(token_id)
        for a in added:
            if a["id"] == token_id:
                a["content"], a["special"] = ours, True
        old = [t for t, i in vocab.items() if i == token_id]
        for t in old:
            del vocab[t]
        if old:
            vocab[ours] = token_id
        if not any(a["id"] == token_id for a in added):
            added.append(_added(token_id, ours))
        present.add(ours)
    next_id = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    new_ids = []
    for token in SPECIAL_TOKENS:
        if token not in present:
            added.append(_added(next_id, token))
            new_ids.append(next_id)
            next_id += 1
    tok["post_processor"] = None
    return tok, new_ids


def _added(token_id: int, content: str) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _fit_vocab(tensors: dict[str, torch.Tensor], cfg: ModelConfig, new_ids: list[int]) -> None:
    """Embedding (and untied output) rows for added tokens: the mean of the rows of the tokens
    the tokenizer already had (not of unused padding rows)."""
    names = ["tok_embeddings.weight"] + ([] if cfg.tie_embeddings else ["output.weight"])
    size = max([cfg.vocab_size - 1, *new_ids]) + 1
    for name in names:
        w = tensors[name]
        mean = w[: min(new_ids)].mean(0)
        if size > w.shape[0]:
            w = torch.cat([w, mean.expand(size - w.shape[0], -1)])
        w[new_ids] = mean
        tensors[name] = w.contiguous()
    cfg.vocab_size = size


@dataclass
class ImportedCheckpoint:
    """A Hugging Face checkpoint read, checked and converted, not yet written anywhere."""

    hf_dir: Path
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: dict[str, Any]
    added_tokens: list[int]


def read_hf_checkpoint(hf_dir: Path) -> ImportedCheckpoint:
    """config.json, the weights and tokenizer.json, checked against each other and converted;
    a UserError comes before any weight is loaded and before anything is written."""
    hf_dir = Path(hf_dir)
    for name in ("config.json", "tokenizer.json"):
        if not (hf_dir / name).is_file():
            raise UserError(f"{hf_dir} has no {name}: import-hf needs a Hugging Face model folder")
    hf_config = _read_json(hf_dir / "config.json")
    cfg = model_config(hf_config)
    files = weight_files(hf_dir)
    check_weights(files, cfg)
    tokenizer_json, new_ids = convert_tokenizer(hf_dir, hf_config)
    tensors = scratchlm_tensors(read_weights(files), cfg)
    if new_ids:
        _fit_vocab(tensors, cfg, new_ids)
    with tempfile.TemporaryDirectory() as scratch:  # the result must load as our tokenizer
        check = Path(scratch) / "tokenizer.json"
        check.write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
        Tokenizer.load(check)
    return ImportedCheckpoint(hf_dir, cfg, tensors, tokenizer_json, new_ids)


def write_imported_run(imported: ImportedCheckpoint, run_dir: Path) -> Path:
    """Write the checkpoint and tokenizer (see the module docstring); returns the checkpoint."""
    from scratchlm.checkpoint import save_checkpoint
    from scratchlm.loading import load

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "tokenizer.json.tmp"
    tmp.write_text(json.dumps(imported.tokenizer, ensure_ascii=False), encoding="utf-8")
    tmp.replace(run_dir / "tokenizer.json")
    stage = run_dir / "imported"
    if stage.exists():
        shutil.rmtree(stage)
    state = {
        "step": 0,
        "imported_from": str(imported.hf_dir.resolve()),
        "added_tokens": imported.added_tokens,
    }
    checkpoint = save_checkpoint(stage, 0, imported.tensors, imported.config.to_dict(), state)
    load(checkpoint)  # weights and config fit together
    return checkpoint


def import_hf(hf_dir: Path, run_dir: Path) -> Path:
    """Read and check the checkpoint in hf_dir, then write it as a run; returns the checkpoint."""
    return write_imported_run(read_hf_checkpoint(hf_dir), run_dir)
