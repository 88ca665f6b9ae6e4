"""The model's forward pass for inference, written as plain tensor ops.

At batch size 1 a decode step is a few hundred small kernels, and the time goes to calling them:
module calls and the training-oriented autograd Functions of model.py cost more than the matmuls
of a small model. This pass computes the same function (embedding, RMSNorm, fused qkv with RoPE
on (2i, 2i+1) pairs, attention through the step's AttentionContext, SwiGLU, output head) with one
fused op where torch has one, reading the model's weights at each call (so a model being trained,
as in PPO, is always current).

It is only used when it agrees with `model(...)`: `InferenceForward.for_model` runs both on a probe
batch and returns None (the engine then calls the model itself) unless the logits match to 1e-4,
e.g. for a model whose architecture changed, a pipeline stage or a scalar head.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from scratchlm.model import AttentionContext, Transformer

PROBE_TOLERANCE = 1e-4
# The probe's verdict per model: `generate` makes an engine per call, and an architecture does not
# change while its weights train.
_VERDICTS: weakref.WeakKeyDictionary[Transformer, bool] = weakref.WeakKeyDictionary()


class InferenceForward:
    def __init__(self, model: Transformer) -> None:
        cfg = model.config
        self.model = model
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.norm_eps
        self.ffn_groups = cfg.ffn_groups
        self.blocks = list(model.layers.items())

    @classmethod
    def for_model(cls, model: Transformer) -> InferenceForward | None:
        """The fast pass when it computes what the model computes, else None."""
        if model not in _VERDICTS:
            _VERDICTS[model] = cls._agrees(model)
        return cls(model) if _VERDICTS[model] else None

    @classmethod
    @torch.inference_mode()
    def _agrees(cls, model: Transformer) -> bool:
        if model.tok_embeddings is None or model.norm is None or model.output is None:
            return False
        if model.config.head != "lm" or type(model) is not Transformer:
            return False
        fast = cls(model)
        device = next(model.parameters()).device
        n = min(8, model.config.max_seq_len)
        probe = torch.arange(n, device=device).remainder(model.config.vocab_size).view(1, n)
        try:
            expected = model(probe).float()
            got = fast(probe, AttentionContext(torch.arange(n, device=device))).float()
        except Exception:  # an architecture this pass does not know
            return False
        scale = expected.abs().max().clamp(min=1.0)
        return bool((got - expected).abs().max() <= PROBE_TOLERANCE * scale)

    def __call__(
        self, tokens: torch.Tensor, context: AttentionContext, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V] of tokens [B, T], as `model(tokens, context=context)`; with rows
        (indices into the B * T positions), only those positions' logits [len(rows), V]."""
        model = self.model
        if model.rope_cos.dtype != torch.float32:
            model.init_rope()
        B, T = tokens.shape
        hd, rep = self.head_dim, self.n_rep
        h = F.embedding(tokens, model.tok_embeddings.weight)
        pos = context.positions
        freqs = torch.complex(model.rope_cos[pos], model.rope_sin[pos])
        # [T, hd/2] or [B, T, hd/2] -> broadcast over (groups, heads-in-group)
        freqs = freqs.view(*(freqs.shape[:-1] if freqs.dim() == 3 else (1, T)), 1, 1, hd // 2)
        for name, block in self.blocks:
            x = F.rms_norm(h, (h.shape[-1],), block.attention_norm.weight, self.eps)
            qkv = F.linear(x, block.attention.wqkv.weight)
            groups = qkv.shape[-1] // ((rep + 2) * hd)
            qkv = qkv.view(B, T, groups, rep + 2, hd)
            qk = _rotate(qkv[:, :, :, : rep + 1], freqs)  # q heads and k, rotated together
            q = qk[:, :, :, :rep].reshape(B, T, groups * rep, hd)
            k, v = qk[:, :, :, rep], qkv[:, :, :, rep + 1]
            out = context.attend(name, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            h = h + F.linear(out.transpose(1, 2).reshape(B, T, -1), block.attention.wo.weight)
            x = F.rms_norm(h, (h.shape[-1],), block.ffn_norm.weight, self.eps)
            gate_up = F.linear(x, block.feed_forward.w_gate_up.weight)
            gate_up = gate_up.unflatten(-1, (self.ffn_groups, 2, -1))
            hidden = F.silu(gate_up[..., 0, :]).mul_(gate_up[..., 1, :]).flatten(-2)
            h = h + F.linear(hidden, block.feed_forward.w_down.weight)
        if rows is not None:
            h = h.reshape(B * T, -1)[rows]
        h = F.rms_norm(h, (h.shape[-1],), model.norm.weight, self.eps)
        return F.linear(h, model.output.weight)


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Each (2i, 2i+1) pair of the last dim rotated by the unit complex freqs (fp32 math)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * freqs)
    return rotated.flatten(-2).to(x.dtype)
