"""The Llama-style decoder: RMSNorm, grouped-query attention with rotary embeddings, SwiGLU.

Nothing here knows about training or parallelism. One forward serves training, scoring and cached
decoding; where keys and values come from is the `AttentionContext`'s business (the extension point
for KV caches). Speed comes from fewer, bigger kernels: q/k/v is one matmul and gate/up is one
matmul, and RMSNorm, RoPE, SwiGLU and the loss are custom ops with hand-written backward passes
(kernels.py) that torch.compile sees as single graph nodes; when no gradient is needed they run as
a few plain torch ops, so inference pays for no autograd machinery.

Both fused weights are stored in groups (one group per key/value head): `wqkv` rows are
[q heads of group 0, k head 0, v head 0, q heads of group 1, ...] and `w_gate_up` rows are
[gate part 0, up part 0, gate part 1, ...]. A row-wise tensor-parallel split then keeps whole groups
on each rank, and the forward derives the local number of groups from the weight's shape.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import UserError
from scratchlm.kernels import cross_entropy_loss, rms_norm, split_qkv_rope, swiglu

__all__ = [
    "AttentionContext",
    "ModelConfig",
    "PackedRows",
    "Transformer",
    "cross_entropy_loss",
]


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq_len: int = 256
    ffn_dim: int = 0
    """SwiGLU hidden size; 0 derives it: 8/3 * dim rounded up to a multiple of 64."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    head: str = "lm"
    """"lm": next-token logits [B, T, vocab]; "scalar": one value per position [B, T] (reward and
    value models)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise UserError(f"model.dim={self.dim} must be n_heads={self.n_heads} x an even size")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads={self.n_heads} must be a multiple of n_kv_heads")
        if self.head not in ("lm", "scalar"):
            raise UserError(f"model head {self.head!r}: expected 'lm' or 'scalar'")
        if self.ffn_dim == 0:
            self.ffn_dim = 64 * math.ceil(8 * self.dim / 3 / 64)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_groups(self) -> int:
        """Groups of the fused gate/up weight: one per kv head when the hidden size allows."""
        return self.n_kv_heads if self.ffn_dim % self.n_kv_heads == 0 else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"model config has unknown keys {unknown}; it accepts {sorted(known)}")
        return cls(**data)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class AttentionContext:
    """Where attention gets its keys and values and where each token sits: plain causal
    attention over the batch itself.

    This is the forward's extension point. The model asks only for `positions` and calls `attend`
    once per layer with that layer's name and its new queries, keys and values, so a subclass
    decides what each token sees: PackedRows keeps packed documents apart, the inference engine's
    paged KV cache (infer/kv_cache.py) stores the new keys and values and attends over everything
    cached, and evaluation's tree attention shares a prompt between continuations."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions
        """Position of each token for RoPE: [T] (every row alike) or [B, T]."""

    def attend(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, hd], k and v [B, kv_heads, T, hd] of this step -> [B, H, T, hd]."""
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=q.shape[2] > 1, enable_gqa=q.shape[1] != k.shape[1]
        )


class PackedRows(AttentionContext):
    """Several documents packed into each row: segment_ids [B, T] number them. Positions restart
    at each document and attention stays inside it (a block-diagonal causal mask), so a packed
    row computes what the documents would alone."""

    def __init__(self, segment_ids: torch.Tensor) -> None:
        T = segment_ids.shape[1]
        index = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        # Each token's position is its distance from the last segment start at or before it.
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        super().__init__(index - first)
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        self.mask = (same & torch.ones(T, T, dtype=torch.bool, device=same.device).tril())[:, None]

    def attend(self, layer, q, k, v):  # type: ignore[override]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, enable_gqa=q.shape[1] != k.shape[1]
        )


class Attention(nn.Module):
    """Grouped-query attention's weights: the fused, grouped q/k/v projection and the output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.wqkv = nn.Linear(
            cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False
        )
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)


