"""The Llama-style decoder: RMSNorm, grouped-query attention with rotary embeddings, SwiGLU.

Nothing here knows about training or parallelism. Speed comes from fewer, bigger kernels: q/k/v is
one matmul and gate/up is one matmul, and RMSNorm, RoPE, SwiGLU and the loss are autograd Functions
with hand-written backward passes that save only what they need and write gradients in place.

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


def _rotate(x: torch.Tensor, freqs: torch.Tensor, out: torch.Tensor) -> None:
    """out = x with each pair (2i, 2i+1) of the last dim rotated by the unit complex freqs[t, i].

    One complex multiply is about 5x faster on CPU than the four strided real ops of the
    "rotate_half" pairing (i, i + d/2); attention scores do not depend on how the head dim is
    ordered, and the Hugging Face exporter permutes the q/k rows to rotate_half order.
    """
    pairs = x.unflatten(-1, (-1, 2))
    if x.dtype in (torch.float32, torch.float64):
        torch.mul(
            torch.view_as_complex(pairs),
            freqs,
            out=torch.view_as_complex(out.unflatten(-1, (-1, 2))),
        )
    else:  # no complex bf16: rotate in fp32 and round once
        out.copy_(torch.view_as_real(torch.view_as_complex(pairs.float()) * freqs).flatten(-2))


class _SplitQKVRope(torch.autograd.Function):
    """Grouped fused qkv [B, T, G*(R+2)*hd] -> q [B,T,G*R,hd], k [B,T,G,hd] (rotated), v [B,T,G,hd].

    freqs is [T, hd/2] (every row at the same positions) or [B, T, hd/2] (positions per row).

    Saves nothing but the rotation table; the backward rotates the other way and writes all three
    gradients into one buffer laid out like the fused projection's output.
    """

    @staticmethod
    def forward(ctx, qkv, freqs, n_rep: int, head_dim: int):  # type: ignore[override]
        B, T, width = qkv.shape
        groups = width // ((n_rep + 2) * head_dim)
        x = qkv.view(B, T, groups, n_rep + 2, head_dim)
        freqs = freqs.to(torch.complex128 if qkv.dtype == torch.float64 else torch.complex64)
        table = freqs.unsqueeze(-2).unsqueeze(-2)  # [(B,) T, 1, 1, head_dim / 2]
        q = qkv.new_empty(B, T, groups, n_rep, head_dim)
        k = qkv.new_empty(B, T, groups, 1, head_dim)
        _rotate(x[:, :, :, :n_rep], table, q)
        _rotate(x[:, :, :, n_rep : n_rep + 1], table, k)
        v = x[:, :, :, n_rep + 1].clone()
        ctx.save_for_backward(freqs)
        ctx.shape = (B, T, groups, n_rep, head_dim)
        return q.view(B, T, groups * n_rep, head_dim), k.view(B, T, groups, head_dim), v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):  # type: ignore[override]
        (freqs,) = ctx.saved_tensors
        B, T, groups, n_rep, head_dim = ctx.shape
        grad = grad_q.new_empty(B, T, groups, n_rep + 2, head_dim)
        inverse = freqs.conj().resolve_conj().unsqueeze(-2).unsqueeze(-2)
        _rotate(grad_q.unflatten(2, (groups, n_rep)), inverse, grad[:, :, :, :n_rep])
        _rotate(grad_k.unsqueeze(3), inverse, grad[:, :, :, n_rep : n_rep + 1])
        grad[:, :, :, n_rep + 1].copy_(grad_v)
        return grad.view(B, T, -1), None, None, None


def _chunk_rows(n_cols: int, device: torch.device) -> int:
    """Rows per chunk for row-wise loops: 2 MiB of fp32 on CPU (each thread's half stays in L2;
    smaller chunks mean more thread barriers per step), everything at once on GPU."""
    return max(1, (1 << 19 if device.type == "cpu" else 1 << 30) // n_cols)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up from the grouped fused gate/up output; saves only that output.

    The backward writes the gradient over the saved gate/up output (nothing else holds it) chunk
    by chunk, so the five elementwise steps run in cache and no new buffer is allocated.
    """

    @staticmethod
    def forward(ctx, gate_up, groups: int):  # type: ignore[override]
        x = gate_up.unflatten(-1, (groups, 2, -1))
        hidden = F.silu(x.select(-2, 0)).mul_(x.select(-2, 1))
        ctx.save_for_backward(gate_up)
        ctx.groups = groups
        return hidden.flatten(-2)

    @staticmethod
    def backward(ctx, grad_hidden):  # type: ignore[override]
        (gate_up,) = ctx.saved_tensors
        x = gate_up.view(-1, ctx.groups, 2, gate_up.shape[-1] // (2 * ctx.groups))
        grad_h = grad_hidden.reshape(-1, ctx.groups, x.shape[-1])
        rows = _chunk_rows(grad_h.shape[1] * grad_h.shape[2], gate_up.device)
        for start in range(0, x.shape[0], rows):
            chunk, g = x[start : start + rows], grad_h[start : start + rows]
            gate, up = chunk[:, :, 0], chunk[:, :, 1]
            sig = torch.sigmoid(gate)
            silu = gate * sig
            # d silu / d gate = sig + silu * (1 - sig)
            grad_gate = sig.addcmul_(silu, sig, value=-1.0).add_(silu).mul_(up).mul_(g)
            torch.mul(silu, g, out=up)
            gate.copy_(grad_gate)
        return gate_up, None


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (bf16 and fp16 statistics lose too much precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _RMSNorm(torch.autograd.Function):
    """x / rms(x) * weight; the backward's row and column sums are matrix-vector products."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):  # type: ignore[override]
        xf = _upcast(x)
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        rstd = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).to(x.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        dim = x.shape[-1]
        xf, g = _upcast(x).reshape(-1, dim), _upcast(grad_out).reshape(-1, dim)
        w, r = weight.to(g.dtype), rstd.reshape(-1, 1)
        prod = g * xf
        grad_w = r.view(-1) @ prod
        # d/dx of x * r(x) * w: r * g * w - x * r^3 * <g * w, x> / dim
        coef = (prod @ w).unsqueeze(1).mul_(r.pow(3)).div_(dim)
        grad_x = torch.mul(g, w, out=prod).mul_(r).addcmul_(xf, coef, value=-1.0)
        return grad_x.view(x.shape).to(x.dtype), grad_w.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose gradient (softmax - one_hot) is made in the same pass as the loss.

    Rows go through in chunks that stay in cache: log_softmax into the gradient buffer, the loss
    read from it at the targets, then exp and scale in place. The [N, V] logits are read once and
    the gradient written once; the backward scales it in place (a second backward through the same
    loss is refused by autograd's saved-tensor version check).
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int):  # type: ignore[override]
        n, vocab = logits.shape
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        valid = targets != ignore_index
        scale = 1.0 / valid.sum().clamp(min=1).to(compute_dtype)
        row_scale = (valid * scale).unsqueeze(1)  # 0 for ignored rows: their gradient is 0
        safe_targets = targets.masked_fill(~valid, 0).unsqueeze(1)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        in_place = grad is not None and grad.dtype == compute_dtype
        target_logp = logits.new_empty(n, 1, dtype=compute_dtype)
        rows = _chunk_rows(vocab, logits.device)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            chunk = logits[start:end].to(compute_dtype)
            logp = torch.log_softmax(chunk, -1, out=grad[start:end] if in_place else None)
            target_logp[start:end] = logp.gather(1, safe_targets[start:end])
            if grad is not None:
                probs = logp.exp_().mul_(row_scale[start:end])
                if not in_place:
                    grad[start:end] = probs
        loss = -(target_logp.squeeze(1) * valid).sum() * scale
        if grad is not None:
            grad.scatter_add_(1, safe_targets, -row_scale.to(grad.dtype))
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss.to(grad.dtype)), None, None


def cross_entropy_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy over targets that are not ignore_index; logits [..., V], targets [...]."""
    return _CrossEntropy.apply(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index
    )


class AttentionContext:
    """Where attention gets its keys and values and where each token sits: plain causal
    attention over the batch itself. Packed rows, a KV cache and an inference engine's paged cache
    are subclasses; the model asks only for `positions` and `attend`."""

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


class KVCache:
    """Past keys and values for decoding, preallocated per layer as [B, kv_heads, S, head_dim]."""

    def __init__(
        self,
        layer_names: list[str],
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.max_seq_len = max_seq_len
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.keys = {n: torch.zeros(shape, device=device, dtype=dtype) for n in layer_names}
        self.values = {n: torch.zeros(shape, device=device, dtype=dtype) for n in layer_names}

    def context(self, start_pos: int, length: int) -> AttentionContext:
        """The context for `length` new tokens at positions start_pos.."""
        return _CachedStep(self, start_pos, length)


class _CachedStep(AttentionContext):
    """Store this step's keys and values at start_pos, attend over everything cached so far."""

    def __init__(self, cache: KVCache, start_pos: int, length: int) -> None:
        device = next(iter(cache.keys.values())).device
        super().__init__(torch.arange(start_pos, start_pos + length, device=device))
        self.cache, self.start_pos = cache, start_pos

    def attend(self, layer, q, k, v):  # type: ignore[override]
        start, end = self.start_pos, self.start_pos + k.shape[2]
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        k, v = keys[:, :, :end], values[:, :, :end]
        T = q.shape[2]
        mask = None
        if start > 0 and T > 1:  # a chunk after cached positions: causal with an offset
            pos = torch.arange(end, device=q.device)
            mask = pos[None, :] <= pos[start:, None]
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=q.shape[1] != k.shape[1],
        )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.wqkv = nn.Linear(
            cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False
        )
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, context: AttentionContext, layer: str
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = _SplitQKVRope.apply(self.wqkv(x), freqs, self.n_rep, self.head_dim)
        out = context.attend(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.groups = cfg.ffn_groups
        self.w_gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w_gate_up(x)
        # Under tensor parallelism this rank holds a whole number of the groups.
        local_groups = self.groups * gate_up.shape[-1] // self.w_gate_up.out_features
        return self.w_down(_SwiGLU.apply(gate_up, max(1, local_groups)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, freqs, context: AttentionContext, layer: str):
        h = x + self.attention(self.attention_norm(x), freqs, context, layer)
        return h + self.feed_forward(self.ffn_norm(h))


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
        cache: KVCache | None = None,
        start_pos: int = 0,
        segment_ids: torch.Tensor | None = None,
        context: AttentionContext | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] of tokens [B, T] (or the output head's values, see `head`).

        Attention is causal over the row, unless: `cache` holds earlier positions (the tokens
        sit at start_pos..), `segment_ids` [B, T] pack several documents per row, or `context`
        says outright where keys, values and positions come from (an inference engine's cache).
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        T = h.shape[1]
        if context is None:
            if cache is not None:
                context = cache.context(start_pos, T)
            elif segment_ids is not None:
                context = PackedRows(segment_ids)
            else:
                context = AttentionContext(torch.arange(T, device=h.device))
        last = start_pos + T if cache is not None else T
        if last > self.config.max_seq_len:
            raise ValueError(f"positions up to {last} exceed max_seq_len={self.config.max_seq_len}")
        positions = context.positions
        if self.rope_cos.dtype != torch.float32:  # the model was cast (e.g. to bf16) from outside
            self.init_rope()
        freqs = torch.complex(self.rope_cos[positions], self.rope_sin[positions])
        for name, layer in self.layers.items():
            h = layer(h, freqs, context, name)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        out = self.output(h)
        return out.squeeze(-1) if self.config.head == "scalar" else out

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        """An empty KV cache on the model's device and dtype."""
        cfg = self.config
        weight = next(self.parameters())
        return KVCache(
            list(self.layers.keys()),
            batch_size,
            cfg.n_kv_heads,
            max_seq_len or cfg.max_seq_len,
            cfg.head_dim,
            weight.device,
            weight.dtype,
        )

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
