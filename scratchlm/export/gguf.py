"""Export to a GGUF file that llama.cpp (and llama-cpp-python, LM Studio, Ollama) runs as a Llama.

    scratchlm export RUN --format gguf --out model.gguf [--dtype f32|f16|q8_0]

What goes in, as llama.cpp's own converter writes it for Llama models:
- metadata under `llama.*`: context length, widths, layer and head counts, RMSNorm epsilon, RoPE
  base and dimension;
- the tokenizer as a GPT-2 style byte-level BPE: every token string, its type (the special
  tokens are CONTROL), the merges, the pre-tokenizer name, the bos/eos/pad ids, <|end|> as the
  end-of-turn id, and the chat template;
- tensors named token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}, output_norm and output (absent when tied), layer by layer.

llama.cpp's Llama rotates adjacent pairs (2i, 2i+1) of each head, as scratchlm does, so q and k
keep their row order (the Hugging Face export permutes them, and llama.cpp's converter permutes
them back). Only the fused qkv and gate/up weights are split. Norms stay f32 in every dtype;
q8_0 quantizes matrices whose rows are whole 32-value blocks and writes the others in f16.

The pre-tokenizer: llama.cpp names the GPT-4 (cl100k) split regex "llama-bpe" when merges are
skipped for whole-word tokens (Llama 3's tokenizer.json sets ignore_merges) and "dbrx" when every
word goes through the merges, as the tokenizers library does by default; GPT-2's ByteLevel split is
"gpt-2". Other tokenizers are refused with one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from scratchlm import disk
from scratchlm.errors import UserError
from scratchlm.model import Transformer
from scratchlm.tokenizer import CHAT_TEMPLATE_JINJA, SPLIT_PATTERN, Tokenizer

DTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32


def gguf_tensors(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) in llama.cpp's layout and order."""
    cfg = model.config
    if model.tok_embeddings is None or model.norm is None or model.output is None:
        raise UserError("export needs the whole model, not a pipeline stage")
    if cfg.head != "lm":
        raise UserError("export writes language models; this checkpoint has a scalar head")
    rep, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    out = [("token_embd.weight", model.tok_embeddings.weight)]
    for i, block in model.layers.items():
        qkv = block.attention.wqkv.weight.view(cfg.n_kv_heads, rep + 2, hd, cfg.dim)
        gate_up = block.feed_forward.w_gate_up.weight.view(cfg.ffn_groups, 2, -1, cfg.dim)
        out += [
            (f"blk.{i}.attn_norm.weight", block.attention_norm.weight),
            (f"blk.{i}.attn_q.weight", qkv[:, :rep].reshape(-1, cfg.dim)),
            (f"blk.{i}.attn_k.weight", qkv[:, rep].reshape(-1, cfg.dim)),
            (f"blk.{i}.attn_v.weight", qkv[:, rep + 1].reshape(-1, cfg.dim)),
            (f"blk.{i}.attn_output.weight", block.attention.wo.weight),
            (f"blk.{i}.ffn_norm.weight", block.ffn_norm.weight),
            (f"blk.{i}.ffn_gate.weight", gate_up[:, 0].reshape(-1, cfg.dim)),
            (f"blk.{i}.ffn_up.weight", gate_up[:, 1].reshape(-1, cfg.dim)),
            (f"blk.{i}.ffn_down.weight", block.feed_forward.w_down.weight),
        ]
    out.append(("output_norm.weight", model.norm.weight))
    if not cfg.tie_embeddings:
        out.append(("output.weight", model.output.weight))
    return [(name, t.detach().to("cpu", torch.float32).contiguous()) for name, t in out]


def tokenizer_pre_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenization (see the module docstring)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError("GGUF export supports byte-level BPE tokenizers; this one is not BPE")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        if steps[0].get("pattern", {}).get("Regex") == SPLIT_PATTERN:
            return "llama-bpe" if model.get("ignore_merges") else "dbrx"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise UserError(
        "GGUF export supports byte-level BPE with the GPT-4 or GPT-2 split; this tokenizer's "
        f"pre-tokenizer is {kinds}"
    )


def _vocab(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (unused ids padded)."""
    import gguf

    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for token, token_id in tokenizer_json["model"]["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id] = token
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
            types[added["id"]] = int(kind)
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    return tokens, types  # type: ignore[return-value]


def _merges(tokenizer_json: dict) -> list[str]:
    merges = tokenizer_json["model"].get("merges", [])
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def export_gguf(
    model: Transformer, tokenizer: Tokenizer, out: Path, dtype: str = "f16", name: str = "scratchlm"
) -> Path:
    """Write the model and its tokenizer as one GGUF file (atomically: a crash leaves no half)."""
    try:
        import gguf
    except ImportError:
        raise UserError(
            "GGUF export needs the gguf package: pip install 'scratchlm[gguf]'"
        ) from None
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tensors = gguf_tensors(model)
    cfg = model.config
    tokenizer_json = json.loads(Path(tokenizer.path).read_text(encoding="utf-8"))
    pre = tokenizer_pre_name(tokenizer_json)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{cfg.vocab_size} embeddings"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]

    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(file_type))

    tokens, types = _vocab(tokenizer_json, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer_json))
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_eot_token_id(tokenizer.end_id)
    writer.add_add_bos_token(True)  # as `scratchlm generate` does
    # llama.cpp's Jinja engine knows no {% generation %} (a transformers training extension).
    template = CHAT_TEMPLATE_JINJA.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    writer.add_chat_template(template)

    needed = 1 << 20  # the header and the vocabulary
    for tensor_name, tensor in tensors:
        data = tensor.numpy()
        if data.ndim == 1 or dtype == "f32":
            stored = data.astype(np.float32)
            writer.add_tensor(tensor_name, stored)
        elif dtype == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
            stored = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(tensor_name, stored, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            stored = data.astype(np.float16)
            writer.add_tensor(tensor_name, stored)
        needed += stored.nbytes
    with disk.writing(out.name, out.parent, needed, [tmp], then="export again"):
        disk.check_room(out.name, out.parent, needed, then="export again")
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        tmp.replace(out)
    return out


def export_gguf_run(path: Path, out: Path, dtype: str = "f16") -> Path:
    """`scratchlm export --format gguf`: the newest model of a run folder (or a checkpoint)."""
    from scratchlm.loading import load

    model, tokenizer = load(path)
    return export_gguf(model, tokenizer, out, dtype, name=Path(path).resolve().name)
