"""GGUF export: read back with gguf's reader; llama.cpp (llama-cpp-python) runs it as we do."""

import numpy as np
import pytest
import torch
from tiny_run import make_run

from scratchlm.errors import UserError
from scratchlm.export.gguf import export_gguf, gguf_tensors, tokenizer_pre_name
from scratchlm.infer.generate import generate
from scratchlm.loading import load
from scratchlm.model import ModelConfig, Transformer

gguf = pytest.importorskip("gguf")

TEXT = "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak."
# Tolerances on logits of order 1: fp16 weights, and q8_0 weights with q8 activations in
# llama.cpp's matmuls.
TOLERANCE = {"f32": 1e-3, "f16": 5e-3, "q8_0": 6e-2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # head_dim 32 and widths that are whole q8_0 blocks; untied, so output.weight is written too.
    return make_run(tmp_path_factory.mktemp("gguf") / "run", dim=128, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="module")
def files(run, tmp_path_factory):
    model, tokenizer = load(run)
    folder = tmp_path_factory.mktemp("files")
    return {d: export_gguf(model, tokenizer, folder / f"model-{d}.gguf", d) for d in TOLERANCE}


def test_gguf_reads_back_with_llama_metadata_tokenizer_and_tensors(run, files):
    model, tokenizer = load(run)
    expected = dict(gguf_tensors(model))
    for dtype, path in files.items():
        reader = gguf.GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()}
        assert fields["general.architecture"] == "llama"
        assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 128
        assert fields["llama.attention.head_count_kv"] == 2
        assert fields["llama.rope.freq_base"] == 10000.0
        assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "dbrx"
        tokens = fields["tokenizer.ggml.tokens"]
        assert len(tokens) == model.config.vocab_size
        assert tokens[tokenizer.end_id] == "<|end|>"
        types = fields["tokenizer.ggml.token_type"]
        assert (
            types[tokenizer.bos_id] == gguf.TokenType.CONTROL
            and types[300] == gguf.TokenType.NORMAL
        )
        assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.end_id
        assert len(fields["tokenizer.ggml.merges"]) > 0
        assert "<|assistant|>" in fields["tokenizer.chat_template"]
        names = [t.name for t in reader.tensors]
        assert names == list(expected)  # llama.cpp's names, layer by layer
        for t in reader.tensors:
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected[t.name].shape)
            diff = np.abs(values - expected[t.name].numpy()).max()
            if dtype == "f32" or t.name.endswith("norm.weight"):
                assert t.tensor_type == gguf.GGMLQuantizationType.F32 and diff == 0
            else:
                assert t.tensor_type.name == dtype.upper() and diff < 2e-3, t.name


def test_refusals(tmp_path, run):
    _, tokenizer = load(run)
    cfg = ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head="scalar")
    with pytest.raises(UserError, match="scalar head"):
        export_gguf(Transformer(cfg), tokenizer, tmp_path / "r.gguf")
    with pytest.raises(UserError, match="not BPE"):
        tokenizer_pre_name({"model": {"type": "WordPiece"}})
    with pytest.raises(UserError, match="pre-tokenizer"):
        tokenizer_pre_name({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace"}})
    with pytest.raises(UserError, match="--dtype"):
        export_gguf(load(run)[0], tokenizer, tmp_path / "x.gguf", "q4_k")
    assert not list(tmp_path.iterdir())


def test_export_and_serve_refuse_a_scalar_head(tmp_path, cli):
    from scratchlm.serve.server import serve

    run = make_run(tmp_path / "reward", head="scalar")
    r = cli("export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
    assert "scalar head" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="scalar head"):
        serve(run, port=1)


def llama_cpp_model(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    low = llama_cpp.llama_cpp  # the C API module that Llama takes its defaults from
    params = low.llama_model_default_params
    low.llama_model_default_params = lambda: _no_repacking(params())
    try:
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0
        )
    finally:
        low.llama_model_default_params = params


def _no_repacking(params):
    # llama.cpp repacks q8_0 weights for AMX when the CPU lists it; on VMs that list AMX without
    # enabling it the repacked kernels die with a protection fault, so load weights as stored.
    params.use_extra_bufts = False
    return params


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_llama_cpp_runs_the_export_like_scratchlm(run, files, dtype):
    model, tokenizer = load(run)
    llm = llama_cpp_model(files[dtype])
    try:
        ids = tokenizer.encode(TEXT, add_bos=True)
        assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == ids
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        assert np.abs(theirs - ours).max() < TOLERANCE[dtype]
        if dtype == "f32":  # greedy decoding agrees token for token
            prompt = tokenizer.encode("First Citizen:", add_bos=True)
            expected = list(generate(model, prompt, 32, temperature=0))
            llm.reset()
            got = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                got.append(token)
                if len(got) == 32:
                    break
            assert got == expected
    finally:
        llm.close()
