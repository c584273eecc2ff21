"""Write a random-weight checkpoint in HF layout with Llama-3.1-8B's shapes (no download).

    python bench/make_random_checkpoint.py /tmp/llama8b            # 8B, bf16, 5 GB shards, on the GPU
    python bench/make_random_checkpoint.py /tmp/tiny --preset tiny  # a small one (tests, CPU)

The folder holds what `fusionserve serve --model` and transformers' `from_pretrained` read:
config.json (LlamaForCausalLM, Llama-3.1-8B hyperparameters, rope_scaling llama3),
generation_config.json, model-0000k-of-0000n.safetensors + model.safetensors.index.json,
tokenizer.json and tokenizer_config.json. Weights are normal, scaled 1/sqrt(fan_in) so
activations stay O(1) (embeddings scaled by 1/sqrt(hidden)); RMSNorm gains are 1.0. They
are drawn shard by shard on the GPU (CPU without one) and each shard is written before the
next is drawn, so host memory holds at most one shard.

The tokenizer is a WordLevel model over synthetic words ``w0 .. w{V-257}`` plus Llama 3's
256 special tokens at the top of the vocabulary (``<|begin_of_text|>`` = V-256, ``<|eot_id|>``
= V-247, ...): every id decodes to text, so streamed output of token-id prompts just works.
A ``.complete`` marker is written last; an existing complete folder is left alone (``--force``
rewrites it).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
# Same structure, small sizes: CPU tests of the layout (and a quick device smoke test).
TINY = {
    **LLAMA31_8B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "vocab_size": 1280,
    "bos_token_id": 1024,
    "eos_token_id": [1025, 1032, 1033],
}
PRESETS = {"llama-3.1-8b": LLAMA31_8B, "tiny": TINY}
NUM_SPECIAL = 256
_NAMED_SPECIAL = {  # offset from the first special id → Llama 3's names
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def special_tokens(vocab_size: int) -> list[str]:
    """Llama 3's 256 special tokens: named ones where Llama 3 has them, reserved ones elsewhere."""
    out, reserved = [], 0
    for k in range(NUM_SPECIAL):
        name = _NAMED_SPECIAL.get(k)
        if name is None:
            name, reserved = f"<|reserved_special_token_{reserved}|>", reserved + 1
        out.append(name)
    return out


def tensor_plan(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes, in the order transformers writes them."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d, hq, hk = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (hq * d, h)),
            (p + "self_attn.k_proj.weight", (hk * d, h)),
            (p + "self_attn.v_proj.weight", (hk * d, h)),
            (p + "self_attn.o_proj.weight", (h, hq * d)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    plan += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return plan


def shard_plan(
    plan: list[tuple[str, tuple[int, ...]]], shard_bytes: int, elt: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split into shards of at most shard_bytes (a larger single tensor gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        n = math.prod(shape) * elt
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def random_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm gains
        return torch.ones(shape, dtype=dtype, device=device)
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return t.mul_(shape[1] ** -0.5).to(dtype)  # fan_in = in_features (hidden for the embedding)


def write_tokenizer(out: Path, cfg: dict) -> None:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    v = cfg["vocab_size"]
    n_words = v - NUM_SPECIAL
    specials = special_tokens(v)
    bos, eos = specials[0], specials[9]
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size(with_added_tokens=True) == v and tok.token_to_id(bos) == n_words
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, n_words)]
    )
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(n_words + k): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for k, s in enumerate(specials)
    }
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")


def write_checkpoint(
    out: Path, cfg: dict, shard_gb: float, seed: int, device: torch.device, progress: bool = True
) -> dict:
    from safetensors.torch import save_file

    dtype = torch.bfloat16
    elt = 2
    out.mkdir(parents=True, exist_ok=True)
    (out / ".complete").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    write_tokenizer(out, cfg)

    plan = tensor_plan(cfg)
    shards = shard_plan(plan, int(shard_gb * 1e9), elt)
    total = sum(math.prod(s) for _, s in plan) * elt
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="random weights", disable=not progress)
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in names:
            tensors[name] = random_tensor(name, shape, gen, device, dtype).cpu()
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        bar.update(sum(t.numel() for t in tensors.values()) * elt)
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    info = {"bytes": total, "shards": len(shards), "seconds": round(seconds, 2), "device": str(device)}
    (out / ".complete").write_text(json.dumps(info) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b")
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--force", action="store_true", help="rewrite a complete folder")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    if (out / ".complete").is_file() and not args.force:
        print(f"{out}: complete already ({(out / '.complete').read_text().strip()})", file=sys.stderr)
        return 0
    if args.force and out.exists():
        shutil.rmtree(out)
    dev = args.device
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)
    info = write_checkpoint(out, dict(PRESETS[args.preset]), args.shard_gb, args.seed, device)
    gb = info["bytes"] / 1e9
    print(
        f"wrote {out}: {gb:.2f} GB in {info['shards']} shards, {info['seconds']:.1f}s "
        f"({gb / info['seconds']:.2f} GB/s) on {device}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
