"""kernels/decode_attention.py: time and bandwidth per split plan, error against the reference."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from bench.kernels.common import _paged, _rand, n_sets, rel_err
from fusionserve.kernels import decode_attention as attn
from fusionserve.kernels.batch import PagedBatch
from fusionserve.kernels.decode_attention import DecodeSplitPolicy


def bench_decode_attention(cases, timer, device, dtype, peak_gbs, log):
    rows = []

    def _case(mdl, bsz, ctx):
        hq, hk, d = mdl.heads, mdl.kv_heads, mdl.head_dim
        kv_bytes = bsz * ctx * hk * d * 2 * dtype.itemsize
        sets = n_sets(kv_bytes, cap=16)
        caches = [_paged(bsz, ctx, hk, d, dtype, device) for _ in range(sets)]
        lens = torch.full((bsz,), ctx, dtype=torch.int32, device=device)
        q = _rand(bsz, hq, d, dtype=dtype, device=device)

        def run(i, plan="fill"):
            kc, vc, bt = caches[i]
            return attn.decode_attention(
                q, kc, vc, bt, lens, ctx, d**-0.5, policy=DecodeSplitPolicy(plan=plan)
            )

        policies = ("fill", "wave2")
        times = timer.compare({p: [lambda i=i, p=p: run(i, p) for i in range(sets)] for p in policies})
        t = times[DecodeSplitPolicy().plan]
        kc, vc, bt = caches[0]
        batch = PagedBatch(
            query_start=torch.arange(bsz + 1, dtype=torch.int32),
            context_lens=lens.cpu(),
            block_tables=bt.cpu(),
            slot_mapping=torch.zeros(bsz, dtype=torch.int64),
            max_query_len=1,
            max_context_len=ctx,
            block_size=16,
        )
        err = float("nan")
        if bsz * ctx <= 65536:
            from fusionserve.kernels import reference

            want = reference.paged_attention(
                q.cpu().float(), kc.cpu().float(), vc.cpu().float(), batch, d**-0.5
            )
            err = rel_err(run(0).cpu(), want)
        row = dict(model=mdl.name, B=bsz, ctx=ctx, us=t, GBs=kv_bytes / (t * 1e-6) / 1e9, err=err)
        row.update({f"us_{p}": times[p] for p in policies})
        row["plans"] = {
            p: attn.decode_plan(bsz, hk, ctx, d, device, DecodeSplitPolicy(plan=p)) for p in policies
        }
        row["pct_bw"] = 100 * row["GBs"] / peak_gbs
        rows.append(row)
        log(row)

    for mdl, bsz, ctx in tqdm(cases, desc="decode attn", file=sys.stdout):
        _case(mdl, bsz, ctx)
    return rows