class FeedForward(nn.Module):
    """SwiGLU's weights: the fused, grouped gate/up projection and the down projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.groups = cfg.ffn_groups
        self.w_gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)


class TransformerBlock(nn.Module):
    """h = x + attention(norm(x)); out = h + SwiGLU(norm(h)).

    The block is one module call and computes its attention and SwiGLU itself: at batch size 1 a
    decode step is a few hundred small ops, where each module call costs about what an op does.
    The norms and projections stay modules, as tensor parallelism hooks them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, context: AttentionContext, layer: str
    ) -> torch.Tensor:
        attn, ffn = self.attention, self.feed_forward
        B, T, _ = x.shape
        qkv = attn.wqkv(self.attention_norm(x))
        q, k, v = split_qkv_rope(qkv, freqs, attn.n_rep, attn.head_dim)
        out = context.attend(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = x + attn.wo(out.transpose(1, 2).reshape(B, T, -1))
        w_gate_up = ffn.w_gate_up
        gate_up = w_gate_up(self.ffn_norm(h))
        # Under tensor parallelism this rank holds a whole number of the groups.
        groups = max(1, ffn.groups * gate_up.shape[-1] // w_gate_up.out_features)
        return h + ffn.w_down(swiglu(gate_up, groups))


class Transformer(nn.Module):
    """tokens [B, T] -> logits [B, T, V]. A pipeline stage may set tok_embeddings, norm or output
    to None: it then takes or returns hidden states [B, T, dim]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed "0".."N-1" keeps names stable when a pipeline stage deletes layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        outputs = 1 if cfg.head == "scalar" else cfg.vocab_size
        self.output: nn.Linear | None = nn.Linear(cfg.dim, outputs, bias=False)
        if cfg.tie_embeddings and cfg.head == "lm":
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    def init_rope(self, device: torch.device | None = None) -> None:
        """(Re)compute the rotary tables cos, sin [max_seq_len, head_dim / 2] in fp32."""
        cfg = self.config
        device = device or self.rope_cos.device
        exponents = torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32)
        inv_freq = 1.0 / (cfg.rope_theta ** (exponents / cfg.head_dim))
        angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0.02) weights, residual output projections scaled by 1/sqrt(2 * n_layers)."""
        self.init_rope()
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual = name.endswith(("attention.wo", "feed_forward.w_down"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if residual else 0.02)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        context: AttentionContext | None = None,
        segment_ids: torch.Tensor | None = None,
        outputs_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] of tokens [B, T] (or the output head's values, see `head`).

        The one forward for training, scoring and decoding. Attention is causal over each row,
        unless `segment_ids` [B, T] pack several documents per row or `context` says where keys,
        values and positions come from (a KV cache: see AttentionContext). With `outputs_at`
        (indices into the B * T positions) the final norm and head run on those positions only
        and the result is [len(outputs_at), V].
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        T = h.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"{T} positions exceed max_seq_len={self.config.max_seq_len}")
        if context is None:
            if segment_ids is not None:
                context = PackedRows(segment_ids)
            else:
                context = AttentionContext(torch.arange(T, device=h.device))
        positions = context.positions
        if self.rope_cos.dtype != torch.float32:  # the model was cast (e.g. to bf16) from outside
            self.init_rope()
        freqs = torch.complex(self.rope_cos[positions], self.rope_sin[positions])
        for name, layer in self.layers.items():
            h = layer(h, freqs, context, name)
        if outputs_at is not None:
            h = h.flatten(0, 1)[outputs_at]
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        out = self.output(h)
        return out.squeeze(-1) if self.config.head == "scalar" else out

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each. exclude_embeddings drops the input lookup table unless it
        is tied to the output head (then it does matmul work and stays, as in nanoGPT)."""
        total = sum(p.numel() for p in self.parameters())
        if (
            exclude_embeddings
            and self.tok_embeddings is not None
            and not self.config.tie_embeddings
        ):
            total -= self.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N for the matmuls plus 12 * layers * dim * seq_len for
        attention scores and values (PaLM appendix B; nanoGPT's MFU)."""
        cfg = self.config
        return 6 * self.num_params(exclude_embeddings=True) + 12 * cfg.n_layers * cfg.dim * seq_len
