import copy
import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm import kernels
from scratchlm.errors import UserError
from scratchlm.infer.kv_cache import PagedKVCache, PagedStep, plan_step
from scratchlm.kernels import rms_norm, split_qkv_rope, swiglu
from scratchlm.model import ModelConfig, Transformer, cross_entropy_loss


def tiny(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)
    values.update(overrides)
    return ModelConfig(**values)


def split_weights(model: Transformer, layer: str) -> dict[str, torch.Tensor]:
    """The fused grouped weights of one layer as plain q/k/v/gate/up matrices."""
    cfg = model.config
    block = model.layers[layer]
    rep, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    qkv = block.attention.wqkv.weight.view(cfg.n_kv_heads, rep + 2, hd, cfg.dim)
    gate_up = block.feed_forward.w_gate_up.weight.view(cfg.ffn_groups, 2, -1, cfg.dim)
    return {
        "q": qkv[:, :rep].reshape(-1, cfg.dim),
        "k": qkv[:, rep].reshape(-1, cfg.dim),
        "v": qkv[:, rep + 1].reshape(-1, cfg.dim),
        "gate": gate_up[:, 0].reshape(-1, cfg.dim),
        "up": gate_up[:, 1].reshape(-1, cfg.dim),
    }


def reference_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """A plain Llama forward (repeat_interleave GQA, explicit softmax) on the model's weights."""
    cfg = model.config
    B, T = tokens.shape
    hd = cfg.head_dim

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).double() / hd)
    angles = torch.outer(torch.arange(T).double(), inv_freq)
    cos, sin = angles.cos().float(), angles.sin().float()

    def rope(x):  # [B, h, T, hd], pairs (2i, 2i+1)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)

    h = model.tok_embeddings.weight[tokens]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for name, block in model.layers.items():
        w = split_weights(model, name)
        x = rms(h, block.attention_norm.weight)
        q = (x @ w["q"].T).view(B, T, cfg.n_heads, hd).transpose(1, 2)
        k = (x @ w["k"].T).view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        v = (x @ w["v"].T).view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        h = h + attn @ block.attention.wo.weight.T
        x = rms(h, block.ffn_norm.weight)
        h = h + (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ block.feed_forward.w_down.weight.T
    return rms(h, model.norm.weight) @ model.output.weight.T


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_plain_llama(n_kv_heads, tie):
    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_heads=n_kv_heads, tie_embeddings=tie))
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model(tokens), reference_forward(model, tokens), atol=1e-5)


