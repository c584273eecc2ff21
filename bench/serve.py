"""OpenAI-API load generator for a running `fusionserve serve` (or any OpenAI-compatible server).

Prompts are random token ids drawn (fixed seed; run i of an invocation uses prompt seed + i, so no
prompt is sent twice to a prefix-caching server) from the tokenizer's non-special vocabulary
and sent as token-id prompts to /v1/completions, so every request has exactly
``--input-len`` prompt tokens (text round trips would change the length); ``ignore_eos``
makes every request produce exactly ``--output-len`` tokens. Arrivals are all at once
(``--rate inf``) or Poisson at R req/s. Reports output tok/s, req/s, TTFT and ITL
p50/p99; with ``--fusion-compare`` it flips the server between fusion on and off through
/admin/fusion and alternates runs (on, off, on, off, ...) so drift hits both alike.

    python bench/serve.py --url http://127.0.0.1:8000 -n 64 --input-len 128 --output-len 32 \\
        --rate inf [--fusion-compare --admin-key KEY --repeats 2]

Writes bench/results/serve_<time>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/serve.py` from a checkout: find `models`
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from bench.common import percentile, random_token_prompts  # noqa: E402


@dataclass(frozen=True)
class LoadSpec:
    """What one run sends: the same prompts and arrival times for every run of a comparison."""

    num_requests: int
    input_len: int
    output_len: int
    rate: float  # requests/s; inf = all at once
    seed: int
    max_concurrency: int | None = None


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""


@dataclass(frozen=True)
class RunSummary:
    label: str
    fusion: str
    completed: int
    failed: int
    duration_s: float
    req_per_s: float
    output_tok_per_s: float
    total_tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_ms: float
    client_cpu_cores: float = 0.0  # this load generator's CPU seconds / wall: near 1 means it limits


def build_prompts(
    spec: LoadSpec, vocab_size: int, special: set[int], prompt_seed: int | None = None
) -> list[list[int]]:
    seed = spec.seed if prompt_seed is None else prompt_seed
    return random_token_prompts(vocab_size, special, spec.num_requests, spec.input_len, seed)


def arrival_times(spec: LoadSpec) -> list[float]:
    if math.isinf(spec.rate):
        return [0.0] * spec.num_requests
    rng = random.Random(spec.seed + 1)
    t, out = 0.0, []
    for _ in range(spec.num_requests):
        out.append(t)
        t += rng.expovariate(spec.rate)
    return out


async def one_request(
    client: httpx.AsyncClient, model: str, prompt: list[int], spec: LoadSpec
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = RequestResult(ok=False)
    t0 = time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        res.error = repr(exc)[:200]
        return res
    res.latency = time.perf_counter() - t0
    res.ok = True
    return res


async def run_load(
    client: httpx.AsyncClient,
    model: str,
    prompts: list[list[int]],
    spec: LoadSpec,
    label: str,
    progress: bool,
) -> tuple[list[RequestResult], float]:
    from tqdm import tqdm

    arrivals = arrival_times(spec)
    sem = asyncio.Semaphore(spec.max_concurrency or len(prompts))
    bar = tqdm(total=len(prompts), desc=label, unit="req", disable=not progress, file=sys.stderr)
    start = time.perf_counter()

    async def launch(i: int) -> RequestResult:
        delay = arrivals[i] - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem:
            r = await one_request(client, model, prompts[i], spec)
        bar.update(1)
        return r

    results = await asyncio.gather(*(launch(i) for i in range(len(prompts))))
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


@dataclass(frozen=True)
class ClientSetup:
    """What a load-generator process needs to open its own connections."""

    url: str
    headers: dict[str, str]
    timeout: float
    model: str


def _load_share(
    setup: ClientSetup, prompts: list[list[int]], arrivals: list[float], spec: LoadSpec, start_at: float
) -> tuple[list[RequestResult], float, float]:
    """One process's share of a run: its requests at their arrival times after the common wall-clock
    start; (results, wall time its last request ended, its CPU seconds)."""

    async def go() -> list[RequestResult]:
        limits = httpx.Limits(max_connections=max(len(prompts), 10), max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=setup.url, timeout=setup.timeout, headers=setup.headers, limits=limits
        ) as client:
            sem = asyncio.Semaphore(spec.max_concurrency or max(len(prompts), 1))
            await asyncio.sleep(max(0.0, start_at - time.time()))

            async def launch(i: int) -> RequestResult:
                delay = start_at + arrivals[i] - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                async with sem:
                    return await one_request(client, setup.model, prompts[i], spec)

            return list(await asyncio.gather(*(launch(i) for i in range(len(prompts)))))

    cpu0 = time.process_time()
    results = asyncio.run(go())
    return results, time.time(), time.process_time() - cpu0


def run_load_procs(
    setup: ClientSetup, prompts: list[list[int]], spec: LoadSpec, procs: int
) -> tuple[list[RequestResult], float, float]:
    """The run spread over `procs` load-generator processes (request i goes to process i % procs), so
    that parsing ~16k SSE chunks/s does not make the client the bottleneck: one asyncio + httpx
    process saturates a core near that rate and then reads two tokens of a stream at once (ITL 0).
    Returns (results in request order, duration from the common start to the last request's end,
    client CPU seconds over all processes). `max_concurrency` applies per process."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    arrivals = arrival_times(spec)
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
        list(pool.map(abs, range(procs)))  # start the workers before the clock starts
        start_at = time.time() + 0.5
        futures = [
            pool.submit(_load_share, setup, prompts[k::procs], arrivals[k::procs], spec, start_at)
            for k in range(procs)
        ]
        shares = [f.result() for f in futures]
    results: list[RequestResult] = [RequestResult(ok=False)] * len(prompts)
    for k, (part, _, _) in enumerate(shares):
        results[k::procs] = part
    return results, max(end for _, end, _ in shares) - start_at, sum(cpu for _, _, cpu in shares)


