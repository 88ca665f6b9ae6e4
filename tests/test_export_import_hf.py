"""`scratchlm import-hf`: a Hugging Face Llama in, the same logits out; import, export, import."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import corpus
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from scratchlm.errors import UserError
from scratchlm.export.hf import export_run
from scratchlm.export.hf_import import import_hf
from scratchlm.loading import load, load_model
from scratchlm.tokenizer import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")

VOCAB = 300


def hf_tokenizer(folder):
    """A Llama-2-like byte-level BPE with <s> and </s>, as many checkpoints bring."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus(20_000)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return tok


def random_llama(folder, tie: bool, vocab_size: int = VOCAB):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that a misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    hf_tokenizer(folder)
    return model


@pytest.mark.parametrize("tie, vocab_size", [(True, VOCAB), (False, VOCAB + 12)])
def test_imported_llama_gives_the_same_logits(tmp_path, tie, vocab_size):
    hf = random_llama(tmp_path / "hf", tie, vocab_size)
    checkpoint = import_hf(tmp_path / "hf", tmp_path / "run")
    assert checkpoint.parent.name == "imported"
    model, tokenizer = load(tmp_path / "run")
    assert model.config.tie_embeddings == tie and model.config.rope_theta == 5000.0
    assert model.config.n_kv_heads == 2 and model.config.max_seq_len == 128
    tokens = torch.randint(0, VOCAB, (2, 50))
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
        ours = model(tokens)
    added = [tokenizer.special_ids[t] for t in ("<|pad|>", "<|system|>", "<|end|>")]
    kept = [i for i in range(vocab_size) if i < VOCAB or i > VOCAB + 4]  # not the added ids
    assert (ours[..., kept] - theirs[..., kept]).abs().max().item() < 1e-4
    # The model's own bos/eos keep their ids under scratchlm's names; the chat markers are new.
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert all(tokenizer.special_ids[t] is not None for t in SPECIAL_TOKENS)
    assert (
        tokenizer.encode("the fox")
        == HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
        .encode("the fox", add_special_tokens=False)
        .ids
    )
    assert min(added) >= VOCAB and model.config.vocab_size == max(vocab_size, VOCAB + 5)
    mean = model.tok_embeddings.weight[:VOCAB].mean(0)
    assert torch.allclose(model.tok_embeddings.weight[added[0]], mean, atol=1e-6)


def test_import_export_import_is_identical(tmp_path):
    random_llama(tmp_path / "hf", tie=False)
    first = import_hf(tmp_path / "hf", tmp_path / "run1")
    export_run(tmp_path / "run1", tmp_path / "hf2")
    second = import_hf(tmp_path / "hf2", tmp_path / "run2")
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((first / "config.json").read_text()) == json.loads(
        (second / "config.json").read_text()
    )
    t1 = json.loads((tmp_path / "run1" / "tokenizer.json").read_text())
    t2 = json.loads((tmp_path / "run2" / "tokenizer.json").read_text())
    assert t1["model"]["vocab"] == t2["model"]["vocab"] and t1["added_tokens"] == t2["added_tokens"]


