"""ModelConfig: the few numbers our decoder needs, read from an HF config.json.

Accepts both spellings of RoPE settings (`rope_theta` + `rope_scaling` of
transformers 4, `rope_parameters` of transformers 5) so checkpoints from either
era load the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fusionserve.models.errors import CheckpointError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPTNeoXForCausalLM": "gpt_neox",
}
#: GPT-NeoX activations: exact GELU, or its tanh approximation under HF's other names.
GELU_ACTS = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dtype: torch.dtype = torch.float32
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    # GPT-NeoX (Pythia): LayerNorm with bias, partial rotary, a plain GELU MLP with biases, the
    # parallel residual. Llama-family defaults otherwise.
    layer_norm: bool = False
    rotary_dim: int | None = None  # None: the whole head
    parallel_residual: bool = False
    gelu: str | None = None  # None: gated SiLU; "none" / "tanh": GELU's approximate= argument
    dense_bias: bool = False  # o_proj and the MLP carry biases
    # "fp8": the block's linear layers run e4m3 weights (per output channel) and per-token dynamic
    # e4m3 activations (kernels/fp8.py); set by a compressed-tensors checkpoint or --quantization.
    quantization: str | None = None

    @property
    def rotary_dims(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")) or "default"

    def rope_inv_freq(self) -> torch.Tensor:
        """Per-pair rotary frequencies, with the checkpoint's scaling applied (fp32, [head_dim/2])."""
        dim = self.rotary_dims
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        kind = self.rope_type
        if kind == "linear":
            return inv / float(self.rope_scaling["factor"])
        if kind == "llama3":
            s = self.rope_scaling
            factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
            old_len = float(s["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            return torch.where(medium, smoothed, scaled)
        return inv

    def rope_table(self, max_positions: int) -> torch.Tensor:
        """cos | sin table [max_positions, rotary dims] in fp32, the layout kernels/reference.rope
        reads (its width says how many leading dims of a head rotate)."""
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), self.rope_inv_freq())
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _first(raw: dict, *keys: str, default=None):
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    return default


