"""Damaged inputs to training, found when the loader opens the tokens folder, in one line each:
a truncated or zero-filled shard, a meta.json that does not match the shards, shards of two
tokenize runs mixed, a tokenizer that changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_shards import stories, write_docs

from scratchlm.errors import UserError
from scratchlm.shards import TokenLoader, iter_eval_batches, write_token_shards
from scratchlm.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tokens folder with several shards per split, its tokenizer)."""
    folder = tmp_path_factory.mktemp("tokens")
    tokenizer = folder / "tokenizer.json"
    train_tokenizer(stories(60_000), 400, tokenizer)
    files = write_docs(folder / "docs", stories(150_000))
    write_token_shards(files, tokenizer, folder / "tokens", 0.1, workers=1, shard_tokens=10_000)
    return folder / "tokens", tokenizer


@pytest.fixture
def damaged(tokens, tmp_path) -> Path:
    """A copy to damage."""
    return Path(shutil.copytree(tokens[0], tmp_path / "tokens"))


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def _open(folder: Path, tokenizer: Path | None = None) -> TokenLoader:
    return TokenLoader(folder, "train", 32, 4, tokenizer=tokenizer and Tokenizer.load(tokenizer))


def test_the_intact_folder_opens(tokens):
    loader = _open(tokens[0], tokens[1])
    assert len(_meta(tokens[0])["splits"]["train"]["shards"]) > 2
    assert loader.next_batch()[0].shape == (4, 32)


def test_a_truncated_shard(damaged):
    shard = damaged / "train-00001.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(UserError) as caught:
        _open(damaged)
    assert str(caught.value) == (
        f"token shard {shard} has {size - 100} bytes, but meta.json lists {size // 2} tokens "
        f"({size} bytes): the shard is truncated, or meta.json is not its own; "
        "rerun `scratchlm tokenize`"
    )
    # Evaluation opens the folder the same way.
    with pytest.raises(UserError, match="truncated"):
        next(iter_eval_batches(damaged, "train", 32, 4, 1000))


def test_a_shard_whose_end_was_zero_filled(damaged):
    shard = damaged / "train-00002.bin"
    with open(shard, "r+b") as f:
        f.seek(-64, 2)
        f.write(bytes(64))
    with pytest.raises(UserError, match=r"train-00002.bin does not end with <\|eos\|>"):
        _open(damaged)


def test_a_meta_json_that_does_not_match_the_shards(damaged):
    meta = _meta(damaged)
    meta["splits"]["train"]["shards"][0]["tokens"] -= 3
    meta["splits"]["train"]["tokens"] -= 3
    (damaged / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="train-00000.bin has .* the shard is longer"):
        _open(damaged)
    meta["splits"]["train"]["tokens"] += 7
    (damaged / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta.json is inconsistent: the train shards it lists"):
        _open(damaged)
    del meta["splits"]["train"]["shards"]
    (damaged / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"meta.json is damaged \(no valid 'shards'\)"):
        _open(damaged)


def test_shards_of_two_tokenize_runs(damaged):
    shutil.copy(damaged / "train-00000.bin", damaged / "train-00099.bin")
    with pytest.raises(UserError, match="does not list train-00099.bin: the folder mixes"):
        _open(damaged)


def test_a_missing_shard(damaged):
    (damaged / "train-00001.bin").unlink()
    with pytest.raises(UserError, match="train-00001.bin is missing"):
        _open(damaged)


def test_a_tokenizer_that_changed(tokens, tmp_path):
    changed = tmp_path / "tokenizer.json"
    train_tokenizer(stories(30_000), 350, changed)
    with pytest.raises(UserError, match="written with another tokenizer .*changed after"):
        _open(tokens[0], changed)


def test_a_resume_on_shards_of_another_tokenizer_is_refused(tokens, damaged):
    state = _open(tokens[0]).state_dict()
    meta = _meta(damaged)
    meta["tokenizer_sha256"] = "0" * 64
    (damaged / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="saved data-loader position is for tokenizer_sha256="):
        _open(damaged).load_state_dict(state)
