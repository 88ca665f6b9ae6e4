import io
import math
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_parallel import (
    FIVE_STEPS,
    _assert_ok,
    _assert_same_losses,
    _resume_on_one_process,
    torchrun,
)
from test_pretrain import _fresh_copy, make_corpus_run
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from scratchlm.checkpoint import is_sharded
from scratchlm.config import PretrainConfig, load_recipe
from scratchlm.errors import UserError
from scratchlm.model import ModelConfig, Transformer, cross_entropy_loss
from scratchlm.train.metrics import read_metrics
from scratchlm.train.optim import (
    MuonAdamW,
    build_optimizer,
    lr_factor,
    orthogonalize,
)
from scratchlm.train.pretrain import pretrain


def lr_at(step, cfg, elapsed=0.0):
    return cfg.lr * lr_factor(step, cfg, elapsed)


def test_warmup_then_cosine_to_min_lr():
    cfg = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == 0.1
    assert lr_at(9, cfg) == 1.0
    assert lr_at(10, cfg) == 1.0
    # halfway through the decay the cosine is at its midpoint
    assert math.isclose(lr_at(60, cfg), 0.1 + 0.5 * 0.9)
    assert math.isclose(lr_at(110, cfg), 0.1)
    assert math.isclose(lr_at(500, cfg), 0.1)
    # the factor is the same curve relative to the peak
    cfg = PretrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=10, max_steps=110)
    assert math.isclose(lr_factor(60, cfg), 0.1 + 0.5 * 0.9)
    assert math.isclose(lr_factor(110, cfg), 0.1)


def test_wsd_holds_the_peak_then_decays_linearly():
    cfg = PretrainConfig(
        lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2
    )
    assert lr_factor(4, cfg) == 0.5
    assert all(lr_factor(s, cfg) == 1.0 for s in range(9, 91))
    assert math.isclose(lr_factor(100, cfg), 0.5)
    assert lr_factor(110, cfg) == 0.0 and lr_factor(200, cfg) == 0.0
    # Extending max_steps before the decay starts leaves the steps so far unchanged.
    longer = PretrainConfig(**{**cfg.__dict__, "max_steps": 210})
    assert all(lr_factor(s, longer) == lr_factor(s, cfg) for s in range(90))
    # A time budget ends the run (and so its decay) at max_seconds.
    timed = PretrainConfig(**{**cfg.__dict__, "max_steps": 10**6, "max_seconds": 100.0})
    assert lr_factor(50, timed, elapsed=79.0) == 1.0
    assert math.isclose(lr_factor(50, timed, elapsed=90.0), 0.5)


def test_schedule_keys_are_checked():
    recipe = load_recipe(None, ["pretrain.schedule=wsd", "pretrain.optimizer=muon"])
    assert recipe.pretrain.schedule == "wsd" and recipe.pretrain.optimizer == "muon"
    with pytest.raises(UserError, match="pretrain.schedule"):
        load_recipe(None, ["pretrain.schedule=linear"])
    with pytest.raises(UserError, match="decay_fraction = 0.0"):
        load_recipe(None, ["pretrain.decay_fraction=0"])


def test_wall_clock_budget_ends_the_decay():
    cfg = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=1000, max_seconds=100.0)
    assert math.isclose(lr_at(10, cfg, elapsed=50.0), 0.55)
    assert math.isclose(lr_at(10, cfg, elapsed=100.0), 0.1)
    assert lr_at(10, cfg, elapsed=0.0) > 0.99


def test_factor_scales_each_group_from_its_own_peak():
    cfg = PretrainConfig(lr=2.0, min_lr=0.5, warmup_steps=0, max_steps=10)
    assert lr_factor(0, cfg) == 1.0
    assert math.isclose(lr_factor(10, cfg), 0.25)


def test_no_weight_decay_on_norms_and_embeddings():
    model = torch.nn.ModuleDict(
        {
            "tok_embeddings": torch.nn.Embedding(10, 4),
            "proj": torch.nn.Linear(4, 4, bias=False),
            "norm": torch.nn.LayerNorm(4),
        }
    )
    opt = build_optimizer(model, PretrainConfig(weight_decay=0.1, lr=2e-3))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["base_lr"] == no_decay["base_lr"] == 2e-3
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3  # embedding, norm weight and bias
    assert opt.defaults["fused"]


def tiny_model(**overrides) -> Transformer:
    values = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)
    return Transformer(ModelConfig(**{**values, **overrides}))


MUON = PretrainConfig(
    optimizer="muon", lr=3e-3, muon_lr=0.02, muon_weight_decay=0.01, weight_decay=0.1
)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model(tie_embeddings=False)
    opt = build_optimizer(model, MUON)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, decay, no_decay = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert sorted(muon) == sorted(
        f"layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("attention.wqkv", "attention.wo", "feed_forward.w_gate_up", "feed_forward.w_down")
    )
    assert decay == ["output.weight"]
    assert "tok_embeddings.weight" in no_decay and "norm.weight" in no_decay
    assert [g["base_lr"] for g in opt.param_groups] == [0.02, 3e-3, 3e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.1, 0.0]


