"""The deferred norm's row scale (+ bias, + residual, Σy² out) as one elementwise pass over a cuBLAS
GEMM's output, for large-M consumers with no elementwise pass of their own (reference.linear)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.triton_env import INTERPRET, next_pow2
from fusionserve.kernels.triton_helpers import cast, row_scale, stats_operand

#: Column blocks per program when a row's columns are split (8192 columns at BLOCK 1024).
SPAN_BLOCKS = 8


@triton.jit
def _row_epilogue_kernel(
    y_ptr,
    out_ptr,
    bias_ptr,
    res_ptr,
    stats_ptr,
    stats_out_ptr,
    N,
    P,
    stride_y,
    stride_o,
    stride_r,
    stride_s,
    inv_k,
    eps,
    SPAN,
    HAS_SCALE: tl.constexpr,
    FROM_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    WANT_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)
    start = tl.program_id(1) * SPAN  # columns [start, start + SPAN): one span per row with WANT_STATS
    if HAS_SCALE:
        r = row_scale(stats_ptr, row, P, stride_s, inv_k, eps, BLOCK_P, FROM_ROWS)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(start, tl.minimum(start + SPAN, N), BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        mask = offs < N
        v = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * r
        if HAS_BIAS:
            v += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            v += tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        o = cast(v, out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_o + offs, o, mask=mask)
        if WANT_STATS:
            of = tl.where(mask, o.to(tl.float32), 0.0)
            acc_sq += of * of
    if WANT_STATS:
        tl.store(stats_out_ptr + row, tl.sum(acc_sq, 0))


def row_epilogue(
    y: torch.Tensor,
    k: int,
    row_stats: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    want_stats: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GEMM epilogue as one row-wise pass for cuBLAS outputs: r*y + bias + residual, Σ² → [T, 1]."""
    t, n = y.shape
    out = out if out is not None else torch.empty_like(y)
    stats = torch.empty((t, 1), device=y.device, dtype=torch.float32) if want_stats else None
    if t == 0:
        return out, stats
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    scale, p, stride_s, from_rows, block_p = stats_operand(row_stats, k)
    block = min(1024 if not INTERPRET else 256, next_pow2(n))
    # Without Σy² a row's columns split over programs: few rows of many columns (the LM head's
    # 64 x 128k fp32 logits) would otherwise run one program per row on a handful of SMs.
    span = n if want_stats else block * SPAN_BLOCKS
    _row_epilogue_kernel[(t, triton.cdiv(n, span))](
        y,
        out,
        bias if bias is not None else y,
        residual if residual is not None else y,
        scale if scale is not None else y,
        stats if stats is not None else y,
        n,
        p,
        y.stride(0),
        out.stride(0),
        residual.stride(0) if residual is not None else 0,
        stride_s,
        1.0 / k,
        eps,
        span,
        HAS_SCALE=scale is not None,
        FROM_ROWS=from_rows,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        WANT_STATS=want_stats,
        BLOCK=block,
        BLOCK_P=block_p,
        num_warps=4,
    )
    return out, stats