def test_the_imported_run_generates_and_exports(tmp_path, cli):
    random_llama(tmp_path / "hf", tie=True)
    import_hf(tmp_path / "hf", tmp_path / "run")
    model, source = load_model(tmp_path / "run")  # what pretrain.init_from = "DIR" starts from
    assert source.parent.name == "imported" and model.config.tie_embeddings
    r = cli("generate", str(tmp_path / "run"), "--prompt", "the fox", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("the fox"), r.stderr
    out = export_run(tmp_path / "run", tmp_path / "again")
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings


def test_unsupported_or_incomplete_checkpoints_are_one_line_errors(tmp_path, cli):
    random_llama(tmp_path / "hf", tie=True)
    hf, run = tmp_path / "hf", tmp_path / "run"
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    result = cli("import-hf", str(hf), "--run-dir", str(run))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "GPT2LMHeadModel" in result.stderr
    rope = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    (hf / "config.json").write_text(json.dumps(config | rope))
    with pytest.raises(UserError, match="RoPE scaling 'llama3'"):
        import_hf(hf, run)
    (hf / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    with pytest.raises(UserError, match="biases"):
        import_hf(hf, run)
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "model.safetensors").rename(tmp_path / "weights.bin")
    with pytest.raises(UserError, match="no model.safetensors"):
        import_hf(hf, run)
    (hf / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        import_hf(hf, run)
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path / "nothing", run)


@pytest.mark.slow
def test_pretraining_continues_from_an_imported_llama(tmp_path, cli):
    from scratchlm.documents import write_documents

    random_llama(tmp_path / "hf", tie=False)
    run = tmp_path / "run"
    import_hf(tmp_path / "hf", run)
    text = corpus(60_000).split("\n\n")
    write_documents(
        run / "curated" / "part-00000.jsonl.zst",
        [{"id": str(i), "text": t, "meta": {}} for i, t in enumerate(text) if t.strip()],
    )
    settings = [
        "pretrain.init_from=" + str(run / "imported"),
        "pretrain.max_steps=3",
        "pretrain.micro_batch_size=4",
        "pretrain.tokens_per_step=512",
        "pretrain.eval_every=3",
        "pretrain.eval_tokens=512",
        "pretrain.save_every=3",
        "model.max_seq_len=128",
    ]
    r = cli("tokenize", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    args = [a for s in settings for a in ("--set", s)]
    r = cli("pretrain", "--run-dir", str(run), *args)
    assert r.returncode == 0, r.stderr
    trained, _ = load(run)  # the newest stage: pretrain, grown from the imported weights
    imported, _ = load(run / "imported")
    assert trained.config == imported.config
    assert not torch.equal(trained.output.weight, imported.output.weight)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "has no hidden_size"),
        (lambda c: c | {"num_attention_heads": 0}, "num_attention_heads = 0: expected an integer"),
        (lambda c: c | {"vocab_size": "2048"}, 'vocab_size = "2048": expected an integer'),
        (lambda c: [c], "config.json holds a list, not an object"),
        (lambda c: c | {"vocab_size": 1e12}, "vocab_size = 1000000000000.0: expected an integer"),
        (lambda c: c | {"vocab_size": 10**12}, "vocab_size = 1000000000000: expected an integer"),
        (lambda c: c | {"num_hidden_layers": 1}, "the weights have 2 layers, config.json num_hid"),
        (lambda c: c | {"num_hidden_layers": 4}, "the weights have 2 layers, config.json num_hid"),
        (lambda c: c | {"intermediate_size": 128}, "gate_proj.weight has shape [160, 64], config"),
        (lambda c: c | {"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads 3"),
        (lambda c: c | {"hidden_size": 66}, "hidden_size 66 must be num_attention_heads 4 x an"),
        (lambda c: c | {"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or f"),
        (lambda c: c | {"rms_norm_eps": -1}, "rms_norm_eps = -1: expected a positive number"),
        (lambda c: c | {"bos_token_id": "1"}, 'bos_token_id = "1": expected an id'),
    ],
)
def test_a_hostile_config_is_one_line_and_writes_nothing(tmp_path, capsys, change, message):
    from scratchlm.cli import main

    random_llama(tmp_path / "hf", tie=False)
    hf, run = tmp_path / "hf", tmp_path / "run"
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(change(config)))
    capsys.readouterr()  # transformers' progress bars
    assert main(["import-hf", str(hf), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not run.exists()


def test_an_index_naming_a_file_outside_the_folder_is_refused(tmp_path):
    random_llama(tmp_path / "hf", tie=True)
    hf = tmp_path / "hf"
    (hf / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="elsewhere.safetensors is missing"):
        import_hf(hf, tmp_path / "run")
    assert not (tmp_path / "run").exists()
