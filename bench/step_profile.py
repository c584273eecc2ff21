"""Where a serving step's GPU time goes: a full prefill chunk and large decode batches, fused vs off.

The serving benchmark (bench/serve_gpu.sh) spends its time in ~8k-token prefill steps and ~256-sequence
decode steps. This profiles exactly those, on random weights of the real shapes: the step time (median
of CUDA-event samples), kernels per step, GPU time by category, the top kernels, and the GEMMs' share
against cuBLAS timed alone on the same shapes (the ceiling a step made only of GEMMs would reach).

    python bench/step_profile.py --model 8b --prefill 16x512 --decode 256x576,64x576 --mixed 240x576+14x512

Prefill runs eagerly (as in the server: prompt chunks are not graph-captured) with the LM head on each
sequence's last row; decode replays the product's CUDA graph for that batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, write_results  # noqa: E402
from bench.decode import config_of, decode_batch, filled_kv_cache, random_weights, time_fn  # noqa: E402
from fusionserve.kernels.backend import select_backend  # noqa: E402
from fusionserve.kernels.batch import contiguous_batch  # noqa: E402
from fusionserve.kernels.triton_backend import mm_fp32_out  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402
from fusionserve.server.engine.cuda_graphs import DecodeGraphs  # noqa: E402

DEV = "cuda"  # the device the profiled steps run on (a CPU smoke test sets "cpu" under the interpreter)
CATEGORIES = ("gemm", "attention", "norm", "rope/kv", "silu", "other")


def kernel_category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("gemm", "gemv", "_linear", "matmul", "sm90", "cutlass", "nvjet", "_gate_up")):
        return "gemm"
    if any(k in low for k in ("attn", "attention", "_decode_kernel", "_decode_reduce", "_prefill_kernel")):
        return "attention"
    if "norm" in low or "stats" in low or "row_epilogue" in low:
        return "norm"
    if "rope" in low:
        return "rope/kv"
    if "silu" in low:
        return "silu"
    return "other"


def summarize_events(events: list[tuple[str, float]], steps: int) -> dict:
    cats = dict.fromkeys(CATEGORIES, 0.0)
    kernels: dict[str, list[float]] = {}
    for name, us in events:
        cats[kernel_category(name)] += us / steps
        k = kernels.setdefault(name, [0.0, 0])
        k[0] += us / steps
        k[1] += 1
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]
    return dict(
        kernels_per_step=len(events) / steps,
        kernel_us=sum(cats.values()),
        category_us=cats,
        top_kernels=[(n[:90], round(us, 1), c // steps) for n, (us, c) in top],
    )


def profiled(fn, steps: int = 3) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return [
        (ev.name, ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total)
        for ev in prof.events()
        if ev.device_type.name == "CUDA"
    ]


def gemm_shapes(model: Decoder) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, has_residual) of one layer's GEMMs."""
    cfg, lw = model.config, model.weights.layers[0]
    return [
        ("qkv", lw.w_qkv.shape[0], cfg.hidden_size, False),
        ("o", cfg.hidden_size, lw.w_o.shape[1], True),
        ("gate_up", lw.w_gate_up.shape[0], cfg.hidden_size, False),
        ("down", cfg.hidden_size, lw.w_down.shape[1], True),
    ]


def cublas_floor(model: Decoder, m: int, lm_rows: int) -> dict:
    """The step's GEMMs as plain cuBLAS calls timed alone: ms per step and TFLOP/s."""
    total_ms, flops = 0.0, 0.0
    per = {}
    for name, n, k, res in gemm_shapes(model):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
        r = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)
        fn = (lambda r=r, x=x, w=w: torch.addmm(r, x, w.t())) if res else (lambda x=x, w=w: F.linear(x, w))
        ms = time_fn(fn, inner=10, outer=9) * 1e3
        per[name] = dict(ms=ms, tflops=2 * m * n * k / ms / 1e9)
        total_ms += ms * model.config.num_layers
        flops += 2 * m * n * k * model.config.num_layers
    v, h = model.weights.lm_head.shape
    x = torch.randn(lm_rows, h, device=DEV, dtype=torch.bfloat16)
    logits = torch.empty(lm_rows, v, device=DEV, dtype=torch.float32)  # the product writes fp32 logits
    ms = time_fn(lambda: mm_fp32_out(x, model.weights.lm_head, logits), inner=10, outer=9) * 1e3
    per["lm_head"] = dict(ms=ms, tflops=2 * lm_rows * v * h / ms / 1e9)
    total_ms += ms
    flops += 2 * lm_rows * v * h
    return dict(ms=total_ms, tflops=flops / total_ms / 1e9, per_gemm=per, flops=flops)


