"""The one training loop with a stage of its own: two trained models, any loss, exact resume."""

import json

import pytest
import torch

from scratchlm.checkpoint import load_checkpoint
from scratchlm.config import ParallelConfig, TrainConfig
from scratchlm.model import ModelConfig, Transformer, cross_entropy_loss
from scratchlm.train.loop import Session, TrainingInterrupted, cut_batch
from scratchlm.train.metrics import read_metrics

CFG = dict(vocab_size=50, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8)


class CountingData:
    """Deterministic batches from a position that checkpoints save and restore."""

    def __init__(self) -> None:
        self.position = 0

    def next_batch(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.position)
        self.position += 1
        return torch.randint(0, 50, (4, 9), generator=generator)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def run_stage(run_dir, resume=False, max_steps=4, stop_at=None):
    """A made-up stage: a language model and a scalar-head model trained side by side."""
    cfg = TrainConfig(
        max_steps=max_steps,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=1,
        micro_batch_size=2,
        eval_every=2,
        save_every=2,
        keep_checkpoints=5,
        device="cpu",
    )
    session = Session("toy", run_dir, cfg, ParallelConfig(), resume=resume, progress=False)
    batch = session.batch_layout(4, cfg.micro_batch_size)
    policy = session.trainer(Transformer(ModelConfig(**CFG)), batch)
    critic = session.trainer(Transformer(ModelConfig(**CFG, head="scalar")), batch, name="critic")
    data = CountingData()

    def lm(model, tokens):
        return cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]), {"rows": len(tokens)}

    def value(model, tokens):
        return model(tokens[:, :-1]).square().mean(), {}

    def step():
        if stop_at is not None and session.step == stop_at:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        tokens = data.next_batch()
        return {**policy.step(tokens, lm), "value_loss": critic.step(tokens, value)["loss"]}

    def evaluate():
        with torch.no_grad():
            return {"val_loss": float(lm(policy.model, data.next_batch())[0])}

    return session.run(step, evaluate, {"data": data})


def test_cut_batch_splits_tensors_tuples_and_dicts():
    x = torch.arange(8).view(4, 2)
    assert [t.tolist() for t in cut_batch(x, 2)] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    pairs = cut_batch((x, x + 10), 2)
    assert len(pairs) == 2 and pairs[1][1].tolist() == [[14, 15], [16, 17]]
    rows = cut_batch({"a": x}, 4)
    assert [r["a"].tolist() for r in rows] == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]


def test_two_models_checkpoint_together_and_resume_exactly(tmp_path):
    whole = tmp_path / "whole"
    result = run_stage(whole)
    assert result["step"] == 4
    rows = [r for r in read_metrics(whole / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {r["stage"] for r in rows} == {"toy"}
    assert all(r["rows"] == 2 and "value_loss" in r and "grad_norm" in r for r in rows)

    step2 = load_checkpoint(whole / "toy" / "step-000002")
    tensors, config = step2.part("critic")
    assert config["head"] == "scalar" and tensors["output.weight"].shape == (1, 16)
    assert step2.optimizer_state("critic") is not None
    assert json.loads((step2.path / "trainer_state.json").read_text())["data"] == {"position": 3}

    # SIGTERM during step 3: the step finishes, a checkpoint is saved; then a resume.
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted) as stopped:
        run_stage(part, stop_at=2)
    assert stopped.value.stage == "toy"
    run_stage(part, resume=True)
    got = {r["step"]: r for r in read_metrics(part / "metrics.jsonl") if "loss" in r}
    for row in rows:
        assert got[row["step"]]["loss"] == pytest.approx(row["loss"], rel=1e-6)
        assert got[row["step"]]["value_loss"] == pytest.approx(row["value_loss"], rel=1e-6)
    final_whole, final_part = (load_checkpoint(r / "toy") for r in (whole, part))
    for name in ("model", "critic"):
        for key, tensor in final_whole.part(name)[0].items():
            torch.testing.assert_close(final_part.part(name)[0][key], tensor, msg=key)


def test_resuming_a_finished_run_keeps_its_last_checkpoint(tmp_path):
    run_stage(tmp_path)
    state_path = tmp_path / "toy" / "step-000004" / "trainer_state.json"
    before = json.loads(state_path.read_text())
    assert run_stage(tmp_path, resume=True)["step"] == 4
    after = json.loads(state_path.read_text())
    before.pop("elapsed"), after.pop("elapsed")
    assert after == before  # the schedule factor of the last step taken, not of the next one
