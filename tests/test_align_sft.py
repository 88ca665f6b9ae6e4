"""SFT: packing, the assistant-only loss, and the stage as a user runs it."""

import json
import random

import pytest
import torch
from align_helpers import random_words, tiny_run, write_jsonl

from scratchlm.align.batches import PackedChatLoader, pack_chats
from scratchlm.align.losses import IGNORE
from scratchlm.align.sft import sft_loss
from scratchlm.model import ModelConfig, Transformer, cross_entropy_loss


def test_pack_chats_places_segments_and_assistant_targets():
    chats = [
        ([0, 5, 6, 7], [0, 0, 1, 1]),
        ([0, 8, 9], [0, 1, 1]),
        ([0, 3, 4, 5, 6], [0, 0, 0, 1, 1]),
    ]
    packed = pack_chats(chats, seq_len=6, pad_id=2)
    # first-fit: chat 0 (3 places) and chat 1 (2 places) share row 0; chat 2 (4 places) row 1
    assert packed["tokens"].tolist() == [[0, 5, 6, 0, 8, 2], [0, 3, 4, 5, 2, 2]]
    assert packed["targets"].tolist() == [
        [IGNORE, 6, 7, 8, 9, IGNORE],
        [IGNORE, IGNORE, 5, 6, IGNORE, IGNORE],
    ]
    assert packed["segments"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]]


@torch.no_grad()
def test_packed_loss_equals_unpacked_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=32))  # fmt: skip
    rng = random.Random(0)
    chats = []
    for n in (7, 12, 5, 9):
        ids = [0] + [rng.randrange(7, 40) for _ in range(n - 1)]
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        chats.append((ids, mask))
    packed = pack_chats(chats, seq_len=32, pad_id=2)
    assert len(packed["tokens"]) == 1  # all four share one row
    packed_loss, _ = sft_loss(model, packed)

    # Unpacked: each chat alone, causal attention from position 0; the mean over all their
    # assistant tokens.
    total, count = 0.0, 0
    for ids, mask in chats:
        tokens = torch.tensor([ids[:-1]])
        targets = torch.tensor(
            [[t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)]]
        )
        n = int((targets != IGNORE).sum())
        total += float(cross_entropy_loss(model(tokens), targets)) * n
        count += n
    assert float(packed_loss) == pytest.approx(total / count, rel=1e-5)

    # And position by position: the packed row's logits are each chat's own.
    logits = model(packed["tokens"], segment_ids=packed["segments"])
    at = 0
    for ids, _ in chats:
        alone = model(torch.tensor([ids[:-1]]))[0]
        torch.testing.assert_close(logits[0, at : at + len(ids) - 1], alone, atol=1e-5, rtol=1e-4)
        at += len(ids) - 1


def test_packed_loader_resumes_on_the_same_rows():
    chats = [([0] + [5] * n, [0] + [1] * n) for n in range(3, 20)]
    loader = PackedChatLoader(chats, seq_len=24, pad_id=2, rows_per_step=3, seed=1)
    for _ in range(4):  # past the end of the first epoch
        loader.next_batch()
    state = loader.state_dict()
    expected = loader.next_batch()
    again = PackedChatLoader(chats, seq_len=24, pad_id=2, rows_per_step=3, seed=1)
    again.load_state_dict(state)
    got = again.next_batch()
    assert state["epoch"] >= 1
    for key in expected:
        assert torch.equal(got[key], expected[key])
    # Two ranks each take their half of the same global step.
    halves = [
        PackedChatLoader(chats, 24, 2, rows_per_step=4, seed=1, dp_rank=r, dp_size=2).next_batch()
        for r in (0, 1)
    ]
    whole = PackedChatLoader(chats, 24, 2, rows_per_step=4, seed=1).next_batch()
    assert torch.equal(torch.cat([h["tokens"] for h in halves]), whole["tokens"])


def test_sft_stage_from_the_cli(cli, tmp_path):
    rng = random.Random(0)
    chats = [
        {
            "messages": [
                {"role": "user", "content": random_words(rng, 4)},
                {"role": "assistant", "content": random_words(rng, 3)},
            ]
        }  # fmt: skip
        for _ in range(60)
    ]
    chats.append({"messages": [{"role": "user", "content": "no answer"}]})
    data = write_jsonl(tmp_path / "chat.jsonl", chats)
    run = tiny_run(tmp_path, [random_words(rng, 50) for _ in range(20)])
    sets = [f'sft.data=["{data}"]', "sft.max_steps=4", "sft.eval_every=2", "sft.rows_per_step=4",
            "sft.device='cpu'", "align.prompts=['the cat']", "align.max_new_tokens=4"]  # fmt: skip
    before = cli("reward", "--run-dir", str(run), *[a for s in sets for a in ("--set", s)])
    assert before.returncode == 2
    assert before.stderr.strip().splitlines() == [
        f"error: reward starts from the sft model, but {run}/sft has no checkpoint: run "
        f"`scratchlm sft --run-dir {run}` first"
    ]

    result = cli("sft", "--run-dir", str(run), *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("sft: 4 steps on ") and "val_loss" in last and "sft/step-000004" in last
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "sft" and "loss" in r] == [1, 2, 3, 4]
    assert any("val_loss" in r for r in rows)
    state = json.loads((run / "sft/latest/trainer_state.json").read_text())
    assert state["started_from"] == {"checkpoint": "pretrain/step-000000"}
    rejected = (run / "sft/data/rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["reason"] for line in rejected] == ["no assistant turn"]
    answers = json.loads((run / "sft/answers.json").read_text())
    assert [a["prompt"] for a in answers] == ["the cat"]
