"""HF transformers' continuous batching (`generate_batch`, paged sdpa) on a model folder: the baseline.

Same prompts as bench/serve.py (random token ids of the tokenizer's non-special vocabulary,
fixed seed), greedy, exactly ``--output-len`` new tokens per request (EOS disabled), all
requests submitted at once: the offline equivalent of ``bench/serve.py --rate inf``.

    python bench/hf_generate_batch.py --model /tmp/llama8b -n 256 --input-len 512 --output-len 128 \\
        --out /tmp/hf.json

Reports output tok/s two ways: over the requests' span (first request created → last one
finished; excludes model load and the manager's CUDA-graph warm-up, like a running server)
and over the whole `generate_batch` call; with per-token timestamps, TTFT and ITL p50/p99.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import percentile, random_token_prompts  # noqa: E402


def build_prompts(model_dir: str, n: int, input_len: int, seed: int) -> list[list[int]]:
    """bench/serve.py's prompts (same seed → same ids), without importing its HTTP client."""
    from fusionserve.models.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    special = set(tok.special_token_ids) | set(tok.eos_token_ids)
    return random_token_prompts(tok.vocab_size, special, n, input_len, seed)


def run_batch(model, prompts: list[list[int]], gen_cfg, record: bool) -> tuple[dict, float]:
    sig = inspect.signature(model.generate_batch).parameters
    kwargs = {"generation_config": gen_cfg}
    if "record_timestamps" in sig:
        kwargs["record_timestamps"] = record
    if "progress_bar" in sig:
        kwargs["progress_bar"] = True
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, **kwargs)
    sync()
    return out, time.perf_counter() - t0


def summarize(outputs: dict, n: int, wall: float, output_len: int) -> dict:
    res = list(outputs.values())
    ok = [r for r in res if getattr(r, "error", None) is None]
    tokens = sum(len(r.generated_tokens) for r in ok)
    created = [r.created_time for r in ok if getattr(r, "created_time", None) is not None]
    ends = [r.lifespan[1] for r in ok if getattr(r, "lifespan", (-1, -1))[1] > 0]
    span = (max(ends) - min(created)) if created and ends else math.nan
    ttft, itl = [], []
    for r in ok:
        ts = getattr(r, "timestamps", None)
        if ts:
            ttft.append(ts[0] - r.created_time)
            itl.extend(b - a for a, b in zip(ts, ts[1:]))
    ms = 1000.0
    return {
        "requests": n,
        "completed": len(ok),
        "failed": n - len(ok),
        "output_tokens": tokens,
        "exact_length": sum(len(r.generated_tokens) == output_len for r in ok),
        "wall_s": round(wall, 3),
        "span_s": round(span, 3),
        "output_tok_per_s": tokens / span if span == span and span > 0 else math.nan,
        "output_tok_per_s_wall": tokens / wall,
        "req_per_s": len(ok) / span if span == span and span > 0 else math.nan,
        "ttft_p50_ms": percentile(ttft, 50) * ms,
        "ttft_p99_ms": percentile(ttft, 99) * ms,
        "itl_p50_ms": percentile(itl, 50) * ms,
        "itl_p99_ms": percentile(itl, 99) * ms,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF-layout model folder")
    p.add_argument("-n", "--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn", default="paged|sdpa", help="attn_implementation (paged|sdpa, paged|eager, ...)")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=torch.bfloat16,
        device_map="cuda" if torch.cuda.is_available() else "cpu",
        attn_implementation=args.attn,
    ).eval()
    load_s = time.perf_counter() - t0
    attn = model.config._attn_implementation
    print(f"loaded {args.model} in {load_s:.1f}s ({attn})", file=sys.stderr)
    if not hasattr(model, "generate_batch"):
        print(f"error: transformers {transformers.__version__} has no generate_batch", file=sys.stderr)
        return 2
    prompts = build_prompts(args.model, args.num_requests, args.input_len, args.seed)
    gen_cfg = GenerationConfig(
        max_new_tokens=args.output_len, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    # A small batch first: CUDA context, cuBLAS handles and kernels warm (the timed call still
    # builds and warms its own manager; the span figure leaves that out).
    run_batch(
        model,
        prompts[:8],
        GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0),
        False,
    )
    outputs, wall = run_batch(model, prompts, gen_cfg, True)
    summary = summarize(outputs, args.num_requests, wall, args.output_len)
    meta = {
        "engine": f"transformers {transformers.__version__} generate_batch ({args.attn} requested, {attn} loaded)",
        "model": args.model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "load_s": round(load_s, 1),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    payload = {"meta": meta, "summary": summary}
    text = json.dumps(payload, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
