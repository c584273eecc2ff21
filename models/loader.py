"""safetensors checkpoints (single file or sharded) → folded weights for our decoder.

FlashNorm: every RMSNorm gain is folded into the weight that consumes the
normalized activations, once, in fp32, then cast once to the serving dtype.
After that the decoder only ever needs 1/rms(x) per row, which is what lets the
norm be deferred into the next GEMM's epilogue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from fusionserve.kernels.fp8 import E4M3, Fp8Weight, quantize_weight
from fusionserve.models.config import ModelConfig, load_config
from fusionserve.models.errors import CheckpointError


@dataclass
class LayerWeights:
    """One block's weights; under FP8 the four GEMM weights are Fp8Weight (kernels/fp8.py)."""

    w_qkv: torch.Tensor | Fp8Weight  # [(Hq + 2 Hk) D, H], input_layernorm gain folded in
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor | Fp8Weight  # [H, Hq D]
    w_gate_up: torch.Tensor | Fp8Weight  # [2 I, H] (GPT-NeoX: [I, H], no gate), post-attn gain folded in
    w_down: torch.Tensor | Fp8Weight  # [H, I]
    # LayerNorm models (GPT-NeoX): the norm's bias folded into the consumers' biases (b' = W β + b),
    # the column sums c = W' 1 (fp32) the deferred mean needs, and the other layers' biases.
    c_qkv: torch.Tensor | None = None
    b_o: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    c_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H], never scaled (it is also the residual stream's source)
    layers: list[LayerWeights]
    lm_head: torch.Tensor  # [V, H], final norm gain folded in (a copy when embeddings are tied)
    b_head: torch.Tensor | None = None  # LayerNorm models: the final norm's bias through the head
    c_head: torch.Tensor | None = None


class _TensorSource:
    """Name → tensor over one or many safetensors files, with errors that name the file."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._handles: dict[Path, object] = {}
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"invalid shard index: {exc!r}", file=index) from exc
            self.files = {name: model_dir / shard for name, shard in weight_map.items()}
        elif single.is_file():
            self.files = {}
            self._open(single)
            self.files = {name: single for name in self._handles[single].keys()}
        else:
            raise CheckpointError("no model.safetensors or model.safetensors.index.json", file=model_dir)

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError("checkpoint shard is missing", file=path)
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"corrupt or unreadable safetensors file: {exc}", file=path) from exc
        return self._handles[path]

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor as stored; an e4m3 weight of a compressed-tensors checkpoint comes back
        dequantized (fp32) with its `weight_scale` (per output channel or per tensor)."""
        tensor = self._read(name, shape)
        if tensor.dtype == E4M3:
            scale = self._read(name + "_scale", None).float()
            if scale.numel() not in (1, shape[0]):
                raise CheckpointError(
                    f"weight_scale of {tuple(scale.shape)} fits neither a tensor nor {shape[0]} channels",
                    file=self.files.get(name + "_scale"),
                    tensor=name + "_scale",
                )
            tensor = tensor.float() * scale.reshape(-1, *([1] * (tensor.dim() - 1)))
        return tensor

    def _read(self, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        path = self.files.get(name)
        if path is None:
            raise CheckpointError("tensor missing from checkpoint", file=self.model_dir, tensor=name)
        handle = self._open(path)
        try:
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read tensor: {exc}", file=path, tensor=name) from exc
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"wrong shape {tuple(tensor.shape)}, expected {tuple(shape)}", file=path, tensor=name
            )
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"expected a floating-point tensor, got {tensor.dtype}", file=path, tensor=name
            )
        return tensor


