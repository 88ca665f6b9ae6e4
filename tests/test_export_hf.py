import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from scratchlm.errors import UserError
from scratchlm.export.hf import export_hf
from scratchlm.infer.generate import generate
from scratchlm.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "user": "<|user|>"}
TEXT = (
    "Once upon a time there was a little fox. The fox liked to run in the green forest. "
    "One day the fox met a bird, and the bird sang a song about the sun and the rain. "
) * 20


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos)]
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_the_export_unchanged(tmp_path, tokenizer_json, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=320,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        tie_embeddings=tie,
        rope_theta=500.0,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    out = export_hf(model, tokenizer_json, tmp_path / "hf", SPECIAL)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.tie_word_embeddings == tie
    tokens = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        diff = (hf(input_ids=tokens).logits - model(tokens)).abs().max().item()
    assert diff < 1e-4

    prompt = [5, 17, 42, 8]
    ours = list(generate(model, prompt, max_new_tokens=12, temperature=0))
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert ours == theirs


def test_tokenizer_round_trip(tmp_path, tokenizer_json):
    model = Transformer(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    out = export_hf(model, tokenizer_json, tmp_path / "hf", SPECIAL)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = Tokenizer.from_file(tokenizer_json)
    for text in ["Once upon a time", "the fox met a bird.\n  Then: rain!", "ünïcödé ☃ words"]:
        expected = tok.encode(text).ids
        assert hf_tok(text)["input_ids"] == expected
        assert expected[0] == tok.token_to_id("<|bos|>")
        assert hf_tok.decode(expected, skip_special_tokens=True) == text
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )
    assert hf_tok.pad_token_id == tok.token_to_id("<|pad|>")
    chat = hf_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|bos|>user\nhi<|eos|>assistant\n"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.token_to_id("<|eos|>")


def test_export_errors(tmp_path, tokenizer_json):
    model = Transformer(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    with pytest.raises(UserError, match="not in"):
        export_hf(model, tokenizer_json, tmp_path / "a", {**SPECIAL, "eos": "<|end|>"})
    with pytest.raises(UserError, match="needs pad"):
        export_hf(model, tokenizer_json, tmp_path / "b", {"bos": "<|bos|>", "eos": "<|eos|>"})
    small = Transformer(ModelConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    with pytest.raises(UserError, match="embeddings"):
        export_hf(small, tokenizer_json, tmp_path / "c", SPECIAL)
