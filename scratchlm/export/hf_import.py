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
from pathlib import Path
from typing import Any

import torch
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


def model_config(hf: dict[str, Any]) -> ModelConfig:
    """The scratchlm config of a Llama config.json; unsupported variants are refused."""
    archs = hf.get("architectures") or [hf.get("model_type", "unknown")]
    if not any(a in SUPPORTED for a in archs):
        raise UserError(f"import-hf supports {', '.join(SUPPORTED)}; this checkpoint is {archs[0]}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError("import-hf: biases in attention or MLP are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"import-hf: activation {hf['hidden_act']!r} is not supported (silu)")
    rope = hf.get("rope_parameters") or {}
    for scaling in (rope, hf.get("rope_scaling") or {}):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise UserError(f"import-hf: RoPE scaling {kind!r} is not supported")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", dim // heads) != dim // heads:
        raise UserError("import-hf: head_dim must be hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{hf_dir} has no model.safetensors (or model.safetensors.index.json)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise UserError(f"{hf_dir / name} is missing (named in the safetensors index)")
        tensors |= load_file(str(hf_dir / name))
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
        ids[key] = value
    return ids


def convert_tokenizer(hf_dir: Path, hf_config: dict) -> tuple[dict, list[int]]:
    """tokenizer.json with scratchlm's special tokens; and the ids that were added."""
    tok = _read_json(hf_dir / "tokenizer.json")
    if "model" not in tok or "added_tokens" not in tok:
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


def import_hf(hf_dir: Path, run_dir: Path) -> Path:
    """Write the checkpoint and tokenizer (see the module docstring); returns the checkpoint."""
    from scratchlm.checkpoint import save_checkpoint
    from scratchlm.loading import load

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    for name in ("config.json", "tokenizer.json"):
        if not (hf_dir / name).is_file():
            raise UserError(f"{hf_dir} has no {name}: import-hf needs a Hugging Face model folder")
    hf_config = _read_json(hf_dir / "config.json")
    cfg = model_config(hf_config)
    tensors = scratchlm_tensors(read_weights(hf_dir), cfg)
    tokenizer_json, new_ids = convert_tokenizer(hf_dir, hf_config)
    if new_ids:
        _fit_vocab(tensors, cfg, new_ids)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = run_dir / "tokenizer.json"
    tmp = run_dir / "tokenizer.json.tmp"
    tmp.write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    Tokenizer.load(tmp)  # the result must load as a scratchlm tokenizer
    tmp.replace(tokenizer_path)
    stage = run_dir / "imported"
    if stage.exists():
        shutil.rmtree(stage)
    state = {"step": 0, "imported_from": str(hf_dir.resolve()), "added_tokens": new_ids}
    checkpoint = save_checkpoint(stage, 0, tensors, cfg.to_dict(), state)
    load(checkpoint)  # weights and config fit together
    return checkpoint
