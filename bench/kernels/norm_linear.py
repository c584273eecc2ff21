"""The decode GEMMs of kernels/norm_linear.py against cuBLAS (every GEMM of a block, M = 1 .. 4096), and
a sweep of their tile configs (kernels/tile_configs.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.kernels.common import SWEEP, _rand, n_sets, rel_err
from fusionserve.kernels import norm_linear as nl
from fusionserve.kernels import tile_configs
from fusionserve.kernels.fp8 import quantize_weight
from fusionserve.kernels.triton_backend import TritonBackend


def bench_gemms(models, m_values, timer, device, dtype, peak_gbs, log, tiles=tile_configs.TUNED):
    rows = []
    be = TritonBackend(models[0].geometry, tiles=tiles)
    jobs = [(mdl, name, nk, m) for mdl in models for name, nk in mdl.shapes().items() for m in m_values]

    def _case(mdl, name, nk, m):
        n, k = nk
        wbytes = n * k * dtype.itemsize
        sets = n_sets(wbytes + m * k * dtype.itemsize)
        ws = [_rand(n, k, dtype=dtype, device=device, scale=k**-0.5) for _ in range(sets)]
        xs = [_rand(m, k, dtype=dtype, device=device) for _ in range(sets)]
        row = dict(model=mdl.name, gemm=name, M=m, N=n, K=k)
        variants = {
            "cublas": [lambda i=i: F.linear(xs[i], ws[i]) for i in range(sets)],
            "ours": [lambda i=i: be.linear(xs[i], ws[i]) for i in range(sets)],
        }
        if name == "gate_up":
            variants["gu"] = [lambda i=i: be.mlp_input(xs[i], None, ws[i])[0] for i in range(sets)]
        t = timer.compare(variants)
        t_cublas, t_ours = t["cublas"], t["ours"]
        y_ref = F.linear(xs[0], ws[0])
        y_ours = be.linear(xs[0], ws[0])[0]
        row.update(cublas_us=t_cublas, ours_us=t_ours, err=rel_err(y_ours, y_ref))
        if name == "gate_up":
            row["ours_gate_up_silu_us"] = t["gu"]
        moved = wbytes + (m * k + m * n) * dtype.itemsize
        row["cublas_pct_bw"] = 100 * moved / (t_cublas * 1e-6) / 1e9 / peak_gbs
        row["ours_pct_bw"] = 100 * moved / (t_ours * 1e-6) / 1e9 / peak_gbs
        row["tflops_ours"] = 2 * m * n * k / (t_ours * 1e-6) / 1e12
        row["speedup"] = t_cublas / t_ours
        rows.append(row)
        log(row)

    for mdl, name, nk, m in tqdm(jobs, desc="GEMMs", file=sys.stdout):
        _case(mdl, name, nk, m)
    return rows


def sweep_configs(m, n_out, k, sms, gate_up, elt):
    bm = tile_configs.m_bucket(m)
    m_tiles = -(-m // bm)
    for bn, bk, warps, stages in SWEEP:
        if (gate_up and bn > 64) or bk > 2 * k:
            continue
        tiles = -(-n_out // bn) * m_tiles
        for split in (1, 2, 4, 8, 16):
            if split > 1 and (tiles * split // 2 >= 2 * sms or k < bk * split * 2):
                break
            cfg = (bm, bn, bk, warps, stages, split)
            if tile_configs.smem_bytes(cfg, elt, gate_up) <= 200 * 1024:
                yield cfg


def sweep_call(geometry, n_out: int, k: int, m: int, gate_up: bool, cfg, fp8: bool):
    """The call one sweep config times: the bf16 GEMM with that config, or the FP8 one through a
    backend whose FP8 table holds only that config (x's amax pass included: the same in every variant)."""
    if not fp8:
        fn = nl.gate_up_silu if gate_up else nl.linear
        return lambda x, w: fn(x, w, config=cfg)
    be = TritonBackend(geometry, pdl=False, fp8_tiles={(n_out, k, tile_configs.m_bucket(m), gate_up): cfg})
    return lambda x, w: be.fp8_linear(x, w, gate_up=gate_up)


def sweep_weight(n: int, k: int, dtype, device, fp8: bool):
    w = _rand(n, k, dtype=dtype, device=device, scale=k**-0.5)
    return quantize_weight(w) if fp8 else w


def _compile_configs(items: list, dtype: torch.dtype, fp8: bool) -> int:
    """A worker of precompile: compile (and run once) each (geometry, n, k, m, gate_up, cfg) on the GPU."""
    torch.cuda.set_device(0)
    done = 0
    for geometry, n, k, m, gate_up, cfg in items:
        call = sweep_call(geometry, n // 2 if gate_up else n, k, m, gate_up, cfg, fp8)
        try:
            call(_rand(m, k, dtype=dtype, device="cuda"), sweep_weight(n, k, dtype, "cuda", fp8))
            done += 1
        except Exception:  # the sweep itself logs what does not compile
            pass
        torch.cuda.empty_cache()
    return done


def precompile(items: list, dtype: torch.dtype, procs: int, fp8: bool) -> None:
    """Fill Triton's on-disk cache for every sweep config in `procs` processes first: one process
    compiles about one config a second, hundreds of configs are the sweep's whole cost, and ptxas and
    LLVM run in parallel across processes (timing stays in the one sweep process)."""
    if procs <= 1 or not items:
        return
    chunks = [items[i::procs] for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        done = sum(pool.starmap(_compile_configs, [(c, dtype, fp8) for c in chunks]))
    print(f"precompiled {done}/{len(items)} sweep configs in {procs} processes", flush=True)


def bench_sweep(models, m_values, timer, device, dtype, log, fp8: bool = False):
    """Each decode GEMM's tile configs timed in isolation (bf16 weights, or `fp8`: e4m3 weights and
    no LM head, which stays bf16); returns the rows and the winners {(N, K, M bucket, gate_up): cfg}."""
    rows, best = [], {}
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    jobs = [
        (mdl, name, nk, m, gu)
        for mdl in models
        for name, nk in mdl.shapes().items()
        for m in m_values
        for gu in ((True, False) if name == "gate_up" else (False,))
        if not (fp8 and name == "lm_head")
    ]
    if device.type == "cuda":
        items = [
            (mdl.geometry, nk[0], nk[1], m, gu, cfg)
            for mdl, name, nk, m, gu in jobs
            for cfg in sweep_configs(m, nk[0] // 2 if gu else nk[0], nk[1], sms, gu, dtype.itemsize)
        ]
        precompile(items, dtype, min(12, max(1, (os.cpu_count() or 2) - 2)), fp8)

    def _case(mdl, name, nk, m, gate_up):
        n, k = nk
        n_out = n // 2 if gate_up else n
        sets = n_sets(n * k * dtype.itemsize)
        ws = [sweep_weight(n, k, dtype, device, fp8) for _ in range(sets)]
        x = _rand(m, k, dtype=dtype, device=device)
        bm = tile_configs.m_bucket(m)
        variants = {}
        for cfg in sweep_configs(m, n_out, k, sms, gate_up, dtype.itemsize):
            call = sweep_call(mdl.geometry, n_out, k, m, gate_up, cfg, fp8)
            try:
                call(x, ws[0])  # compile; a config that does not compile or launch is skipped
            except Exception as exc:
                log(dict(sweep_error=str(exc)[:300], cfg=cfg))
                continue
            variants[cfg] = [lambda i=i, call=call: call(x, ws[i]) for i in range(sets)]
        if not variants:
            return
        times = timer.compare(variants)
        results = sorted((t, cfg) for cfg, t in times.items())
        best[(n_out, k, bm, gate_up)] = results[0][1]
        rows.append(
            dict(
                model=mdl.name,
                gemm=name + ("" if gate_up or name != "gate_up" else "_plain"),
                M=m,
                N=n,
                K=k,
                best_cfg=results[0][1],
                best_us=results[0][0],
                default_cfg=tile_configs.pick_config(m, n_out, k, device, gate_up),
                all=[(c, t) for t, c in results],
            )
        )
        log(rows[-1])

    for mdl, name, nk, m, gu in tqdm(jobs, desc="sweep", file=sys.stdout):
        _case(mdl, name, nk, m, gu)
    return rows, best