@pytest.mark.parametrize("shape", [(3, 40, 24), (2, 24, 40), (1, 32, 32)])
def test_newton_schulz_brings_singular_values_near_one(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * torch.logspace(-1, 0, shape[-1])  # spread singular values
    ortho = orthogonalize(g)
    assert ortho.shape == g.shape and ortho.dtype == torch.float32
    singular = torch.linalg.svdvals(ortho)
    assert singular.min() > 0.5 and singular.max() < 1.3
    # it keeps the singular vectors: U V^T of the input, up to the spread of the values
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cosine = (ortho * (u @ vh)).sum((-2, -1)) / (
        ortho.norm(dim=(-2, -1)) * (u @ vh).norm(dim=(-2, -1))
    )
    assert (cosine > 0.95).all()


def test_muon_step_by_hand():
    """One parameter, two steps: Nesterov momentum, orthogonalisation, shape scale, decay."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(48, 16))
    start = weight.detach().clone()
    opt = MuonAdamW(
        [
            dict(
                params=[weight],
                use_muon=True,
                lr=0.1,
                base_lr=0.1,
                weight_decay=0.5,
                momentum=0.9,
                nesterov=True,
                ns_steps=5,
            )
        ]
    )
    grads = [torch.randn(48, 16), torch.randn(48, 16)]
    expected, buf = start.clone(), torch.zeros(48, 16)
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * grad
        update = 0.1 * grad + 0.9 * buf
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(3) * orthogonalize(update[None])[0]
    torch.testing.assert_close(weight.detach(), expected)
    torch.testing.assert_close(opt.state[weight]["momentum_buffer"], buf)


def test_adamw_groups_step_as_torch_adamw():
    """Given the same gradients, Muon's AdamW groups move exactly as torch's AdamW would."""
    torch.manual_seed(0)
    a, b = tiny_model(), tiny_model()
    b.load_state_dict(a.state_dict())
    ours = build_optimizer(a, MUON)
    reference = build_optimizer(b, PretrainConfig(**{**MUON.__dict__, "optimizer": "adamw"}))
    for _ in range(3):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        reference.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if "layers." in name and p.ndim == 2:
            assert not torch.allclose(p, q)  # Muon moved these
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def _train(model, opt, batches):
    losses = []
    for tokens in batches:
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_muon_overfits_one_batch():
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (4, 17))
    model = tiny_model()
    cfg = PretrainConfig(optimizer="muon", lr=1e-2, muon_lr=0.05)
    losses = _train(model, build_optimizer(model, cfg), [tokens] * 30)
    assert losses[0] > 4.0 and losses[-1] < 0.3


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("how", ["optimizer.pt", "dcp"])
def test_muon_state_saves_and_resumes_exactly(how, tmp_path):
    torch.manual_seed(0)
    batches = [torch.randint(0, 97, (4, 17)) for _ in range(5)]
    model = tiny_model()
    opt = build_optimizer(model, MUON)
    _train(model, opt, batches[:3])
    if how == "optimizer.pt":
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    else:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save(
            {"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path), no_dist=True
        )
    expected = _train(model, opt, batches[3:])

    torch.manual_seed(1)
    resumed = tiny_model()
    resumed_opt = build_optimizer(resumed, MUON)
    if how == "optimizer.pt":
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        resumed.load_state_dict(saved["model"])
        resumed_opt.load_state_dict(saved["optim"])
    else:
        model_state, optim_state = get_state_dict(resumed, resumed_opt)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
        set_state_dict(
            resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    assert _train(resumed, resumed_opt, batches[3:]) == expected
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


MUON_RUN = [*FIVE_STEPS, "pretrain.optimizer=muon", "pretrain.muon_weight_decay=0.01"]


def test_muon_resumes_exactly_and_matches_under_fsdp2(tmp_path):
    """One process: a resume from step 3's optimizer.pt repeats steps 4-5. Two FSDP2 ranks (each
    gathers the matrices to orthogonalise them): the same losses, and their sharded checkpoint
    resumes on one process."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make_corpus_run(corpus)
    single = _fresh_copy(corpus, tmp_path / "single")
    pretrain(load_recipe(None, MUON_RUN), single, progress=False)
    step3 = single / "pretrain" / "step-000003"
    assert (step3 / "optimizer.pt").is_file()
    _resume_on_one_process(step3, corpus, tmp_path / "resumed", MUON_RUN, single)

    sharded = _fresh_copy(corpus, tmp_path / "fsdp")
    _assert_ok(torchrun(sharded, [*MUON_RUN, "parallel.dp_shard=2"]))
    _assert_same_losses(sharded, single)
    step3 = sharded / "pretrain" / "step-000003"
    assert is_sharded(step3)
    _resume_on_one_process(step3, corpus, tmp_path / "one", MUON_RUN, single)


def test_wsd_run_extends_from_a_checkpoint_before_the_decay(tmp_path):
    """A 6-step WSD run's step-3 checkpoint (still at the peak), resumed with max_steps=10, gives
    the losses of a run planned for 10 steps from the start."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make_corpus_run(corpus)
    wsd = [*FIVE_STEPS, "pretrain.schedule=wsd", "pretrain.decay_fraction=0.5"]
    short = _fresh_copy(corpus, tmp_path / "short")
    pretrain(load_recipe(None, [*wsd, "pretrain.max_steps=6"]), short, progress=False)
    planned = _fresh_copy(corpus, tmp_path / "planned")
    pretrain(load_recipe(None, [*wsd, "pretrain.max_steps=10"]), planned, progress=False)
    extended = _fresh_copy(corpus, tmp_path / "extended")
    (extended / "pretrain").mkdir()
    os.symlink(short / "pretrain" / "step-000003", extended / "pretrain" / "step-000003")
    (extended / "pretrain" / "latest").symlink_to("step-000003")
    recipe = load_recipe(None, [*wsd, "pretrain.max_steps=10"])
    pretrain(recipe, extended, resume=True, progress=False)
    _assert_same_losses(extended, planned, steps=range(4, 11))
    # while the short run had started its decay at its last step
    lrs = {
        run: {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r}
        for run in (short, planned)
    }
    assert lrs[short][5] == lrs[planned][5] and lrs[short][6] < lrs[planned][6]
