"""`scratchlm pipeline` end to end on a small corpus, as a user runs it."""

import gzip
import json

from conftest import ROOT
from test_pretrain import TINY


def test_pipeline_end_to_end_then_skips_what_is_up_to_date(cli, tmp_path):
    with gzip.open(ROOT / "data/tinystories/tinystories_train_head_lowercase.txt.gz", "rt") as f:
        (tmp_path / "stories.txt").write_text(f.read(150_000))
    run = tmp_path / "run"
    sets = [
        f'data.inputs=["{tmp_path / "stories.txt"}"]',
        "curate.text_separator='(?<!\\n)\\n(?!\\n)'",
        *TINY,
        "pretrain.max_steps=12",
        "pretrain.eval_every=6",
        "sample.prompts=['once upon a time', 'the cat']",
        "align.stages=[]",
    ]
    args = ["pipeline", "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    for path in [
        "recipe.toml",
        "tokenizer.json",
        "tokens/meta.json",
        "metrics.jsonl",
        "pretrain/latest/model.safetensors",
        "report.html",
        "loss.png",
        "curated/stats.json",
        "eval/results.json",
    ]:
        assert (run / path).exists(), path
    assert "validation bits per byte:" in first.stdout
    results = json.loads((run / "eval/results.json").read_text())
    assert results["step"] == 12 and 0 < results["val_bpb"] < 10
    assert [s["prompt"] for s in results["samples"]] == ["once upon a time", "the cat"]
    assert all(s["completion"] for s in results["samples"])
    report = (run / "report.html").read_text()
    assert "validation bits per byte" in report and "curation funnel" in report

    # Unchanged: every stage but the report is skipped.
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ["curate", "tokenizer", "tokenize", "pretrain", "eval"]:
        assert f"== {stage}: up to date, skipped" in again.stdout

    # A pretraining key changed: only pretraining and what follows it run again.
    changed = cli(*args, "--set", "pretrain.max_steps=14", "--until", "pretrain")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "== tokenize: up to date, skipped" in changed.stdout
    assert "== pretrain\n" in changed.stdout
    state = json.loads((run / "pretrain/latest/trainer_state.json").read_text())
    assert state["step"] == 14

    generated = cli(
        "generate", str(run), "--prompt", "once upon a time", "--max-new-tokens", "5", "--seed", "1"
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("once upon a time")

    # The Python API: a run folder gives the model and tokenizer; logits are [batch, time, vocab].
    import torch

    from scratchlm import load

    model, tokenizer = load(run)
    ids = tokenizer.encode("once upon a time")
    logits = model(torch.tensor([ids, ids]))
    assert logits.shape == (2, len(ids), model.config.vocab_size)

    # Export: transformers loads the folder as a Llama model with the same logits and token ids.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = cli("export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer("once upon a time", add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        ours = model(torch.tensor([ids]))
        theirs = hf_model(torch.tensor([ids])).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
