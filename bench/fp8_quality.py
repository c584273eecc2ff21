"""How much FP8 changes a model's predictions: teacher-forced top-1 agreement and mean KL against the
unquantized model, on the texts the unquantized model itself writes.

The unquantized model greedily continues N prompts by T tokens; then both models score exactly those
token sequences in one prefill each, and at each of the N × T generated positions we compare the
next-token distributions: top-1 agreement (the FP8 argmax equals the unquantized one) and
KL(p_ref || p_fp8). Fused and off (the explicit-norm path) are scored alike.

    python bench/fp8_quality.py                       # the default model on CPU, 64 prompts × 64 tokens
    python bench/fp8_quality.py --device cuda --model DIR

Writes bench/results/fp8_quality_<model>_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, write_results  # noqa: E402
from fusionserve.kernels.batch import PagedBatch  # noqa: E402
from fusionserve.models.decoder import Decoder  # noqa: E402

TOPICS = [
    "the water cycle",
    "how vaccines work",
    "the French Revolution",
    "black holes",
    "photosynthesis",
    "the stock market",
    "machine learning",
    "the Roman Empire",
    "climate change",
    "the human heart",
    "plate tectonics",
    "the internet",
    "jazz music",
    "the Moon landing",
    "antibiotics",
    "volcanoes",
    "the printing press",
    "honey bees",
    "electric cars",
    "the Great Wall of China",
    "sleep",
    "the immune system",
    "chess openings",
    "coffee",
    "the Renaissance",
    "earthquakes",
    "DNA",
    "renewable energy",
    "the Olympic Games",
    "rainbows",
    "bread baking",
    "the solar system",
]
FORMS = ["Explain {} to a ten-year-old.", "Write three facts about {}."]
PROMPTS = [form.format(topic) for topic in TOPICS for form in FORMS]  # 64


def _batch(query_lens: list[int], context_lens: list[int], width: int, bs: int, device) -> PagedBatch:
    """Sequence i owns blocks [i·width, (i+1)·width) for the whole run."""
    tables = torch.arange(len(context_lens) * width, dtype=torch.int32).view(len(context_lens), width)
    slots = [
        (i * width + p // bs) * bs + p % bs for i, (q, c) in enumerate(zip(query_lens, context_lens)) for p in range(c - q, c)
    ]  # fmt: skip
    return PagedBatch.from_lists(query_lens, context_lens, tables, slots, bs).to(device)


@torch.inference_mode()
def greedy_continuations(
    model: Decoder, prompts: list[list[int]], n_tokens: int, fusion: bool = True
) -> list[list[int]]:
    """Each prompt followed by the model's n_tokens greedy tokens (one batch, paged KV cache)."""
    bs, dev = 16, model.device
    width = -(-(max(map(len, prompts)) + n_tokens) // bs)
    kv = model.allocate_kv_cache(len(prompts) * width, bs)
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], device=dev)
    pos = torch.cat([torch.arange(n, device=dev) for n in lens])
    hidden = model.forward(ids, pos, _batch(lens, lens, width, bs, dev), kv, fusion=fusion)
    last = torch.tensor(lens, device=dev).cumsum(0) - 1
    out = [list(p) for p in prompts]
    for step in tqdm(range(n_tokens), desc="greedy", leave=False):
        nxt = model.logits(hidden.rows(last)).argmax(-1)
        for seq, t in zip(out, nxt.tolist()):
            seq.append(t)
        if step == n_tokens - 1:
            break
        ctx = [len(s) for s in out]
        hidden = model.forward(
            nxt,
            torch.tensor(ctx, device=dev) - 1,
            _batch([1] * len(out), ctx, width, bs, dev),
            kv,
            fusion=fusion,
        )
        last = torch.arange(len(out), device=dev)
    return out


@torch.inference_mode()
def next_token_logprobs(
    model: Decoder, seqs: list[list[int]], starts: list[int], fusion: bool
) -> torch.Tensor:
    """log p(next | prefix) at positions starts[i]-1 .. len-2 of every sequence: [Σ generated, V] fp32."""
    bs, dev = 16, model.device
    width = -(-max(map(len, seqs)) // bs)
    kv = model.allocate_kv_cache(len(seqs) * width, bs)
    lens = [len(s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s], device=dev)
    pos = torch.cat([torch.arange(n, device=dev) for n in lens])
    hidden = model.forward(ids, pos, _batch(lens, lens, width, bs, dev), kv, fusion=fusion)
    offsets = [0, *torch.tensor(lens).cumsum(0).tolist()[:-1]]
    rows = torch.tensor(
        [o + p for o, s, n in zip(offsets, starts, lens) for p in range(s - 1, n - 1)], device=dev
    )
    return model.logits(hidden.rows(rows)).float().log_softmax(-1)


def agreement(ref: Decoder, quant: Decoder, prompts: list[list[int]], n_tokens: int) -> dict:
    """Top-1 agreement and mean KL of `quant` against `ref` on `ref`'s own greedy continuations."""
    seqs = greedy_continuations(ref, prompts, n_tokens)
    starts = [len(p) for p in prompts]  # the positions that predict the generated tokens
    result: dict = {"prompts": len(prompts), "tokens_per_prompt": n_tokens}
    lp_ref = next_token_logprobs(ref, seqs, starts, fusion=True)
    top1 = {}
    for fusion in (True, False):
        lp_q = next_token_logprobs(quant, seqs, starts, fusion)
        name = "fused" if fusion else "off"
        top1[name] = lp_q.argmax(-1)
        result[f"top1_agreement_{name}"] = float((top1[name] == lp_ref.argmax(-1)).float().mean())
        result[f"mean_kl_{name}"] = float((lp_ref.exp() * (lp_ref - lp_q)).sum(-1).mean())
        result.setdefault("scored_positions", lp_q.shape[0])
    # fused and off quantize h and r·h: equal in exact arithmetic, not bit for bit (docs/DESIGN.md)
    result["top1_fused_vs_off"] = float((top1["fused"] == top1["off"]).float().mean())
    return result


def main() -> None:
    from fusionserve.models.registry import resolve_model
    from fusionserve.models.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    prompts = [tok.encode(p) for p in PROMPTS[: args.prompts]]
    ref = Decoder.from_pretrained(model_dir, device=args.device, dtype=args.dtype, quantization="none")
    quant = Decoder.from_pretrained(model_dir, device=args.device, dtype=args.dtype, quantization="fp8")
    res = agreement(ref, quant, prompts, args.tokens)
    env = environment()
    rows = [
        [p, f"{100 * res[f'top1_agreement_{p}']:.1f}%", f"{res[f'mean_kl_{p}']:.4f}"]
        for p in ("fused", "off")
    ]
    table = (
        f"FP8 vs unquantized, {Path(model_dir).name}, {args.device} ({ref.dtype}), {res['prompts']} prompts × "
        f"{res['tokens_per_prompt']} greedy tokens of the unquantized model, teacher-forced "
        f"({res['scored_positions']} positions); {env['date']}\n\n"
        + markdown_table(["FP8 path", "top-1 agreement", "mean KL (nats)"], rows)
        + f"\n\nFP8 fused vs FP8 off, same positions: top-1 agreement {100 * res['top1_fused_vs_off']:.1f}%"
    )
    write_results(
        f"fp8_quality_{Path(model_dir).name.lower()}_{args.device}", {"env": env, **res}, table, out=args.out
    )
    print(table)


if __name__ == "__main__":
    main()
