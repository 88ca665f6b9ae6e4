"""Non-finite losses (on_nonfinite = "stop" | "skip") and out-of-memory in the one training loop,
with a made-up stage of two trained models, as any stage runs on it."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.config import ParallelConfig, TrainConfig
from scratchlm.errors import RunFault, UserError
from scratchlm.model import ModelConfig, Transformer, cross_entropy_loss
from scratchlm.train.loop import Session
from scratchlm.train.metrics import read_metrics

CFG = dict(vocab_size=50, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8)


def run_stage(run_dir, nan_at=(), critic_nan_at=(), oom_at=None, resume=False, **overrides):
    """A policy and a critic trained side by side for 6 steps, a checkpoint every step; the
    policy's loss is NaN at the steps in `nan_at`, the critic's at `critic_nan_at`."""
    cfg = TrainConfig(
        **{
            "max_steps": 6,
            "lr": 1e-2,
            "warmup_steps": 1,
            "micro_batch_size": 2,
            "eval_every": 0,
            "save_every": 1,
            "keep_checkpoints": 10,
            "device": "cpu",
            **overrides,
        }
    )
    session = Session("toy", run_dir, cfg, ParallelConfig(), resume=resume, progress=False)
    batch = session.batch_layout(4, cfg.micro_batch_size)
    policy = session.trainer(Transformer(ModelConfig(**CFG)), batch)
    critic = session.trainer(Transformer(ModelConfig(**CFG, head="scalar")), batch, name="critic")
    generator = torch.Generator().manual_seed(0)

    def lm(model, tokens):
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        if session.step + 1 == oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss * (math.nan if session.step + 1 in nan_at else 1.0), {}

    def value(model, tokens):
        loss = model(tokens[:, :-1]).square().mean()
        return loss * (math.inf if session.step + 1 in critic_nan_at else 1.0), {}

    def step():
        tokens = torch.randint(0, 50, (4, 9), generator=generator)
        return {**policy.step(tokens, lm), "value_loss": critic.step(tokens, value)["loss"]}

    return session.run(step, lambda: {"val_loss": 1.0}, {})


def _weights(run_dir, step, part="model"):
    return load_file(run_dir / "toy" / f"step-{step:06d}" / f"{part}.safetensors")


def test_stop_names_the_step_and_applies_no_update(tmp_path):
    with pytest.raises(RunFault) as caught:
        run_stage(tmp_path, nan_at={4})
    assert str(caught.value) == (
        "toy: non-finite values at step 4 (loss nan, gradient norm nan); the update was not "
        "applied and the run stopped. Lower toy.lr, raise toy.warmup_steps or lower "
        "toy.grad_clip, then continue from step-000003 with --resume; or set "
        "toy.on_nonfinite='skip' to skip such steps"
    )
    assert sorted(p.name for p in (tmp_path / "toy").glob("step-*"))[-1] == "step-000003"
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert not (tmp_path / ".lock").exists()


def test_skip_drops_the_update_counts_it_and_goes_on(tmp_path, capsys):
    result = run_stage(tmp_path, nan_at={3}, on_nonfinite="skip")
    assert result["step"] == 6 and result["skipped_steps"] == 1
    # Step 3's update was not applied: the policy's weights after it are those after step 2.
    for name, tensor in _weights(tmp_path, 2).items():
        assert torch.equal(_weights(tmp_path, 3)[name], tensor), name
    assert not torch.equal(
        _weights(tmp_path, 3)["norm.weight"], _weights(tmp_path, 4)["norm.weight"]
    )
    rows = read_metrics(tmp_path / "metrics.jsonl")
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["step"], r["nonfinite_loss"], r["skipped_steps"]) for r in skipped] == [
        (3, "nan", 1)
    ]
    assert all("loss" in r for r in rows if "lr" in r and r["step"] != 3)
    state = json.loads((tmp_path / "toy/latest/trainer_state.json").read_text())
    assert state["skipped_steps"] == 1
    assert "toy: skipped the update of step 3: loss nan, gradient norm nan (1 in a row" in (
        capsys.readouterr().out
    )


def test_skip_stops_with_a_checkpoint_after_too_many_in_a_row(tmp_path):
    with pytest.raises(
        RunFault,
        match=r"non-finite values at steps 3-4, 2 in a row .*checkpoint "
        r"at step-000004\. Lower toy.lr",
    ):
        run_stage(tmp_path, nan_at={3, 4}, on_nonfinite="skip", nonfinite_limit=2, save_every=0)
    assert sorted(p.name for p in (tmp_path / "toy").glob("step-*")) == ["step-000004"]
    state = json.loads((tmp_path / "toy/latest/trainer_state.json").read_text())
    assert state["step"] == 4 and state["skipped_steps"] == 2


def test_a_second_model_going_non_finite_is_named(tmp_path):
    with pytest.raises(RunFault, match=r"at step 2 \(critic: loss inf, gradient norm nan\)"):
        run_stage(tmp_path, critic_nan_at={2})
    # The policy's update of step 2 was applied (its loss was finite); the critic's was not.
    assert (tmp_path / "toy/step-000001/critic.safetensors").exists()


def test_out_of_memory_is_one_line(tmp_path):
    with pytest.raises(RunFault) as caught:
        run_stage(tmp_path, oom_at=3)
    assert str(caught.value) == (
        "toy: out of memory on cpu after step 2 (micro-batches of 2 rows); lower "
        "toy.micro_batch_size (more micro-batches are accumulated, so the step stays the same) "
        "or set parallel.activation_checkpointing=true"
    )
    assert not (tmp_path / ".lock").exists()


def test_skip_under_deepspeed_is_refused_up_front(tmp_path):
    cfg = TrainConfig(on_nonfinite="skip", device="cpu")
    with pytest.raises(UserError, match="on_nonfinite='skip' needs the update held back"):
        Session("toy", tmp_path, cfg, ParallelConfig(engine="deepspeed"))


def test_a_finished_run_resumed_logs_its_final_evaluation_once(tmp_path):
    run_stage(tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "val_loss" in r] == [6]
    # Killed after its last checkpoint: the resume has nothing to train and evaluates again.
    run_stage(tmp_path, resume=True)
    assert read_metrics(tmp_path / "metrics.jsonl")[:-1] == rows[:-1]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r] == [6]