def test_causality():
    torch.manual_seed(0)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (1, 16))
    changed = tokens.clone()
    changed[0, 9] = (tokens[0, 9] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_cached_decoding_equals_full_forward():
    """The one forward with the paged KV cache as its attention context: a prompt in two chunks,
    then one token at a time, gives the logits of a full forward."""
    torch.manual_seed(0)
    model = Transformer(tiny())
    cfg = model.config
    tokens = torch.randint(0, 97, (2, 20))
    cache = PagedKVCache(
        list(model.layers.keys()),
        10,
        4,
        cfg.n_kv_heads,
        cfg.head_dim,
        torch.device("cpu"),
        torch.float32,
    )
    # Blocks handed out in turns, so neither row's slots are consecutive.
    blocks: list[list[int]] = [[], []]
    for _ in range(5):
        for row in blocks:
            row += cache.allocate(1)
    slots = [cache.slot_table(row, 20) for row in blocks]

    def step(start: int, end: int) -> torch.Tensor:
        """Logits [2, end - start, V] of both rows' tokens start..end, as one engine step."""
        if end - start == 1:
            plan = plan_step([s[:end] for s in slots], [])
        else:
            plan = plan_step([], [(s[:end], start) for s in slots])
        positions = torch.arange(start, end).repeat(2).view(-1, 1)
        context = PagedStep(cache, plan, positions)
        logits = model(tokens[:, start:end].reshape(-1, 1), context=context)
        return logits.view(2, end - start, -1)

    with torch.no_grad():
        full = model(tokens)
        parts = [step(0, 7), step(7, 12)] + [step(t, t + 1) for t in range(12, 20)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_outputs_at_runs_the_head_on_those_positions_only():
    torch.manual_seed(0)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (3, 10))
    at = torch.tensor([0, 9, 10, 29, 17])  # flat indices into the 3 * 10 positions
    with torch.no_grad():
        full = model(tokens)
        assert torch.allclose(model(tokens, outputs_at=at), full.flatten(0, 1)[at], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_without_a_gradient_give_the_custom_ops_values(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 32, dtype=dtype), torch.randn(32, dtype=dtype)
    qkv, gate_up = torch.randn(3, 5, 2 * 4 * 8, dtype=dtype), torch.randn(3, 5, 48, dtype=dtype)
    angles = torch.rand(5, 4) * 6
    freqs = torch.complex(angles.cos(), angles.sin())
    with torch.no_grad():
        plain = [rms_norm(x, w, 1e-5), *split_qkv_rope(qkv, freqs, 2, 8), swiglu(gate_up, 2)]
    with torch.enable_grad():
        args = [t.clone().requires_grad_() for t in (x, qkv, gate_up)]
        custom = [
            rms_norm(args[0], w, 1e-5),
            *split_qkv_rope(args[1], freqs, 2, 8),
            swiglu(args[2], 2),
        ]
    assert custom[0].grad_fn is not None  # the custom ops ran
    exact = {"rms_norm": False, "q": True, "k": True, "v": True, "swiglu": True}
    for name, got, want in zip(exact, plain, custom, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if exact[name]:
            assert torch.equal(got, want.detach()), name
        else:  # statistics reduced in another order
            torch.testing.assert_close(
                got, want.detach(), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6
            )


def test_a_forward_without_gradients_runs_no_custom_op(monkeypatch):
    """Inference (the engine, scoring) runs the kernels as plain ops: a custom op's dispatch
    costs more than a decode step's arithmetic."""
    torch.manual_seed(0)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        expected = model(tokens)

    def refused(*args, **kwargs):
        raise AssertionError("a custom op ran")

    for op in ("_rms_norm", "_split_qkv_rope", "_swiglu"):
        monkeypatch.setattr(kernels, op, refused)
    with torch.inference_mode():
        assert torch.equal(model(tokens), expected)
    with torch.no_grad():
        assert torch.equal(model(tokens), expected)
    with pytest.raises(AssertionError, match="a custom op ran"):
        model(tokens)  # parameters require grad: the training path


def test_rope_is_the_closed_form_rotation():
    torch.manual_seed(0)
    hd, T, theta = 8, 5, 10000.0
    model = Transformer(tiny(dim=16, n_heads=2, n_kv_heads=1, rope_theta=theta))
    qkv = torch.randn(1, T, 4 * hd)  # one group: 2 q heads, k, v
    freqs = torch.complex(model.rope_cos[:T], model.rope_sin[:T])
    q, k, v = split_qkv_rope(qkv, freqs, 2, hd)
    x = qkv.view(1, T, 4, hd)
    for t in range(T):
        for i in range(hd // 2):
            angle = t * theta ** (-2 * i / hd)
            c, s = math.cos(angle), math.sin(angle)
            for out, head in ((q[0, t, 0], 0), (q[0, t, 1], 1), (k[0, t, 0], 2)):
                a, b = x[0, t, head, 2 * i].item(), x[0, t, head, 2 * i + 1].item()
                assert out[2 * i].item() == pytest.approx(a * c - b * s, abs=1e-5)
                assert out[2 * i + 1].item() == pytest.approx(a * s + b * c, abs=1e-5)
    assert torch.equal(v[0, :, 0], x[0, :, 3])


def test_custom_backwards_match_finite_differences():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(3, 5, 8, **d), torch.randn(8, **d)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    # SwiGLU's backward reuses its saved input, which gradcheck's repeated backwards forbid.
    gate_up = torch.randn(2, 3, 12, **d)
    grad_out = torch.randn(2, 3, 6, dtype=torch.float64)
    (ours,) = torch.autograd.grad(swiglu(gate_up * 1, 2), gate_up, grad_out)
    parts = gate_up.unflatten(-1, (2, 2, 3))
    plain = (F.silu(parts[..., 0, :]) * parts[..., 1, :]).flatten(-2)
    (expected,) = torch.autograd.grad(plain, gate_up, grad_out)
    assert torch.allclose(ours, expected, atol=1e-12)
    freqs = torch.polar(
        torch.ones(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    )
    qkv = torch.randn(2, 4, 2 * 4 * 4, **d)  # 2 groups of (2 q, k, v) heads of size 4
    assert torch.autograd.gradcheck(lambda a: split_qkv_rope(a, freqs, 2, 4), (qkv,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_matches_torch(dtype):
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 300, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 300, (4, 9))
    targets[0, :3] = -100
    ours = cross_entropy_loss(logits, targets)
    (grad,) = torch.autograd.grad(ours * 3, logits)
    ref = F.cross_entropy(logits.view(-1, 300), targets.view(-1), ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref * 3, logits)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert ours.item() == pytest.approx(ref.item(), rel=tol)
    assert torch.allclose(grad, ref_grad, atol=tol * 0.1, rtol=0)
    with torch.no_grad():
        assert cross_entropy_loss(logits, targets).item() == pytest.approx(ref.item(), rel=tol)
    bf16 = cross_entropy_loss(logits.detach().bfloat16(), targets)
    assert bf16.item() == pytest.approx(ref.item(), rel=1e-2)


def test_cross_entropy_second_backward_is_refused():
    logits = torch.randn(3, 5, requires_grad=True)
    loss = cross_entropy_loss(logits, torch.tensor([1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 0.3


@pytest.mark.parametrize("tie", [True, False])
def test_param_count_by_hand(tie):
    cfg = tiny(tie_embeddings=tie)
    assert cfg.ffn_dim == 128  # 8/3 * 32 = 85.3 -> next multiple of 64
    embed = 97 * 32
    attention = 32 * (4 + 2 * 2) * 8 + 4 * 8 * 32
    mlp = 3 * 32 * 128
    per_layer = attention + mlp + 2 * 32
    expected = embed * (1 if tie else 2) + 2 * per_layer + 32
    model = Transformer(cfg)
    assert model.num_params() == expected
    assert model.num_params(exclude_embeddings=True) == expected - (0 if tie else embed)
    assert model.flops_per_token(24) == 6 * (expected - (0 if tie else embed)) + 12 * 2 * 32 * 24


def test_init_scaling():
    torch.manual_seed(0)
    model = Transformer(tiny(dim=256, n_heads=8, n_kv_heads=4, n_layers=8, vocab_size=512))
    residual = 0.02 / math.sqrt(16)
    for name, p in model.named_parameters():
        if name.endswith(("attention.wo.weight", "feed_forward.w_down.weight")):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p))
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name


def test_bf16_model_runs_with_bf16_rope_tables():
    torch.manual_seed(0)
    model = Transformer(tiny()).to(torch.bfloat16)
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        out = model(tokens)
        ref = Transformer(tiny())
        ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        expected = ref(tokens)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max().item() < 0.05


def test_pipeline_stages_without_embeddings_or_head():
    torch.manual_seed(0)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (2, 8))
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    first.norm = first.output = None
    del first.layers["1"]
    last.tok_embeddings = None
    del last.layers["0"]
    with torch.no_grad():
        hidden = first(tokens)
        out = last(hidden)
    assert hidden.shape == (2, 8, 32)
    assert torch.allclose(out, model(tokens), atol=1e-6)
    names = set(dict(last.named_parameters()))
    assert "layers.1.attention.wqkv.weight" in names and "output.weight" in names


def test_config_round_trip_and_errors():
    cfg = tiny(ffn_dim=0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="unknown keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_expert": 2})
    with pytest.raises(UserError, match="n_kv_heads"):
        tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(tiny())(torch.zeros(1, 25, dtype=torch.long))


def test_packed_rows_equal_documents_alone():
    """Two documents packed in one row: same logits and gradients as each one on its own."""
    torch.manual_seed(0)
    model = Transformer(tiny()).double()
    first, second = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 7))
    packed = torch.cat([first, second], dim=1)
    segments = torch.tensor([[0] * 9 + [1] * 7])
    logits = model(packed, segment_ids=segments)
    alone = torch.cat([model(first), model(second)], dim=1)
    torch.testing.assert_close(logits, alone)
    logits.square().sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = torch.cat([model(first), model(second)], dim=1)
    alone.square().sum().backward()
    for got, want in zip(packed_grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want)


def test_packed_positions_restart_per_segment():
    from scratchlm.model import PackedRows

    rows = PackedRows(torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]]))
    assert rows.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_scalar_head_gives_one_value_per_position():
    model = Transformer(tiny(head="scalar"))
    values = model(torch.randint(0, 97, (3, 5)))
    assert values.shape == (3, 5)
    assert model.output.weight.shape == (1, 32)
    assert model.output.weight is not model.tok_embeddings.weight
    with pytest.raises(UserError, match="model head 'value'"):
        tiny(head="value")


