"""The model's fused kernels: RMSNorm, q/k/v split with RoPE, SwiGLU and the cross-entropy loss.

Each is a `torch.library` custom op with a hand-written backward (`register_autograd`) and a fake
(shape-only) implementation, so torch.compile keeps it whole as one node of its graph and fuses
everything around it instead of breaking the graph. The backward passes save only what they need
and write gradients in place.

Under torch.compile a kernel is used only where it beats the code inductor generates from plain
torch ops; `COMPILED_USES_CUSTOM` records which, per device type, as measured by
bench/compiled_kernels.py.

When no gradient can flow (under no_grad or inference_mode, or no input requires grad) each kernel
computes the same values with a few plain torch ops instead: a custom op's dispatch costs more than
its arithmetic on a decode step's one row per request, and there is nothing to save for a backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rotate(x: Tensor, freqs: Tensor, out: Tensor) -> None:
    """out = x with each pair (2i, 2i+1) of the last dim rotated by the unit complex freqs[t, i].

    One complex multiply is about 5x faster on CPU than the four strided real ops of the
    "rotate_half" pairing (i, i + d/2); attention scores do not depend on how the head dim is
    ordered, and the Hugging Face exporter permutes the q/k rows to rotate_half order.
    """
    if x.stride(-1) != 1 or any(stride % 2 for stride in x.stride()[:-1]):
        x = x.contiguous()  # a complex view needs adjacent pairs (gradients may come expanded)
    pairs = x.unflatten(-1, (-1, 2))
    if x.dtype in (torch.float32, torch.float64):
        torch.mul(
            torch.view_as_complex(pairs),
            freqs,
            out=torch.view_as_complex(out.unflatten(-1, (-1, 2))),
        )
    else:  # no complex bf16: rotate in fp32 and round once
        out.copy_(torch.view_as_real(torch.view_as_complex(pairs.float()) * freqs).flatten(-2))


def _complex_table(freqs: Tensor, like: Tensor) -> Tensor:
    """freqs [(B,) T, hd/2] as a table that broadcasts over [B, T, groups, heads, hd/2]."""
    dtype = torch.complex128 if like.dtype == torch.float64 else torch.complex64
    if freqs.dtype != dtype:  # a conversion that would not happen still costs a dispatch
        freqs = freqs.to(dtype)
    return freqs.view(*freqs.shape[:-1], 1, 1, freqs.shape[-1])


@torch.library.custom_op("scratchlm::split_qkv_rope", mutates_args=())
def _split_qkv_rope(
    qkv: Tensor, freqs: Tensor, n_rep: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    B, T, width = qkv.shape
    groups = width // ((n_rep + 2) * head_dim)
    x = qkv.view(B, T, groups, n_rep + 2, head_dim)
    table = _complex_table(freqs, qkv)
    q = qkv.new_empty(B, T, groups, n_rep, head_dim)
    k = qkv.new_empty(B, T, groups, 1, head_dim)
    _rotate(x[:, :, :, :n_rep], table, q)
    _rotate(x[:, :, :, n_rep : n_rep + 1], table, k)
    v = x[:, :, :, n_rep + 1].clone()
    return q.view(B, T, groups * n_rep, head_dim), k.view(B, T, groups, head_dim), v


@_split_qkv_rope.register_fake
def _(qkv, freqs, n_rep, head_dim):
    B, T, width = qkv.shape
    groups = width // ((n_rep + 2) * head_dim)
    return (
        qkv.new_empty(B, T, groups * n_rep, head_dim),
        qkv.new_empty(B, T, groups, head_dim),
        qkv.new_empty(B, T, groups, head_dim),
    )


@torch.library.custom_op("scratchlm::split_qkv_rope_backward", mutates_args=())
def _split_qkv_rope_backward(
    grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, freqs: Tensor, n_rep: int
) -> Tensor:
    """Rotates the other way and writes all three gradients into one buffer laid out like the
    fused projection's output."""
    B, T, heads, head_dim = grad_q.shape
    groups = heads // n_rep
    grad = grad_q.new_empty(B, T, groups, n_rep + 2, head_dim)
    inverse = _complex_table(freqs, grad_q).conj().resolve_conj()
    _rotate(grad_q.unflatten(2, (groups, n_rep)), inverse, grad[:, :, :, :n_rep])
    _rotate(grad_k.unsqueeze(3), inverse, grad[:, :, :, n_rep : n_rep + 1])
    grad[:, :, :, n_rep + 1].copy_(grad_v)
    return grad.view(B, T, -1)


