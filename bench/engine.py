"""Engine throughput: N requests batched (continuous batching) vs the same requests one at a time.

Both modes run in one process on the same engine and the same model, greedy
with a fixed output length (ignore_eos), so they generate exactly the same
tokens; the report checks that and gives tokens/s of each and their ratio.

    python bench/engine.py [--requests 64] [--max-tokens 64] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionserve.server.contract import EngineConfig, SamplingParams
from fusionserve.server.engine.llm_engine import LLMEngine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = (
    "the engine schedules decodes first then prefill chunks of waiting requests while the paged cache "
    "hands out blocks of sixteen tokens and the sampler draws gumbel noise per request seed so that "
    "every answer stays the same whatever else runs in the batch of a busy server at night"
).split()


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """Mixed-length prompts (about 8..120 tokens), deterministic."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 100))) for _ in range(n)]
    return [tokenizer.encode(t) for t in texts]


def run_batched(engine: LLMEngine, prompts, params) -> tuple[float, float, list[list[int]]]:
    outs: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
        outs[f"b{i}"] = []
    total = len(prompts) * params.max_tokens
    t0, c0 = time.perf_counter(), time.process_time()
    with tqdm(total=total, desc="batched", unit="tok") as bar:
        while engine.has_unfinished():
            for o in engine.step():
                outs[o.request_id] += o.token_ids
                bar.update(len(o.token_ids))
    return time.perf_counter() - t0, time.process_time() - c0, [outs[f"b{i}"] for i in range(len(prompts))]


def run_sequential(engine: LLMEngine, prompts, params) -> tuple[float, float, list[list[int]]]:
    results = []
    t0, c0 = time.perf_counter(), time.process_time()
    for p in tqdm(prompts, desc="one at a time", unit="req"):
        results.append(engine.generate([p], params)[0][0].token_ids)
    return time.perf_counter() - t0, time.process_time() - c0, results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fusion", default="on", choices=("on", "off", "ab"))
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--name", default=None, help="results file stem (default: engine_<device>)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = EngineConfig(
        model_dir=args.model,
        device=args.device,
        max_num_seqs=max(64, args.requests),
        enable_prefix_caching=False,
        fusion=args.fusion,
        layer_timing_every=0,
        kv_cache_gb=0.5,
    )
    engine = LLMEngine(config)
    prompts = make_prompts(engine.tokenizer, args.requests)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up

    t_batch, cpu_batch, out_batch = run_batched(engine, prompts, params)
    t_seq, cpu_seq, out_seq = run_sequential(engine, prompts, params)
    tokens = args.requests * args.max_tokens
    device = engine.decoder.device.type
    result = {
        "benchmark": "engine_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": engine.model_name,
        "dtype": str(engine.decoder.dtype).removeprefix("torch."),
        "fusion": args.fusion,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "prompt_tokens_total": sum(map(len, prompts)),
        "generated_tokens": tokens,
        "batched_seconds": t_batch,
        "sequential_seconds": t_seq,
        "batched_tokens_per_s": tokens / t_batch,
        "sequential_tokens_per_s": tokens / t_seq,
        "ratio": t_seq / t_batch,
        # CPU seconds of this process: less sensitive to other load on a shared machine
        "batched_cpu_seconds": cpu_batch,
        "sequential_cpu_seconds": cpu_seq,
        "cpu_time_ratio": cpu_seq / cpu_batch,
        "identical_outputs": sum(a == b for a, b in zip(out_batch, out_seq)),
        "steps": engine.num_steps,
    }
    table = "\n".join(
        [
            f"# Engine throughput ({device}, {result['dtype']}, {result['threads']} threads, fusion {args.fusion})",
            "",
            f"{args.requests} requests, prompts {min(map(len, prompts))}..{max(map(len, prompts))} tokens, "
            f"{args.max_tokens} new tokens each (greedy, ignore_eos), model {engine.model_name}.",
            "",
            "| mode | wall s | tokens/s | CPU s |",
            "|---|---|---|---|",
            f"| batched (continuous batching) | {t_batch:.2f} | {tokens / t_batch:.1f} | {cpu_batch:.1f} |",
            f"| one at a time | {t_seq:.2f} | {tokens / t_seq:.1f} | {cpu_seq:.1f} |",
            "",
            f"**Ratio: {result['ratio']:.2f}x** tokens/s (goal >= 4x on CPU); "
            f"CPU-time ratio {result['cpu_time_ratio']:.2f}x. "
            f"Identical outputs: {result['identical_outputs']}/{args.requests}.",
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"engine_{device}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