def summarize(
    label: str, fusion: str, results: list[RequestResult], duration: float, spec: LoadSpec
) -> RunSummary:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    itls = [x for r in ok for x in r.itls]
    ms = 1000.0
    return RunSummary(
        label=label,
        fusion=fusion,
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=round(duration, 3),
        req_per_s=len(ok) / duration,
        output_tok_per_s=out_tokens / duration,
        total_tok_per_s=(out_tokens + spec.input_len * len(ok)) / duration,
        ttft_p50_ms=percentile([r.ttft for r in ok], 50) * ms,
        ttft_p99_ms=percentile([r.ttft for r in ok], 99) * ms,
        itl_p50_ms=percentile(itls, 50) * ms,
        itl_p99_ms=percentile(itls, 99) * ms,
        e2e_p50_ms=percentile([r.latency for r in ok], 50) * ms,
    )


def markdown(spec: LoadSpec, runs: list[RunSummary], meta: dict[str, Any]) -> str:
    cols = [
        "run",
        "fusion",
        "ok/failed",
        "req/s",
        "output tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "e2e p50 ms",
    ]
    lines = [
        f"# Serving benchmark ({meta['model']}, {meta['date']})",
        "",
        f"{spec.num_requests} requests, input {spec.input_len} tokens, output {spec.output_len} tokens, "
        f"rate {'inf' if math.isinf(spec.rate) else spec.rate} req/s, seed {spec.seed}, server {meta['url']}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in runs:
        lines.append(
            f"| {r.label} | {r.fusion} | {r.completed}/{r.failed} | {r.req_per_s:.2f} | {r.output_tok_per_s:.1f} "
            f"| {r.ttft_p50_ms:.1f} | {r.ttft_p99_ms:.1f} | {r.itl_p50_ms:.1f} | {r.itl_p99_ms:.1f} "
            f"| {r.e2e_p50_ms:.1f} |"
        )
    by_mode: dict[str, list[float]] = {}
    for r in runs:
        by_mode.setdefault(r.fusion, []).append(r.output_tok_per_s)
    if {"on", "off"} <= by_mode.keys():
        on, off = statistics.median(by_mode["on"]), statistics.median(by_mode["off"])
        lines += ["", f"Median output tok/s: fusion on {on:.1f}, off {off:.1f} → on/off = {on / off:.3f}"]
    return "\n".join(lines) + "\n"


def load_vocab(model_dir: str | None) -> tuple[int, set[int]]:
    """Vocabulary size and special ids from the model's tokenizer (the default model if none)."""
    from fusionserve.models.tokenizer import Tokenizer

    if model_dir is None:
        from fusionserve.models.registry import default_model_dir

        model_dir = str(default_model_dir())
    tok = Tokenizer(model_dir)
    return tok.vocab_size, set(tok.special_token_ids) | set(tok.eos_token_ids)


async def set_fusion(client: httpx.AsyncClient, mode: str, admin_key: str) -> None:
    r = await client.post(
        "/admin/fusion", json={"mode": mode}, headers={"Authorization": f"Bearer {admin_key}"}
    )
    r.raise_for_status()


async def get_fusion(client: httpx.AsyncClient, admin_key: str | None) -> str:
    if not admin_key:
        return "?"
    r = await client.get("/admin/fusion", headers={"Authorization": f"Bearer {admin_key}"})
    return r.json().get("mode", "?") if r.status_code == 200 else "?"


async def main_async(args: argparse.Namespace) -> int:
    spec = LoadSpec(
        args.num_requests, args.input_len, args.output_len, args.rate, args.seed, args.max_concurrency
    )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.num_requests, 10), max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=args.url, timeout=args.timeout, headers=headers, limits=limits
    ) as client:
        models = (await client.get("/v1/models")).json()
        model = models["data"][0]["id"]
        vocab_size, special = load_vocab(args.model_dir)
        if args.fusion_compare:
            if not args.admin_key:
                print("error: --fusion-compare needs --admin-key", file=sys.stderr)
                return 2
            original = await get_fusion(client, args.admin_key)
            plan = [m for _ in range(args.repeats) for m in ("on", "off")]
        else:
            original = None
            plan = [await get_fusion(client, args.admin_key)] * args.repeats
        # Every run (and the warm-up) gets prompts of its own: with prefix caching on, a prompt sent
        # twice is served from the cache the second time, which would favour later runs.
        base = spec.seed if args.prompt_seed is None else args.prompt_seed
        if args.warmup_requests > 0:
            warm = LoadSpec(
                min(args.warmup_requests, spec.num_requests),
                spec.input_len,
                min(4, spec.output_len),
                math.inf,
                spec.seed,
            )
            warm_prompts = build_prompts(warm, vocab_size, special, base + len(plan))
            await run_load(client, model, warm_prompts, warm, "warmup", False)
        runs = []
        try:
            for i, mode in enumerate(plan):
                if args.fusion_compare:
                    await set_fusion(client, mode, args.admin_key)
                prompts = build_prompts(spec, vocab_size, special, base + i)
                label = f"{i + 1}"
                cpu0 = time.process_time()
                if args.client_procs > 1:
                    setup = ClientSetup(args.url, headers, args.timeout, model)
                    results, duration, cpu = await asyncio.to_thread(
                        run_load_procs, setup, prompts, spec, args.client_procs
                    )
                else:
                    results, duration = await run_load(
                        client, model, prompts, spec, f"run {label} fusion={mode}", True
                    )
                    cpu = time.process_time() - cpu0
                run = summarize(label, mode, results, duration, spec)
                runs.append(replace(run, client_cpu_cores=round(cpu / duration, 3)))
                errors = [r.error for r in results if not r.ok]
                if errors:
                    print(f"run {label}: {len(errors)} failed, e.g. {errors[0]}", file=sys.stderr)
        finally:
            if original in ("on", "off", "ab"):
                await set_fusion(client, original, args.admin_key)

    meta = {"model": model, "url": args.url, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    md = markdown(spec, runs, meta)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out_dir / f"serve_{args.tag + '_' if args.tag else ''}{stamp}"
    spec_d = asdict(spec)
    spec_d["rate"] = "inf" if math.isinf(spec.rate) else spec.rate
    payload = {"meta": meta, "spec": spec_d, "runs": [asdict(r) for r in runs]}
    base.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    base.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {base}.json and .md", file=sys.stderr)
    return 0 if all(r.failed == 0 for r in runs) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("-n", "--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rate", type=float, default=math.inf, help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="arrival times (and prompts, unless --prompt-seed)")
    p.add_argument(
        "--prompt-seed", type=int, default=None, help="prompts of run i use this + i (default: --seed)"
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per fusion mode")
    p.add_argument("--fusion-compare", action="store_true", help="alternate fusion on/off via /admin/fusion")
    p.add_argument("--admin-key", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--model-dir", default=None, help="tokenizer folder (default: the default model)")
    p.add_argument("--warmup-requests", type=int, default=2, help="short untimed requests first (0: none)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="load-generator processes (hundreds of streams at 10k+ tok/s need more than one)",
    )
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--tag", default="", help="added to the result file names")
    return p


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
