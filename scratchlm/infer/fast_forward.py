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
        N, hd, rep = B * T, self.head_dim, self.n_rep
        h = F.embedding(tokens.reshape(N), model.tok_embeddings.weight)  # [N, dim]
        pos = context.positions.expand(B, T).reshape(N)
        freqs = torch.complex(model.rope_cos[pos], model.rope_sin[pos]).view(N, 1, 1, hd // 2)
        # One complex multiply rotates q and k of every group; v is "rotated" by 1 + 0i, exactly.
        rotation = torch.cat(
            [freqs.expand(N, 1, rep + 1, hd // 2), torch.ones_like(freqs)], dim=2
        )  # [N, 1, rep + 2, hd / 2], broadcast over the kv groups
        for name, block in self.blocks:
            x = F.rms_norm(h, (h.shape[-1],), block.attention_norm.weight, self.eps)
            qkv = F.linear(x, block.attention.wqkv.weight)
            groups = qkv.shape[-1] // ((rep + 2) * hd)
            qkv = _rotate(qkv.view(N, groups, rep + 2, hd), rotation)
            q = qkv[:, :, :rep].reshape(B, T, groups * rep, hd)
            k = qkv[:, :, rep].view(B, T, groups, hd)
            v = qkv[:, :, rep + 1].view(B, T, groups, hd)
            out = context.attend(name, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2).reshape(N, -1)
            h = torch.addmm(h, out, block.attention.wo.weight.t())  # the residual add, fused
            x = F.rms_norm(h, (h.shape[-1],), block.ffn_norm.weight, self.eps)
            gate_up = F.linear(x, block.feed_forward.w_gate_up.weight).view(
                N, self.ffn_groups, 2, -1
            )
            hidden = F.silu(gate_up[:, :, 0]).mul_(gate_up[:, :, 1]).view(N, -1)
            h = torch.addmm(h, hidden, block.feed_forward.w_down.weight.t())
        if rows is not None:
            h = h[rows]
        h = F.rms_norm(h, (h.shape[-1],), model.norm.weight, self.eps)
        logits = F.linear(h, model.output.weight)
        return logits if rows is not None else logits.view(B, T, -1)


def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Each (2i, 2i+1) pair of the last dim multiplied by the complex rotation (in fp32)."""
    if x.dtype == torch.float32:
        return torch.view_as_real(
            torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation
        ).flatten(-2)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)