def profile_eager(model: Decoder, n_dec: int, ctx: int, n_prompts: int, length: int) -> list[dict]:
    """An eager step of `n_dec` decodes at context `ctx` (first, as the scheduler plans them) and
    `n_prompts` prompt chunks of `length` tokens: a prefill step when n_dec = 0, else a mixed serving
    step, timed with the decodes' attention on the decode kernel (the product) and, for comparison,
    all of it on the prefill kernel (num_decodes = 0)."""
    query_lens = [1] * n_dec + [length] * n_prompts
    context_lens = [ctx + 1] * n_dec + [length] * n_prompts
    pb = contiguous_batch(query_lens, context_lens, 16).to(DEV)
    kv = model.allocate_kv_cache(sum(-(-c // 16) for c in context_lens), 16)
    t = sum(query_lens)
    ids = torch.randint(0, model.config.vocab_size, (t,), device=DEV)
    pos = torch.cat([torch.full((n_dec,), ctx), torch.arange(length).repeat(n_prompts)]).to(DEV)
    last = pb.query_start[1:].long() - 1
    floor = cublas_floor(model, t, n_dec + n_prompts)
    name = f"mixed {n_dec}x{ctx} + {n_prompts}x{length}" if n_dec else f"prefill {n_prompts}x{length}"
    rows = []
    for split in (True, False) if n_dec else (True,):
        batch = pb if split else dataclasses.replace(pb, num_decodes=0)
        for fused in (True, False):

            def step(f=fused, b=batch):
                hidden = model.forward(ids, pos, b, kv, fusion=f)
                return model.logits(hidden.rows(last))

            ms = time_fn(step, inner=2, outer=7) * 1e3
            s = summarize_events(profiled(step), 3)
            gemm_ms = s["category_us"]["gemm"] / 1e3
            rows.append(
                dict(
                    case=name + ("" if split else " (all on prefill kernel)"),
                    fused=fused,
                    step_ms=ms,
                    **s,
                    gemm_tflops=floor["flops"] / gemm_ms / 1e9 if gemm_ms else 0.0,
                    cublas_floor_ms=floor["ms"],
                    cublas_tflops=floor["tflops"],
                    cublas_per_gemm=floor["per_gemm"],
                )
            )
            print(rows[-1], flush=True)
    return rows


def profile_decode(model: Decoder, batch: int, ctx: int) -> list[dict]:
    kv = filled_kv_cache(model, batch, ctx)
    pb, ids, pos = decode_batch(batch, ctx, 16)
    graphs = DecodeGraphs(model, kv, max_batch=batch, batch_sizes=(batch,))
    graphs.capture()
    floor = cublas_floor(model, batch, batch)
    rows = []
    for fused in (True, False):
        ms = time_fn(lambda f=fused: graphs.run(ids, pos, pb, f), inner=10, outer=9) * 1e3
        s = summarize_events(profiled(lambda f=fused: graphs.run(ids, pos, pb, f), 5), 5)
        rows.append(
            dict(
                case=f"decode b{batch} ctx{ctx}",
                fused=fused,
                step_ms=ms,
                **s,
                cublas_floor_ms=floor["ms"],
                cublas_tflops=floor["tflops"],
                cublas_per_gemm=floor["per_gemm"],
            )
        )
        print(rows[-1], flush=True)
    return rows


def report(rows: list[dict], model: str, out: str | None, tag: str) -> None:
    env = environment()
    table_rows = [
        [r["case"], "on" if r["fused"] else "off", r["step_ms"], r["kernels_per_step"], r["kernel_us"] / 1e3,
         *[r["category_us"][c] / 1e3 for c in CATEGORIES], r["cublas_floor_ms"]]
        for r in rows
    ]  # fmt: skip
    text = (
        f"Serving-size step profile, {model}, {env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, "
        f"{env['date']}. ms per step; categories are GPU kernel time (torch profiler); cuBLAS floor = the "
        "step's GEMMs as cuBLAS calls timed alone.\n\n"
        + markdown_table(
            ["case", "fusion", "step", "kernels", "kernel sum", *CATEGORIES, "cuBLAS floor"], table_rows
        )
    )
    for r in rows:
        text += (
            f"\n\nTop kernels, {r['case']}, fusion {'on' if r['fused'] else 'off'} (µs per step, calls):\n\n"
        )
        text += markdown_table(["kernel", "µs", "calls"], [list(t) for t in r["top_kernels"]])
    gpu = "_".join((env.get("gpu") or "gpu").lower().split())
    write_results(
        f"step_profile_{model}_{gpu}{'_' + tag if tag else ''}", {"env": env, "rows": rows}, text, out
    )
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8b")
    ap.add_argument("--prefill", default="16x512", help="comma list of SEQSxLEN prefill chunks")
    ap.add_argument("--decode", default="256x576,64x576", help="comma list of BATCHxCTX decode steps")
    ap.add_argument(
        "--mixed", default="240x576+14x512", help="comma list of DECODESxCTX+PROMPTSxLEN mixed steps"
    )
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = config_of(args.model)
    model = Decoder(
        cfg, random_weights(cfg), select_backend("cuda", geometry(cfg)), max_model_len=args.max_model_len
    )
    rows: list[dict] = []
    cases = [
        (kind, c) for kind in ("prefill", "decode", "mixed") for c in getattr(args, kind).split(",") if c
    ]
    for kind, case in tqdm(cases, desc="cases"):
        if kind == "decode":
            a, b = (int(v) for v in case.split("x"))
            rows += profile_decode(model, a, b)
        elif kind == "prefill":  # an eager step without decodes
            n, length = (int(v) for v in case.split("x"))
            rows += profile_eager(model, 0, 0, n, length)
        else:
            (a, b), (c, d) = ((int(v) for v in part.split("x")) for part in case.split("+"))
            rows += profile_eager(model, a, b, c, d)
        gc.collect()
        torch.cuda.empty_cache()
        report(rows, args.model, args.out, args.tag)


if __name__ == "__main__":
    main()
