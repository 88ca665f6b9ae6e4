"""Export to a Hugging Face folder that transformers loads as a Llama model, unchanged.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)   # LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(out)      # PreTrainedTokenizerFast

scratchlm stores q/k/v and gate/up as fused, grouped weights and rotates (2i, 2i+1) pairs of the
head dimension; the Llama layout has separate projections and rotates (i, i + head_dim/2). The
exporter splits the fused weights and permutes the rows of q and k; attention scores do not change
under a permutation of the head dimension applied to both, so the logits are the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from scratchlm import disk
from scratchlm.errors import UserError
from scratchlm.model import ModelConfig, Transformer
from scratchlm.runlock import process_alive

REQUIRED_SPECIAL_TOKENS = ("bos", "eos", "pad")
TMP_PREFIX = ".tmp-export-"

# Used when no chat template is given: role headers on their own line, turns closed by eos.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}\n"
    "{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}"
)


def _to_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q or k projection from (2i, 2i+1) pair order to (i, i + head_dim/2) order."""
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under LlamaForCausalLM names, fused weights split."""
    cfg = model.config
    if model.tok_embeddings is None or model.norm is None or model.output is None:
        raise UserError("export needs the whole model, not a pipeline stage")
    if cfg.head != "lm":
        raise UserError("export writes language models; this checkpoint has a scalar head")
    rep, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": model.tok_embeddings.weight}
    for name, block in model.layers.items():
        prefix = f"model.layers.{name}"
        qkv = block.attention.wqkv.weight.view(cfg.n_kv_heads, rep + 2, hd, cfg.dim)
        gate_up = block.feed_forward.w_gate_up.weight.view(cfg.ffn_groups, 2, -1, cfg.dim)
        out |= {
            f"{prefix}.self_attn.q_proj.weight": _to_rotate_half(qkv[:, :rep], cfg.n_heads, hd),
            f"{prefix}.self_attn.k_proj.weight": _to_rotate_half(qkv[:, rep], cfg.n_kv_heads, hd),
            f"{prefix}.self_attn.v_proj.weight": qkv[:, rep + 1].reshape(-1, cfg.dim),
            f"{prefix}.self_attn.o_proj.weight": block.attention.wo.weight,
            f"{prefix}.mlp.gate_proj.weight": gate_up[:, 0].reshape(-1, cfg.dim),
            f"{prefix}.mlp.up_proj.weight": gate_up[:, 1].reshape(-1, cfg.dim),
            f"{prefix}.mlp.down_proj.weight": block.feed_forward.w_down.weight,
            f"{prefix}.input_layernorm.weight": block.attention_norm.weight,
            f"{prefix}.post_attention_layernorm.weight": block.ffn_norm.weight,
        }
    out["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.output.weight
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def llama_config(cfg: ModelConfig, token_ids: dict[str, int], dtype: torch.dtype) -> dict[str, Any]:
    """config.json for LlamaForCausalLM (read by transformers 4.x and 5.x)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
        "pad_token_id": token_ids["pad"],
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def export_hf(
    model: Transformer,
    tokenizer_json: Path,
    out: Path,
    special_tokens: dict[str, str],
    chat_template: str | None = None,
) -> Path:
    """Write config.json, model.safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json and special_tokens_map.json into `out`.

    special_tokens maps "bos", "eos" and "pad" (and optionally more names, e.g. chat markers) to
    token strings of the tokenizer.
    """
    tokenizer_json, out = Path(tokenizer_json), Path(out)
    if not tokenizer_json.is_file():
        raise UserError(f"tokenizer file not found: {tokenizer_json}")
    if out.exists() and not out.is_dir():
        raise UserError(f"export destination {out} exists and is not a folder")
    missing = [k for k in REQUIRED_SPECIAL_TOKENS if k not in special_tokens]
    if missing:
        raise UserError(f"special_tokens needs {', '.join(missing)} (the token strings)")
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{model.config.vocab_size} embeddings"
        )
    token_ids: dict[str, int] = {}
    for key, token in special_tokens.items():
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"special token {key}={token!r} is not in {tokenizer_json}")
        token_ids[key] = token_id

    dtype = model.tok_embeddings.weight.dtype if model.tok_embeddings is not None else torch.float32
    state = hf_state_dict(model)
    ids = {f"{k}_token_id": token_ids[k] for k in REQUIRED_SPECIAL_TOKENS}
    named = {f"{k}_token": special_tokens[k] for k in REQUIRED_SPECIAL_TOKENS}
    extra = [v for k, v in special_tokens.items() if k not in REQUIRED_SPECIAL_TOKENS]
    if extra:
        named["additional_special_tokens"] = extra
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "model_max_length": model.config.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template or DEFAULT_CHAT_TEMPLATE,
    }
    files = {
        "config.json": _json(llama_config(model.config, token_ids, dtype)),
        "generation_config.json": _json({**ids, "max_length": model.config.max_seq_len}),
        "tokenizer.json": tokenizer_json.read_bytes(),
        "special_tokens_map.json": _json(named),
        "tokenizer_config.json": _json(tokenizer_config),
    }
    # Written into a temporary folder and moved into `out` once complete: a full disk or a crash
    # leaves no partial model file where a loader would take it for the export.
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_exports(out)
    tmp = out / f"{TMP_PREFIX}{os.getpid()}"
    needed = sum(t.numel() * t.element_size() for t in state.values())
    needed += sum(len(data) for data in files.values()) + (1 << 16)
    disk.check_room("the Hugging Face export", out, needed, then="export again")
    with disk.writing("the Hugging Face export", out, needed, [tmp], then="export again"):
        tmp.mkdir()
        disk.save_safetensors(state, tmp / "model.safetensors")
        for name, data in files.items():
            with disk.open_file(tmp / name) as f:
                f.write(data)
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    tmp.rmdir()
    return out


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def _remove_stale_exports(out: Path) -> None:
    """Remove the temporary folders of exports that died (their process is gone)."""
    for path in out.glob(f"{TMP_PREFIX}*"):
        pid = path.name.removeprefix(TMP_PREFIX)
        if pid.isdigit() and not process_alive(int(pid)):
            freed = disk.format_bytes(disk.tree_bytes(path))
            disk.remove(path)
            print(f"note: removed {path.name}, left by an interrupted export ({freed})")


def export_run(path: Path, out: Path) -> Path:
    """`scratchlm export`: the newest model of a run folder (or a checkpoint) with its tokenizer,
    the chat markers and the chat template of scratchlm.tokenizer."""
    from scratchlm import tokenizer as tok
    from scratchlm.loading import load

    model, tokenizer = load(path)
    special = {
        "bos": tok.BOS,
        "eos": tok.EOS,
        "pad": tok.PAD,
        "system": tok.SYSTEM,
        "user": tok.USER,
        "assistant": tok.ASSISTANT,
        "end": tok.END,
    }
    return export_hf(model, tokenizer.path, out, special, chat_template=tok.CHAT_TEMPLATE_JINJA)
