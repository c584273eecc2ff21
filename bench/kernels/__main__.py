"""Kernel benchmark: checks on the GPU, then times every decode GEMM, norm chain and attention kernel.

    python -m bench.kernels            # full run on a CUDA GPU, writes bench/results/kernels_<gpu>.{json,md}
    python -m bench.kernels --sweep    # also sweep decode-GEMM tile configs (prints a TUNED table)
    python -m bench.kernels --dry      # CPU smoke test of the script itself (interpreter, tiny shapes)

Timing follows decode: every measured op is captured REPS times into one CUDA graph, with its
weights (and KV caches) rotating over enough copies that L2 cannot serve them, and the graph is
replayed many times; we report the median per op. cuBLAS = torch.nn.functional.linear / addmm.

Norm chains (one norm of a block, as in docs/DESIGN.md), producer = o_proj + residual:
  none  : producer → consumer on raw h (no norm at all: the floor)
  off   : producer → RMSNorm kernel → consumer (ours) | addmm → F.rms_norm → F.linear (torch); best one
  fused : producer emitting Σh² partials → consumer applying rsqrt in its epilogue / elementwise pass
  hidden = (t_off - t_fused) / (t_off - t_none)
Consumers: attn = qkv GEMM + RoPE + paged KV write; mlp = gate_up GEMM + silu*mul.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F

from bench.kernels.backend import bench_chains
from bench.kernels.common import LLAMA_8B, ROOT, SMOL_135M, TINY, Timer, _rand, copy_bandwidth_gbs
from bench.kernels.decode_attention import bench_decode_attention
from bench.kernels.norm_linear import bench_gemms, bench_sweep
from bench.kernels.prefill_attention import bench_prefill_attention
from fusionserve.kernels import tile_configs
from fusionserve.kernels.triton_backend import TritonBackend
from fusionserve.models.registry import fusionserve_home


def _f(v, nd=1):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def markdown(res) -> str:
    meta = res["meta"]
    out = [
        f"# Kernel benchmark — {meta['gpu']}",
        "",
        f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · {meta['dtype']} · "
        f"copy bandwidth {meta['copy_GBs']:.0f} GB/s (read+write) · CUDA graphs, rotating weights, medians",
        "",
        "## Decode/prefill GEMMs (µs; % of measured copy bandwidth)",
        "",
        "| model | GEMM | N×K | M | cuBLAS | ours | ours/cuBLAS speedup | cuBLAS %BW | ours %BW |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.get("gemm", []):
        gu = f" (+silu: {_f(r['ours_gate_up_silu_us'])})" if "ours_gate_up_silu_us" in r else ""
        out.append(
            f"| {r['model']} | {r['gemm']} | {r['N']}×{r['K']} | {r['M']} | {_f(r['cublas_us'])} | "
            f"{_f(r['ours_us'])}{gu} | {_f(r['speedup'], 2)}x | {_f(r['cublas_pct_bw'], 0)}% | {_f(r['ours_pct_bw'], 0)}% |"
        )
    out += [
        "",
        "## Norm chains: o_proj+residual → [norm] → consumer (µs)",
        "",
        "| model | consumer | M | none (ours / torch) | off (ours / torch) | fused | hidden | fused vs best off |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res.get("chain", []):
        out.append(
            f"| {r['model']} | {r['chain']} | {r['M']} | {_f(r['none_us'])} / {_f(r['none_torch_us'])} | "
            f"{_f(r['off_us'])} / {_f(r['off_torch_us'])} | **{_f(r['fused_us'])}** | {_f(r['hidden_pct'], 0)}% | "
            f"{r['fused_vs_off_pct']:+.1f}% |"
        )
    out += [
        "",
        "## Decode attention (paged, GQA; KV bytes read / time)",
        "",
        "| model | B | context | µs | GB/s | % of copy BW | policy fill / wave2 µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res.get("attn_decode", []):
        out.append(
            f"| {r['model']} | {r['B']} | {r['ctx']} | {_f(r['us'])} | {_f(r['GBs'], 0)} | {_f(r['pct_bw'], 0)}% | "
            f"{_f(r.get('us_fill'))} / {_f(r.get('us_wave2'))} |"
        )
    out += [
        "",
        "## Prefill attention (causal, paged) vs torch SDPA flash",
        "",
        "| model | seqs × len | ours µs | SDPA flash µs | ours/SDPA time | ours TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in res.get("attn_prefill", []):
        out.append(
            f"| {r['model']} | {r['seqs']}×{r['seqlen']} | {_f(r['ours_us'])} | {_f(r['sdpa_flash_us'])} | "
            f"{_f(r['ratio'], 2)} | {_f(r['ours_tflops'], 0)} |"
        )
    if res.get("sweep"):
        out += [
            "",
            "## Tile sweep winners (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)",
            "",
            "| model | GEMM | M | best | µs | default |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["sweep"]:
            out.append(
                f"| {r['model']} | {r['gemm']} | {r['M']} | {r['best_cfg']} | {_f(r['best_us'])} | {r['default_cfg']} |"
            )
    out += ["", "## Goals", ""] + goals(res)
    return "\n".join(out) + "\n"


def goals(res) -> list[str]:
    """The issue's targets, checked against this run's numbers."""
    lines = []
    g = [r for r in res.get("gemm", []) if r["M"] <= 32]
    if g:
        worst = min(g, key=lambda r: r["speedup"])
        slow = [f"{r['model']} {r['gemm']} M={r['M']} ({r['speedup']:.2f}x)" for r in g if r["speedup"] < 1.0]
        lines.append(
            f"- decode GEMMs >= cuBLAS at M <= 32: {len(g) - len(slow)}/{len(g)} cases; worst "
            f"{worst['model']} {worst['gemm']} M={worst['M']} at {worst['speedup']:.2f}x"
            + (f"; below 1.00x: {', '.join(slow)}" if slow else "")
        )
    ch = res.get("chain", [])
    for lo, hi, target in ((1, 8, 80), (32, 32, 50)):
        sel = [r for r in ch if lo <= r["M"] <= hi]
        if sel:
            vals = ", ".join(f"{r['model']} {r['chain']} M={r['M']}: {r['hidden_pct']:.0f}%" for r in sel)
            n_ok = sum(r["hidden_pct"] >= target for r in sel)
            lines.append(f"- norm cost hidden >= {target}% at M in [{lo}, {hi}]: {n_ok}/{len(sel)} ({vals})")
    if ch:
        worse = [
            f"{r['model']} {r['chain']} M={r['M']} ({r['fused_vs_off_pct']:+.1f}%)"
            for r in ch
            if r["fused_vs_off_pct"] > 0
        ]
        lines.append(
            f"- fused never slower than the best off path: {len(ch) - len(worse)}/{len(ch)}"
            + (f"; slower: {', '.join(worse)}" if worse else "")
        )
    dec = [r for r in res.get("attn_decode", []) if r["ctx"] >= 4096]
    if dec:
        lines.append(
            f"- decode attention >= 80% of copy bandwidth at context >= 4k: {sum(r['pct_bw'] >= 80 for r in dec)}"
            f"/{len(dec)} ("
            + ", ".join(f"{r['model']} B={r['B']} ctx={r['ctx']}: {r['pct_bw']:.0f}%" for r in dec)
            + ")"
        )
    pre = res.get("attn_prefill", [])
    if pre:
        lines.append(
            f"- prefill attention within 1.3x of SDPA flash: {sum(r['ratio'] <= 1.3 for r in pre)}/{len(pre)} "
            f"(worst {max(r['ratio'] for r in pre):.2f}x)"
        )
    return lines


def profile_cases():
    """A few ops, eagerly, after a warm-up: run under ncu to see each kernel's time and DRAM throughput."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    be = TritonBackend(SMOL_135M.geometry)  # eps is all the GEMMs read of it
    ops = []
    for mdl, name, m in ((SMOL_135M, "gate_up", 32), (SMOL_135M, "qkv", 32), (LLAMA_8B, "qkv", 1)):
        n, k = mdl.shapes()[name]
        w, x = _rand(n, k, dtype=dtype, device=device), _rand(m, k, dtype=dtype, device=device)
        ops += [lambda w=w, x=x: F.linear(x, w), lambda w=w, x=x: be.linear(x, w)]
        if name == "gate_up":
            ops.append(lambda w=w, x=x: be.mlp_input(x, None, w)[0])
    for mdl, m in ((LLAMA_8B, 8), (SMOL_135M, 1)):
        (n_o, k_o), (n_c, k_c) = mdl.shapes()["o"], mdl.shapes()["qkv"]
        w_o, w_c = _rand(n_o, k_o, dtype=dtype, device=device), _rand(n_c, k_c, dtype=dtype, device=device)
        o_in, h_in = _rand(m, k_o, dtype=dtype, device=device), _rand(m, n_o, dtype=dtype, device=device)

        def chain(fused, w_o=w_o, w_c=w_c, o_in=o_in, h_in=h_in):
            h, st = be.linear(o_in, w_o, residual=h_in, want_stats=fused)
            if not fused:
                h = be.rmsnorm(h)
            return be.linear(h, w_c, row_stats=st)

        ops += [lambda c=chain: c(True), lambda c=chain: c(False)]
    for op in ops:  # warm-up: compile everything first
        op()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for op in ops:
        op()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dry", action="store_true", help="CPU smoke test of this script (interpreter, tiny shapes)"
    )
    ap.add_argument("--sweep", action="store_true", help="sweep decode-GEMM tile configs first")
    ap.add_argument(
        "--save-tiles",
        action="store_true",
        help="with --sweep: cache the winners for this GPU model ($FUSIONSERVE_HOME/tiles/<gpu>.json), "
        "which the server then uses over the shipped table (kernels/tile_configs.tile_table_for)",
    )
    ap.add_argument(
        "--fp8",
        action="store_true",
        help="with --sweep: sweep the FP8-weight decode GEMMs instead (their own table, <gpu>-fp8.json)",
    )
    ap.add_argument("--only", default="gemm,chain,decode,prefill", help="sections to run")
    ap.add_argument("--models", default="8b,135m", help="model shapes on the GPU: 8b and/or 135m")
    ap.add_argument("--m", default="1,8,32,64,256,4096", help="M values of the GEMM table")
    ap.add_argument("--sweep-m", default="1,32", help="M values of the sweep (one per M bucket)")
    ap.add_argument("--replays", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--profile", action="store_true", help="run a few ops eagerly, for ncu")
    args = ap.parse_args(argv)
    if args.profile:
        return profile_cases()

    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16
    shapes = {"8b": LLAMA_8B, "135m": SMOL_135M}
    models = [TINY] if device.type != "cuda" else [shapes[m] for m in args.models.split(",")]
    m_values = [int(v) for v in args.m.split(",")] if device.type == "cuda" else [1, 3, 17]
    chain_m = [m for m in m_values if m != 64] if device.type == "cuda" else [1, 17]
    timer = Timer(device, args.replays, min_calls=8)
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    import triton

    res = {
        "meta": dict(
            gpu=gpu,
            torch=torch.__version__,
            triton=triton.__version__,
            dtype=str(dtype).replace("torch.", ""),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            copy_GBs=copy_bandwidth_gbs(device) if device.type == "cuda" else float("nan"),
            interpret=os.environ.get("TRITON_INTERPRET", ""),
        )
    }
    peak = res["meta"]["copy_GBs"]
    print(f"{gpu}: copy bandwidth {peak:.0f} GB/s", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in gpu.lower()).strip("_") + ("_fp8" if args.fp8 else "")
    log_path = out_dir / f"kernels_{slug}.log.jsonl"
    log_f = open(log_path, "w")

    def log(row):
        log_f.write(json.dumps(row, default=str) + "\n")
        log_f.flush()

    def save():
        (out_dir / f"kernels_{slug}.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / f"kernels_{slug}.md").write_text(markdown(res))

    sections = set(args.only.split(","))
    tile_cache = fusionserve_home() / "tiles"
    tiles = tile_configs.tile_table_for(device, tile_cache)  # what the server would use on this GPU
    if args.sweep:
        sweep_timer = Timer(device, max(5, args.replays // 3), min_calls=8)
        sweep_m = [int(v) for v in args.sweep_m.split(",")] if device.type == "cuda" else [1]
        res["sweep"], best = bench_sweep(models, sweep_m, sweep_timer, device, dtype, log, args.fp8)
        if not args.fp8:
            tiles = MappingProxyType({**tiles, **best})  # the (bf16) GEMM table below uses the winners
        if args.save_tiles and device.type == "cuda":
            path = tile_configs.cache_file(tile_cache, gpu, "fp8" if args.fp8 else "bf16")
            old = tile_configs.load_tiles(path) if path.is_file() else {}
            tile_configs.save_tiles(path, {**old, **best})
            print(f"cached {len(best)} tile winners for {gpu} in {path}", flush=True)
        print("TUNED = {")
        for key, cfg in sorted(best.items()):
            print(f"    {key}: {cfg},")
        print("}")
        save()
    if "gemm" in sections:
        res["gemm"] = bench_gemms(models, m_values, timer, device, dtype, peak, log, tiles)
        save()
    if "chain" in sections:
        res["chain"] = bench_chains(models, chain_m, timer, device, dtype, log)
        save()
    if "decode" in sections:
        if device.type == "cuda":
            cases = [
                (LLAMA_8B, 1, 32768),
                (LLAMA_8B, 8, 4096),
                (LLAMA_8B, 8, 16384),
                (LLAMA_8B, 32, 4096),
                (LLAMA_8B, 32, 8192),
                (SMOL_135M, 32, 4096),
            ]
        else:
            cases = [(TINY, 2, 40)]
        res["attn_decode"] = bench_decode_attention(cases, timer, device, dtype, peak, log)
        save()
    if "prefill" in sections:
        if device.type == "cuda":
            cases = [(LLAMA_8B, 1, 1024), (LLAMA_8B, 1, 4096), (LLAMA_8B, 4, 2048), (SMOL_135M, 1, 4096)]
        else:
            cases = [(TINY, 2, 20)]
        if device.type == "cuda":
            res["attn_prefill"] = bench_prefill_attention(cases, timer, device, dtype, log)
        save()
    log_f.close()
    md = markdown(res)
    print(md)
    print(f"wrote {out_dir / f'kernels_{slug}.json'} and .md", flush=True)
    return res


if __name__ == "__main__":
    main()
