"""Norm chains through the Backend: one norm of a block, none / off / fused, ours and torch's best."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.kernels.common import EPS, _rand, n_sets, rel_err
from fusionserve.kernels import rope_kv
from fusionserve.kernels.batch import LayerKV, Rotary
from fusionserve.kernels.silu_mul import silu_mul
from fusionserve.kernels.triton_backend import TritonBackend


def bench_chains(models, m_values, timer, device, dtype, log):
    rows = []
    jobs = [(mdl, kind, m) for mdl in models for kind in ("attn", "mlp") for m in m_values]

    def _case(mdl, kind, m):
        be = TritonBackend(mdl.geometry)
        shapes = mdl.shapes()
        hid, d = mdl.hidden, mdl.head_dim
        n_o, k_o = shapes["o"]
        n_c, k_c = shapes["qkv" if kind == "attn" else "gate_up"]
        sets = n_sets((n_o * k_o + n_c * k_c) * dtype.itemsize)
        w_o = [_rand(n_o, k_o, dtype=dtype, device=device, scale=k_o**-0.5) for _ in range(sets)]
        w_c = [_rand(n_c, k_c, dtype=dtype, device=device, scale=k_c**-0.5) for _ in range(sets)]
        o_in = _rand(m, k_o, dtype=dtype, device=device)
        h_in = _rand(m, hid, dtype=dtype, device=device)
        bs = 16
        nb = -(-m // bs) + 1
        k_cache = torch.zeros(nb, bs, mdl.kv_heads, d, dtype=dtype, device=device)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.arange(m, device=device, dtype=torch.int64)
        pos = torch.arange(m, device=device, dtype=torch.int64)
        cos_sin = rope_kv.rope_cos_sin(max(m, 16), d, 500000.0, device=device)
        rotary, kv = Rotary(pos, cos_sin), LayerKV(k_cache, v_cache, slots)

        def consume(x, st, i, torch_gemm=False):
            if kind == "attn":
                if torch_gemm:
                    qkv = F.linear(x, w_c[i])
                    return rope_kv.rope_kv_write(qkv, rotary, kv, mdl.geometry)
                return be.attn_input(x, st, w_c[i], None, rotary, kv)
            if torch_gemm:
                return silu_mul(F.linear(x, w_c[i]))
            return be.mlp_input(x, st, w_c[i])[0]

        def none(i):
            h, _ = be.linear(o_in, w_o[i], residual=h_in)
            return consume(h, None, i)

        def none_torch(i):
            h = torch.addmm(h_in, o_in, w_o[i].t())
            return consume(h, None, i, torch_gemm=True)

        def off(i):
            h, _ = be.linear(o_in, w_o[i], residual=h_in)
            return consume(be.rmsnorm(h), None, i)

        def off_torch(i):
            h = torch.addmm(h_in, o_in, w_o[i].t())
            return consume(F.rms_norm(h, (hid,), eps=EPS), None, i, torch_gemm=True)

        def fused(i):
            h, st = be.linear(o_in, w_o[i], residual=h_in, want_stats=True)
            return consume(h, st, i)

        variants = dict(none=none, none_torch=none_torch, off=off, off_torch=off_torch, fused=fused)
        row = dict(model=mdl.name, chain=kind, M=m)
        times = timer.compare(
            {v: [lambda i=i, fn=fn: fn(i) for i in range(sets)] for v, fn in variants.items()}
        )
        outs = {}
        for vname, fn in variants.items():
            row[f"{vname}_us"] = times[vname]
            outs[vname] = fn(0).float()
        row["err_fused_vs_off"] = rel_err(outs["fused"], outs["off_torch"])
        row["err_off_vs_off_torch"] = rel_err(outs["off"], outs["off_torch"])
        t_none = min(row["none_us"], row["none_torch_us"])
        t_off = min(row["off_us"], row["off_torch_us"])
        row["t_none_best"], row["t_off_best"] = t_none, t_off
        row["hidden_pct"] = (
            100 * (t_off - row["fused_us"]) / (t_off - t_none) if t_off > t_none else float("nan")
        )
        row["fused_vs_off_pct"] = 100 * (row["fused_us"] / t_off - 1)
        rows.append(row)
        log(row)

    for mdl, kind, m in tqdm(jobs, desc="chains", file=sys.stdout):
        _case(mdl, kind, m)
    return rows
