"""kernels/prefill_attention.py against torch's SDPA (flash / efficient)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.kernels.common import _paged, _rand, rel_err
from fusionserve.kernels import prefill_attention
from fusionserve.kernels.batch import PagedBatch


def bench_prefill_attention(cases, timer, device, dtype, log):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []

    def _case(mdl, n_seqs, seqlen):
        hq, hk, d = mdl.heads, mdl.kv_heads, mdl.head_dim
        bs = 16
        per = -(-seqlen // bs)
        k_cache, v_cache, tables = _paged(n_seqs, seqlen, hk, d, dtype, device)
        t_tot = n_seqs * seqlen
        q = _rand(t_tot, hq, d, dtype=dtype, device=device)
        qs = torch.arange(0, t_tot + 1, seqlen, dtype=torch.int32, device=device)
        batch = PagedBatch(
            query_start=qs,
            context_lens=torch.full((n_seqs,), seqlen, dtype=torch.int32, device=device),
            block_tables=tables,
            slot_mapping=torch.zeros(t_tot, dtype=torch.int64, device=device),
            max_query_len=seqlen,
            max_context_len=seqlen,
            block_size=bs,
        )
        # the same K/V, contiguous and expanded to Hq heads for SDPA (its flash path has no GQA)
        kk = k_cache[tables.long()].reshape(n_seqs, per * bs, hk, d)[:, :seqlen]
        vv = v_cache[tables.long()].reshape(n_seqs, per * bs, hk, d)[:, :seqlen]
        kq = kk.repeat_interleave(hq // hk, dim=2).transpose(1, 2).contiguous()
        vq = vv.repeat_interleave(hq // hk, dim=2).transpose(1, 2).contiguous()
        qq = q.view(n_seqs, seqlen, hq, d).transpose(1, 2).contiguous()
        scale = d**-0.5

        def ours():
            return prefill_attention.prefill_attention(q, k_cache, v_cache, batch, scale)

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qq, kq, vq, is_causal=True, scale=scale)

        times = timer.compare({"ours": [ours], "sdpa": [sdpa]})
        t_ours, t_sdpa = times["ours"], times["sdpa"]
        err = rel_err(ours().view(n_seqs, seqlen, hq, d), sdpa().transpose(1, 2))
        flops = 4 * n_seqs * seqlen * seqlen * hq * d / 2
        row = dict(
            model=mdl.name,
            seqs=n_seqs,
            seqlen=seqlen,
            ours_us=t_ours,
            sdpa_flash_us=t_sdpa,
            ratio=t_ours / t_sdpa,
            ours_tflops=flops / (t_ours * 1e-6) / 1e12,
            err=err,
        )
        rows.append(row)
        log(row)

    for mdl, n_seqs, seqlen in tqdm(cases, desc="prefill attn", file=sys.stdout):
        _case(mdl, n_seqs, seqlen)
    return rows