def _fold(weight: torch.Tensor, gain: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W' = W · diag(γ) in fp32, cast once."""
    return (weight.float() * gain.float()[None, :]).to(dtype).contiguous()


def load_weights(
    model_dir: str | Path,
    config: ModelConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    quantization: str = "auto",
) -> tuple[ModelConfig, ModelWeights]:
    """Read, validate, fold and place every tensor; raises CheckpointError on any defect.

    `quantization`: "auto" (the checkpoint's: compressed-tensors FP8 or none), "fp8" (e4m3 weights
    per output channel, quantized here after the norm gains are folded in; a pre-quantized
    checkpoint is dequantized, folded and requantized the same way) or "none" (dequantize)."""
    model_dir = Path(model_dir)
    cfg = config or load_config(model_dir)
    if quantization not in ("auto", "fp8", "none"):
        raise ValueError(f"quantization {quantization!r}: expected auto, fp8 or none")
    if quantization != "auto":
        cfg = replace(cfg, quantization=None if quantization == "none" else quantization)
    if cfg.quantization and cfg.layer_norm:
        raise CheckpointError("FP8 is implemented for RMSNorm (Llama-family) models only", file=model_dir)
    dtype = dtype or cfg.dtype
    src = _TensorSource(model_dir)
    h, d, hq, hk, inter = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
    )

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    if cfg.layer_norm:
        return cfg, _load_neox(src, cfg, dtype, put, device, progress)
    embed = src.get("model.embed_tokens.weight", (cfg.vocab_size, h))
    layers: list[LayerWeights] = []
    for i in tqdm(range(cfg.num_layers), desc="loading layers", unit="layer", disable=not progress):
        p = f"model.layers.{i}."
        q = src.get(p + "self_attn.q_proj.weight", (hq * d, h))
        k = src.get(p + "self_attn.k_proj.weight", (hk * d, h))
        v = src.get(p + "self_attn.v_proj.weight", (hk * d, h))
        gain_in = src.get(p + "input_layernorm.weight", (h,))
        bias = None
        if cfg.attention_bias:
            bias = torch.cat(
                [
                    src.get(p + "self_attn.q_proj.bias", (hq * d,)),
                    src.get(p + "self_attn.k_proj.bias", (hk * d,)),
                    src.get(p + "self_attn.v_proj.bias", (hk * d,)),
                ]
            )
        gate = src.get(p + "mlp.gate_proj.weight", (inter, h))
        up = src.get(p + "mlp.up_proj.weight", (inter, h))
        gain_post = src.get(p + "post_attention_layernorm.weight", (h,))
        layers.append(
            LayerWeights(
                w_qkv=put(_fold(torch.cat([q, k, v]), gain_in, dtype)),
                b_qkv=put(bias) if bias is not None else None,
                w_o=put(src.get(p + "self_attn.o_proj.weight", (h, hq * d))),
                w_gate_up=put(_fold(torch.cat([gate, up]), gain_post, dtype)),
                w_down=put(src.get(p + "mlp.down_proj.weight", (h, inter))),
            )
        )
    final_gain = src.get("model.norm.weight", (h,))
    if cfg.tie_word_embeddings or not src.has("lm_head.weight"):
        if not cfg.tie_word_embeddings:
            src.get("lm_head.weight", (cfg.vocab_size, h))  # raises the clear "missing" error
        head = embed
    else:
        head = src.get("lm_head.weight", (cfg.vocab_size, h))
    weights = ModelWeights(embed=put(embed), layers=layers, lm_head=put(_fold(head, final_gain, dtype)))
    if cfg.quantization == "fp8":  # the LM head and the embedding stay in the model's dtype
        for layer in weights.layers:
            for name in ("w_qkv", "w_o", "w_gate_up", "w_down"):
                setattr(layer, name, quantize_weight(getattr(layer, name)))
    return cfg, weights


def _fold_layernorm(
    w: torch.Tensor, b: torch.Tensor | None, gain: torch.Tensor, beta: torch.Tensor, dtype, put, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm (γ, β) folded into the linear layer after it: W' = W diag(γ), b' = W β + b, and the
    column sums c = W' 1 of the weight as served (rounded), so x W'ᵀ − μ c is exact for it."""
    w_fold = put(_fold(w, gain, dtype))
    bias = w.float() @ beta.float() + (b.float() if b is not None else 0.0)
    col = w_fold.float().sum(1)
    return w_fold, put(bias), col.to(device)


def _load_neox(src: _TensorSource, cfg: ModelConfig, dtype, put, device, progress: bool) -> ModelWeights:
    """GPT-NeoX (Pythia): the fused, per-head interleaved query_key_value reordered to our [Q | K | V]
    layout, every LayerNorm folded into the layer that consumes it."""
    h, d, n, inter = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.intermediate_size
    pre = "gpt_neox."
    layers: list[LayerWeights] = []

    def qkv_rows(t: torch.Tensor) -> torch.Tensor:  # [heads, (q k v), d, ...] → [(q k v), heads, d, ...]
        return t.reshape(n, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    for i in tqdm(range(cfg.num_layers), desc="loading layers", unit="layer", disable=not progress):
        p = f"{pre}layers.{i}."

        def get(name: str, *shape: int) -> torch.Tensor:
            return src.get(p + name, shape)  # noqa: B023 - used at once, in this iteration

        w_qkv, b_qkv, c_qkv = _fold_layernorm(
            qkv_rows(get("attention.query_key_value.weight", 3 * h, h)),
            qkv_rows(get("attention.query_key_value.bias", 3 * h)),
            get("input_layernorm.weight", h), get("input_layernorm.bias", h), dtype, put, device,
        )  # fmt: skip
        w_up, b_up, c_up = _fold_layernorm(
            get("mlp.dense_h_to_4h.weight", inter, h), get("mlp.dense_h_to_4h.bias", inter),
            get("post_attention_layernorm.weight", h), get("post_attention_layernorm.bias", h), dtype, put, device,
        )  # fmt: skip
        layers.append(
            LayerWeights(
                w_qkv=w_qkv,
                b_qkv=b_qkv,
                c_qkv=c_qkv,
                w_o=put(get("attention.dense.weight", h, h)),
                b_o=put(get("attention.dense.bias", h)),
                w_gate_up=w_up,
                b_up=b_up,
                c_up=c_up,
                w_down=put(get("mlp.dense_4h_to_h.weight", h, inter)),
                b_down=put(get("mlp.dense_4h_to_h.bias", h)),
            )  # fmt: skip
        )
    embed = src.get(pre + "embed_in.weight", (cfg.vocab_size, h))
    head = embed if cfg.tie_word_embeddings else src.get("embed_out.weight", (cfg.vocab_size, h))
    w_head, b_head, c_head = _fold_layernorm(
        head, None, src.get(pre + "final_layer_norm.weight", (h,)), src.get(pre + "final_layer_norm.bias", (h,)),
        dtype, put, device,
    )  # fmt: skip
    return ModelWeights(embed=put(embed), layers=layers, lm_head=w_head, b_head=b_head, c_head=c_head)