@_split_qkv_rope_backward.register_fake
def _(grad_q, grad_k, grad_v, freqs, n_rep):
    B, T, heads, head_dim = grad_q.shape
    return grad_q.new_empty(B, T, (heads // n_rep) * (n_rep + 2) * head_dim)


def _split_qkv_rope_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])
    ctx.n_rep = inputs[2]


def _split_qkv_rope_grad(ctx, grad_q, grad_k, grad_v):
    (freqs,) = ctx.saved_tensors
    return _split_qkv_rope_backward(grad_q, grad_k, grad_v, freqs, ctx.n_rep), None, None, None


torch.library.register_autograd(
    "scratchlm::split_qkv_rope", _split_qkv_rope_grad, setup_context=_split_qkv_rope_setup
)


def _split_qkv_rope_plain(
    qkv: Tensor, freqs: Tensor, n_rep: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The same split and rotation in real arithmetic, for inductor to fuse."""
    B, T, width = qkv.shape
    groups = width // ((n_rep + 2) * head_dim)
    x = qkv.view(B, T, groups, n_rep + 2, head_dim // 2, 2)
    cos = freqs.real.to(qkv.dtype).unsqueeze(-2).unsqueeze(-2)
    sin = freqs.imag.to(qkv.dtype).unsqueeze(-2).unsqueeze(-2)
    even, odd = x[:, :, :, : n_rep + 1, :, 0], x[:, :, :, : n_rep + 1, :, 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    rotated = rotated.flatten(-2)
    q = rotated[:, :, :, :n_rep].reshape(B, T, groups * n_rep, head_dim)
    k = rotated[:, :, :, n_rep].reshape(B, T, groups, head_dim)
    v = x[:, :, :, n_rep + 1].flatten(-2)
    return q, k, v


def _split_qkv_rope_inference(
    qkv: Tensor, freqs: Tensor, n_rep: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The custom op's values without a gradient: q and k rotated by one complex multiply, k and
    v views (of the rotated buffer and of qkv)."""
    B, T, width = qkv.shape
    groups = width // ((n_rep + 2) * head_dim)
    x = qkv.view(B, T, groups, n_rep + 2, head_dim // 2, 2)
    pairs, table = x[:, :, :, : n_rep + 1], _complex_table(freqs, qkv)
    if qkv.dtype in (torch.float32, torch.float64):
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * table)
    else:  # no complex bf16: rotate in fp32 and round once
        rotated = torch.view_as_real(torch.view_as_complex(pairs.float()) * table).to(qkv.dtype)
    q = rotated[:, :, :, :n_rep].reshape(B, T, groups * n_rep, head_dim)
    k = rotated[:, :, :, n_rep].view(B, T, groups, head_dim)
    return q, k, x[:, :, :, n_rep + 1].view(B, T, groups, head_dim)


def split_qkv_rope(
    qkv: Tensor, freqs: Tensor, n_rep: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped fused qkv [B, T, G*(R+2)*hd] -> q [B, T, G*R, hd], k [B, T, G, hd] (both rotated)
    and v [B, T, G, hd]. freqs is complex [T, hd/2] (every row at the same positions) or
    [B, T, hd/2] (positions per row). The custom op saves nothing but the rotation table."""
    if not _needs_grad(qkv):
        return _split_qkv_rope_inference(qkv, freqs, n_rep, head_dim)
    if _compiled_plain("split_qkv_rope", qkv):
        return _split_qkv_rope_plain(qkv, freqs, n_rep, head_dim)
    return _split_qkv_rope(qkv, freqs, n_rep, head_dim)


def _chunk_rows(n_cols: int, device: torch.device) -> int:
    """Rows per chunk for row-wise loops: 2 MiB of fp32 on CPU (each thread's half stays in L2;
    smaller chunks mean more thread barriers per step), everything at once on GPU."""
    return max(1, (1 << 19 if device.type == "cpu" else 1 << 30) // n_cols)


def _silu_gate_times_up(gate_up: Tensor, groups: int) -> Tensor:
    x = gate_up.view(*gate_up.shape[:-1], groups, 2, -1)
    return F.silu(x.select(-2, 0)).mul_(x.select(-2, 1)).flatten(-2)


@torch.library.custom_op("scratchlm::swiglu", mutates_args=())
def _swiglu(gate_up: Tensor, groups: int) -> Tensor:
    return _silu_gate_times_up(gate_up, groups)


@_swiglu.register_fake
def _(gate_up, groups):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("scratchlm::swiglu_backward", mutates_args=("gate_up",))
def _swiglu_backward(grad_hidden: Tensor, gate_up: Tensor, groups: int) -> None:
    """Writes the gradient over the saved gate/up output (nothing else holds it) chunk by chunk,
    so the five elementwise steps run in cache and no new buffer is allocated."""
    x = gate_up.view(-1, groups, 2, gate_up.shape[-1] // (2 * groups))
    grad_h = grad_hidden.reshape(-1, groups, x.shape[-1])
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


@_swiglu_backward.register_fake
def _(grad_hidden, gate_up, groups):
    return None


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.groups = inputs[1]


def _swiglu_grad(ctx, grad_hidden):
    (gate_up,) = ctx.saved_tensors
    _swiglu_backward(grad_hidden, gate_up, ctx.groups)
    return gate_up, None


torch.library.register_autograd("scratchlm::swiglu", _swiglu_grad, setup_context=_swiglu_setup)


def swiglu(gate_up: Tensor, groups: int) -> Tensor:
    """silu(gate) * up from the grouped fused gate/up output [..., groups * (gate, up)]; the
    custom op saves only that output and overwrites it with its gradient in the backward."""
    if not _needs_grad(gate_up):
        return _silu_gate_times_up(gate_up, groups)
    if _compiled_plain("swiglu", gate_up):
        x = gate_up.unflatten(-1, (groups, 2, -1))
        return (F.silu(x.select(-2, 0)) * x.select(-2, 1)).flatten(-2)
    return _swiglu(gate_up, groups)


def _upcast(x: Tensor) -> Tensor:
    """x in at least fp32 (bf16 and fp16 statistics lose too much precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@torch.library.custom_op("scratchlm::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    xf = _upcast(x)
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    rstd = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return (xf * rstd).to(x.dtype).mul_(weight), rstd


@_rms_norm.register_fake
def _(x, weight, eps):
    stats_dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.empty_like(x), x.new_empty(*x.shape[:-1], 1, dtype=stats_dtype)


@torch.library.custom_op("scratchlm::rms_norm_backward", mutates_args=())
def _rms_norm_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """The row and column sums of the backward are matrix-vector products."""
    dim = x.shape[-1]
    xf, g = _upcast(x).reshape(-1, dim), _upcast(grad_out).reshape(-1, dim)
    w, r = weight.to(g.dtype), rstd.reshape(-1, 1)
    prod = g * xf
    grad_w = r.view(-1) @ prod
    # d/dx of x * r(x) * w: r * g * w - x * r^3 * <g * w, x> / dim
    coef = (prod @ w).unsqueeze(1).mul_(r.pow(3)).div_(dim)
    grad_x = torch.mul(g, w, out=prod).mul_(r).addcmul_(xf, coef, value=-1.0)
    return grad_x.view(x.shape).to(x.dtype), grad_w.to(weight.dtype)


@_rms_norm_backward.register_fake
def _(grad_out, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros for rstd's gradient
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _rms_norm_grad(ctx, grad_out, _grad_rstd):
    if grad_out is None:
        return None, None, None
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = _rms_norm_backward(grad_out, x, weight, rstd)
    return grad_x, grad_w, None


torch.library.register_autograd(
    "scratchlm::rms_norm", _rms_norm_grad, setup_context=_rms_norm_setup
)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight over the last dim, statistics in at least fp32."""
    if not _needs_grad(x, weight):
        # The same arithmetic (statistics in fp32, rounded to x's dtype before the weight) in
        # torch's own op, called without F.rms_norm's Python wrapper.
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    if _compiled_plain("rms_norm", x):
        xf = _upcast(x)
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return _rms_norm(x, weight, eps)[0]


@torch.library.custom_op("scratchlm::cross_entropy", mutates_args=())
def _cross_entropy(
    logits: Tensor, targets: Tensor, ignore_index: int, with_grad: bool
) -> tuple[Tensor, Tensor]:
    """Mean loss over targets that are not ignore_index, and (when with_grad) its gradient
    softmax - one_hot made in the same pass: rows go through in chunks that stay in cache,
    log_softmax into the gradient buffer, the loss read from it at the targets, then exp and
    scale in place. The [N, V] logits are read once and the gradient written once."""
    n, vocab = logits.shape
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    valid = targets != ignore_index
    scale = 1.0 / valid.sum().clamp(min=1).to(compute_dtype)
    row_scale = (valid * scale).unsqueeze(1)  # 0 for ignored rows: their gradient is 0
    safe_targets = targets.masked_fill(~valid, 0).unsqueeze(1)
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0)
    in_place = with_grad and grad.dtype == compute_dtype
    target_logp = logits.new_empty(n, 1, dtype=compute_dtype)
    rows = _chunk_rows(vocab, logits.device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        chunk = logits[start:end].to(compute_dtype)
        logp = torch.log_softmax(chunk, -1, out=grad[start:end] if in_place else None)
        target_logp[start:end] = logp.gather(1, safe_targets[start:end])
        if with_grad:
            probs = logp.exp_().mul_(row_scale[start:end])
            if not in_place:
                grad[start:end] = probs
    loss = -(target_logp.squeeze(1) * valid).sum() * scale
    if with_grad:
        grad.scatter_add_(1, safe_targets, -row_scale.to(grad.dtype))
    return loss.to(compute_dtype), grad


@_cross_entropy.register_fake
def _(logits, targets, ignore_index, with_grad):
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0)
    return logits.new_empty((), dtype=compute_dtype), grad


def _cross_entropy_setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    # Without this autograd would fill a [tokens, vocab] tensor of zeros for the gradient buffer's
    # own (unused) gradient at every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _cross_entropy_grad(ctx, grad_loss, _grad_grad):
    if grad_loss is None:
        return None, None, None, None
    (grad,) = ctx.saved_tensors
    if torch.compiler.is_compiling():  # traced graphs are functional; inductor reuses buffers
        return grad * grad_loss.to(grad.dtype), None, None, None
    # Scaled in place: a second backward through the same loss is refused by autograd's
    # saved-tensor version check.
    return grad.mul_(grad_loss.to(grad.dtype)), None, None, None


torch.library.register_autograd(
    "scratchlm::cross_entropy", _cross_entropy_grad, setup_context=_cross_entropy_setup
)


def cross_entropy_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over targets that are not ignore_index; logits [..., V], targets [...]."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if _compiled_plain("cross_entropy", logits):
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    with_grad = logits.requires_grad and torch.is_grad_enabled()
    return _cross_entropy(logits, targets, ignore_index, with_grad)[0]


def _needs_grad(x: Tensor, weight: Tensor | None = None) -> bool:
    """Whether a gradient can flow back to x or weight."""
    return torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
    )


def _compiled_plain(kernel: str, x: Tensor) -> bool:
    """Whether torch.compile is tracing and should see plain ops instead of the custom op."""
    if not torch.compiler.is_compiling():
        return False
    return not COMPILED_USES_CUSTOM.get(x.device.type, {}).get(kernel, False)


# Under torch.compile, per device type: True where the custom op beat inductor's code from plain
# ops in bench/compiled_kernels.py. On GPUs inductor fuses the plain ops into single Triton kernels,
# which a sequence of ATen kernels cannot beat, so they stay plain there.
COMPILED_USES_CUSTOM: dict[str, dict[str, bool]] = {
    "cpu": {"split_qkv_rope": True, "swiglu": True, "rms_norm": True, "cross_entropy": True},
}
