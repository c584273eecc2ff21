"""Embedding gather that also emits layer 0's deferred-norm statistic (Σx² per row, [T, 1] fp32)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.pdl import PdlPolicy, pdl_args, pdl_wait
from fusionserve.kernels.triton_env import INTERPRET


@triton.jit
def _embedding_kernel(
    ids_ptr,
    table_ptr,
    out_ptr,
    stats_ptr,
    K,
    stride_t,
    stride_o,
    WANT_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
):
    row = tl.program_id(0)
    pdl_wait(PDL, EARLY)  # ids may come from the previous step's sampler on the device
    idx = tl.load(ids_ptr + row).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        v = tl.load(table_ptr + idx * stride_t + offs, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + offs, v, mask=mask)
        if WANT_STATS:
            vf = v.to(tl.float32)
            acc += vf * vf
    if WANT_STATS:
        tl.store(stats_ptr + row, tl.sum(acc, 0))


def embedding(
    ids: torch.Tensor, table: torch.Tensor, want_stats: bool = False, pdl: PdlPolicy | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """reference.embedding: rows of `table` [V, K] for `ids` [T]; optional Σx² [T, 1]."""
    ids = ids.reshape(-1)
    if table.stride(1) != 1:
        table = table.contiguous()
    t, k = ids.shape[0], table.shape[1]
    out = torch.empty((t, k), device=table.device, dtype=table.dtype)
    stats = torch.empty((t, 1), device=table.device, dtype=torch.float32) if want_stats else None
    if t:
        block = min(1 << max(0, k - 1).bit_length(), 256 if INTERPRET else 2048)
        _embedding_kernel[(t,)](
            ids,
            table,
            out,
            stats if stats is not None else out,
            k,
            table.stride(0),
            out.stride(0),
            WANT_STATS=want_stats,
            BLOCK=block,
            **pdl_args(pdl, t, table.device),
            num_warps=1 if INTERPRET else 4,
        )
    return out, stats