def parse_config(raw: dict, source: str | Path = "config.json") -> ModelConfig:
    """Validate an HF config dict; anything we would compute wrongly is refused here, not at step 1000."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        model_type = raw.get("model_type")
        arch = next((a for a, t in SUPPORTED_ARCHITECTURES.items() if t == model_type), None)
    if arch is None:
        raise CheckpointError(
            f"unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            file=source,
        )
    quantization = checkpoint_quantization(raw.get("quantization_config"), source)
    if arch == "GPTNeoXForCausalLM":
        if quantization:
            raise CheckpointError("FP8 is implemented for RMSNorm (Llama-family) models only", file=source)
        return _parse_neox(raw, source)
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        rope_params = dict(raw.get("rope_parameters") or {})
        rope_scaling = dict(raw.get("rope_scaling") or {})
        rope_scaling = {**rope_params, **rope_scaling}
        theta = float(_first(raw, "rope_theta", default=rope_scaling.pop("rope_theta", 10000.0)))
        rope_scaling.pop("rope_theta", None)
        if rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = {}
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        dtype = _DTYPES.get(str(_first(raw, "torch_dtype", "dtype", default="float32")), torch.float32)
        window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        cfg = ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(_first(raw, "num_key_value_heads", default=heads)),
            head_dim=int(_first(raw, "head_dim", default=hidden // heads)),
            rms_norm_eps=float(_first(raw, "rms_norm_eps", default=1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(_first(raw, "max_position_embeddings", default=4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            dtype=dtype,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=int(window) if window else None,
            quantization=quantization,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid or incomplete config: {exc!r}", file=source) from exc
    if cfg.rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"unsupported rope scaling {cfg.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}",
            file=source,
        )
    if raw.get("partial_rotary_factor", 1.0) not in (1, 1.0):
        raise CheckpointError("partial rotary embeddings are not supported", file=source)
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported activation {raw.get('hidden_act')!r}", file=source)
    if cfg.num_heads % cfg.num_kv_heads:
        raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads", file=source)
    return cfg


def _parse_neox(raw: dict, source: str | Path) -> ModelConfig:
    """GPT-NeoX in both spellings: the published checkpoints' (rotary_pct, rotary_emb_base) and
    current transformers' (rope_parameters with partial_rotary_factor and rope_theta)."""
    try:
        rope = dict(raw.get("rope_parameters") or {})
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = hidden // heads
        pct = float(
            _first(raw, "rotary_pct", "partial_rotary_factor", default=rope.get("partial_rotary_factor", 1.0))
        )
        theta = float(_first(raw, "rotary_emb_base", "rope_theta", default=rope.get("rope_theta", 10000.0)))
        act = raw.get("hidden_act", "gelu")
        eos = raw.get("eos_token_id")
        cfg = ModelConfig(
            architecture="GPTNeoXForCausalLM",
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(_first(raw, "intermediate_size", default=4 * hidden)),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            rms_norm_eps=float(_first(raw, "layer_norm_eps", default=1e-5)),
            rope_theta=theta,
            max_position_embeddings=int(_first(raw, "max_position_embeddings", default=2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", True)),
            dtype=_DTYPES.get(str(_first(raw, "torch_dtype", "dtype", default="float32")), torch.float32),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
            layer_norm=True,
            rotary_dim=int(head_dim * pct),
            parallel_residual=bool(raw.get("use_parallel_residual", True)),
            gelu=GELU_ACTS.get(act),
            dense_bias=True,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid or incomplete config: {exc!r}", file=source) from exc
    if cfg.gelu is None:
        raise CheckpointError(
            f"unsupported activation {act!r} (supported: {', '.join(GELU_ACTS)})", file=source
        )
    if rope.get("rope_type", "default") not in ("default", None) or raw.get("rope_scaling"):
        raise CheckpointError("rope scaling is not supported for GPT-NeoX", file=source)
    if not 0 < cfg.rotary_dims <= head_dim or cfg.rotary_dims % 2:
        raise CheckpointError(
            f"rotary dims {cfg.rotary_dims} must be even and in (0, {head_dim}]", file=source
        )
    return cfg


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError("missing config.json in model folder", file=path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"unreadable config: {exc}", file=path) from exc
    if not isinstance(raw, dict):
        raise CheckpointError("config.json must hold a JSON object", file=path)
    cfg = parse_config(raw, path)
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            eos = None
        extra = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        if extra:
            merged = tuple(dict.fromkeys(cfg.eos_token_ids + extra))
            cfg = replace(cfg, eos_token_ids=merged)
    return cfg


#: What a compressed-tensors config group may say for us to run it as our FP8 scheme.
_CT_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
_CT_ACTIVATIONS = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}


def checkpoint_quantization(qc: dict | None, source: str | Path = "config.json") -> str | None:
    """The checkpoint's `quantization_config` → "fp8" or None; anything we would not compute as its
    authors meant is refused with what it says. Accepted: compressed-tensors FP8 weights (one scale per
    output channel or per tensor, static) with per-token dynamic FP8 activations, or none (weight-only:
    served with our dynamic activations) — the "FP8-Dynamic" checkpoints."""
    if not qc:
        return None

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"unsupported quantization_config: {why}", file=source)

    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise refuse(
            f"quant_method {method!r}; supported: compressed-tensors FP8 (per-channel weights, dynamic "
            "per-token activations), or an unquantized checkpoint with --quantization fp8"
        )
    if qc.get("format") not in ("float-quantized", "naive-quantized", None):
        raise refuse(f"format {qc.get('format')!r} (expected float-quantized)")
    if qc.get("kv_cache_scheme"):
        raise refuse("a quantized KV cache (kv_cache_scheme) is not supported")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise refuse("no config_groups")
    for name, group in groups.items():
        w = group.get("weights") or {}
        bad = {k: w.get(k) for k, v in _CT_WEIGHTS.items() if w.get(k) != v}
        if (
            bad
            or w.get("strategy") not in ("channel", "tensor")
            or w.get("group_size")
            or w.get("block_structure")
        ):
            raise refuse(
                f"group {name!r} weights {w!r}: only symmetric static 8-bit float weights, one scale per "
                "channel or tensor"
            )
        a = group.get("input_activations")
        if a and any(a.get(k) != v for k, v in _CT_ACTIVATIONS.items()):
            raise refuse(f"group {name!r} input_activations {a!r}: only dynamic per-token 8-bit float")
        if group.get("output_activations"):
            raise refuse(f"group {name!r} quantizes output activations")
    return "fp8"