def _opcheck_cases():
    torch.manual_seed(0)
    freqs = torch.polar(torch.ones(6, 4), torch.randn(6, 4))
    grad = dict(requires_grad=True)
    return [
        (kernels._rms_norm, (torch.randn(2, 6, 16, **grad), torch.randn(16, **grad), 1e-5)),
        (kernels._split_qkv_rope, (torch.randn(2, 6, 2 * 4 * 8, **grad), freqs, 2, 8)),
        (kernels._split_qkv_rope, (torch.randn(2, 6, 4 * 8, **grad), freqs.expand(2, 6, 4), 2, 8)),
        (kernels._swiglu, (torch.randn(2, 6, 24), 2)),
        (
            kernels._cross_entropy,
            (torch.randn(12, 30, **grad), torch.randint(0, 30, (12,)), -100, True),
        ),
    ]


@pytest.mark.parametrize("case", range(5))
def test_custom_ops_pass_opcheck(case):
    """Schema, fake (shape-only) implementation and autograd registration agree with the real
    kernels, as torch.compile needs them to."""
    op, args = _opcheck_cases()[case]
    # SwiGLU's backward overwrites its saved input, which opcheck's repeated backwards forbid
    # (its gradient is checked against autograd in test_custom_backwards_match_finite_differences).
    # opcheck's AOT test returns every output, the loss's gradient buffer too, which the model
    # never does (test_model_compiles_without_graph_breaks traces the loss as it is used).
    tests = ["test_schema", "test_faketensor"]
    if op is not kernels._swiglu:
        tests.append("test_autograd_registration")
    if op not in (kernels._swiglu, kernels._cross_entropy):
        tests.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=tests)


