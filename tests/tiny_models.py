"""Tiny random HF checkpoints written on the fly, so tests never download weights."""

from __future__ import annotations

from pathlib import Path

import torch

ARCH_KWARGS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
}


def make_tiny_checkpoint(
    out_dir: Path,
    arch: str = "llama",
    seed: int = 0,
    max_shard_size: str | None = None,
    tie: bool = False,
    rope_scaling: dict | None = None,
    num_layers: int = 2,
    head_dim: int | None = None,
) -> Path:
    """Save a small random model (fp32 safetensors) with transformers and return its folder. `head_dim`
    (default hidden / heads = 16): 32 or more reaches the qkv GEMM's RoPE epilogue (pair tiles ≥ 16)."""
    import transformers

    cls_cfg = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }
    cls_model = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }
    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        **ARCH_KWARGS[arch],
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
        kwargs["rope_theta"] = 500000.0
    config = cls_cfg[arch](**kwargs)
    torch.manual_seed(seed)
    model = cls_model[arch](config).to(torch.float32).eval()
    with torch.no_grad():  # non-trivial norm gains and biases so folding is really exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    save_kwargs = {"safe_serialization": True}
    if max_shard_size:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **save_kwargs)
    return Path(out_dir)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "NaN/inf in output"
    return float((a - b).norm() / b.norm())


def make_tiny_neox(
    out_dir: Path, parallel: bool = True, rotary_pct: float = 0.25, seed: int = 0, vocab_size: int = 256
) -> Path:
    """A small random GPT-NeoX (Pythia layout: LayerNorms with bias, fused per-head qkv with bias,
    partial rotary, GELU MLP, untied embed_out) saved with transformers, non-trivial norm params."""
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=160,
        max_position_embeddings=512,
        rotary_pct=rotary_pct,
        rotary_emb_base=10000,
        use_parallel_residual=parallel,
        layer_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(
                    torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
                )
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def prefill_then_decode_logits(model, ids: torch.Tensor, fusion: bool) -> torch.Tensor:
    """Every row's logits of a 40-token prefill (past the Triton backend's small_m_max) and then 5
    decode steps (its decode GEMMs), on the model's device, returned on the CPU."""
    from fusionserve.kernels.batch import contiguous_batch

    kv = model.allocate_kv_cache(8, 16)
    out = []
    for a, b in [(0, 40)] + [(p, p + 1) for p in range(40, 45)]:
        batch = contiguous_batch([b - a], [b], 16).to(model.device)
        pos = torch.arange(a, b, device=model.device)
        out.append(
            model.logits(model.forward(ids[a:b].to(model.device), pos, batch, kv, fusion=fusion)).cpu()
        )
    return torch.cat(out)