def _graph_ops(fn, *args):
    """Run fn under torch.compile(fullgraph=True) with AOTAutograd (forward and backward traced,
    no code generation); returns its result and the list of ops of the traced graphs, which the
    backward's ops join when it runs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen: list[str] = []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function":
                # A mutating op (SwiGLU's backward) is wrapped to keep the graph functional.
                wrapped = "auto_functionalized" in str(node.target)
                seen.append(str(node.args[0] if wrapped else node.target))
        return make_boxed_func(gm.forward)

    compiled = torch.compile(
        fn, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record)
    )
    return compiled(*args), seen


@pytest.mark.parametrize("custom", [True, False])
def test_model_compiles_without_graph_breaks(custom, monkeypatch):
    """fullgraph=True fails on any graph break. With custom ops each kernel is one node of the
    traced forward and backward; without, inductor gets plain ops. Both match eager."""
    names = ["split_qkv_rope", "swiglu", "rms_norm", "cross_entropy"]
    monkeypatch.setitem(kernels.COMPILED_USES_CUSTOM, "cpu", dict.fromkeys(names, custom))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (2, 21))

    def loss_of(x, y):
        return cross_entropy_loss(model(x), y)

    eager = loss_of(tokens[:, :-1], tokens[:, 1:])
    eager.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, ops = _graph_ops(loss_of, tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for p, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)
    custom_ops = {op.split(".")[1] for op in ops if op.startswith("scratchlm.")}
    expected_ops = {
        "rms_norm",
        "rms_norm_backward",
        "split_qkv_rope",
        "split_qkv_rope_backward",
        "swiglu",
        "swiglu_backward",
        "cross_entropy",
    }
    assert custom_ops == (expected_ops if custom else set())


@pytest.mark.slow
def test_inductor_compiled_training_matches_eager():
    """The real compiler (inductor, C++ on CPU) around the custom ops: same loss and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (2, 21))

    def loss_of(x, y):
        return cross_entropy_loss(model(x), y)

    eager = loss_of(tokens[:, :-1], tokens[:, 1:])
    eager.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = torch.compile(loss_of, fullgraph=True)(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for p, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)
