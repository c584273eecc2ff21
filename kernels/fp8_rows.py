"""Per-token FP8 passes over activation rows (kernels/fp8.py's arithmetic), one program per row:

- `amax_rows`: max|x| per row, [T, 1] fp32 — the scale of a decode GEMM input no producer measured
  (the attention output into o_proj, silu·mul into down_proj, the unfused path's normalized x);
  the GEMM then quantizes on the fly.
- `quantize_rows`: x_q = e4m3(x · (1/s_x)) and the row scale s_x (times the deferred norm's r when
  given) for cuBLASLt's FP8 GEMM at prefill sizes, in one launch (the row is re-read from L2).

Their torch twins are kernels/fp8.py's quantize_rows / activation_scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.fp8 import E4M3
from fusionserve.kernels.triton_env import INTERPRET, next_pow2
from fusionserve.kernels.triton_helpers import row_scale, stats_operand, to_e4m3


@triton.jit
def _row_amax(x_ptr, row, K, stride_x, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(v))
    return tl.max(acc, 0)


@triton.jit
def _amax_kernel(x_ptr, out_ptr, K, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tl.store(out_ptr + row, _row_amax(x_ptr, row, K, stride_x, BLOCK))


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    stats_ptr,
    K,
    P,
    stride_x,
    stride_q,
    stride_s,
    inv_k,
    eps,
    HAS_SCALE: tl.constexpr,
    FROM_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)
    amax = _row_amax(x_ptr, row, K, stride_x, BLOCK)
    s = tl.where(amax > 0, amax / 448.0, 1.0)
    inv_s = 1.0 / s
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + offs, to_e4m3(v * inv_s), mask=offs < K)
    if HAS_SCALE:  # the deferred RMSNorm's r joins the row scale: (x_q W_qᵀ) · r s_x · s_w
        s = s * row_scale(stats_ptr, row, P, stride_s, inv_k, eps, BLOCK_P, FROM_ROWS)
    tl.store(scale_ptr + row, s)


def _block(k: int) -> int:
    return min(256 if INTERPRET else 2048, next_pow2(k))


def amax_rows(x: torch.Tensor) -> torch.Tensor:
    """max|x| per row, [T, 1] fp32."""
    t, k = x.shape
    out = torch.empty((t, 1), device=x.device, dtype=torch.float32)
    if t:
        _amax_kernel[(t,)](x, out, k, x.stride(0), BLOCK=_block(k), num_warps=4)
    return out


def quantize_rows(
    x: torch.Tensor, row_stats: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q [T, K] e4m3, row scale [T, 1] fp32 = s_x, or r · s_x with the producer's `row_stats`)."""
    t, k = x.shape
    xq = torch.empty((t, k), device=x.device, dtype=E4M3)
    scale = torch.empty((t, 1), device=x.device, dtype=torch.float32)
    if t == 0:
        return xq, scale
    stats, p, stride_s, from_rows, block_p = stats_operand(row_stats, k)
    _quantize_kernel[(t,)](
        x, xq, scale, stats if stats is not None else x, k, p,
        x.stride(0), xq.stride(0), stride_s, 1.0 / k, eps,
        HAS_SCALE=stats is not None, FROM_ROWS=from_rows, BLOCK=_block(k), BLOCK_P=block_p, num_warps=4,
    )  # fmt: skip
    return xq, scale


@triton.jit
def amax_scale(amax_ptr, offs_m, m_mask, stride_a, PA, BLOCK_PA: tl.constexpr):
    """Per-token activation scale s_x = max|x| / 448 (1 for an all-zero row) from the producer's
    per-tile max|x| partials [M, PA]: needed before the K loop, which quantizes x with it."""
    offs_p = tl.arange(0, BLOCK_PA)
    pm = m_mask[:, None] & (offs_p[None, :] < PA)
    amax = tl.max(tl.load(amax_ptr + offs_m[:, None] * stride_a + offs_p[None, :], mask=pm, other=0.0), 1)
    for p0 in range(BLOCK_PA, PA, BLOCK_PA):
        offs_q = p0 + tl.arange(0, BLOCK_PA)
        qm = m_mask[:, None] & (offs_q[None, :] < PA)
        a = tl.load(amax_ptr + offs_m[:, None] * stride_a + offs_q[None, :], mask=qm, other=0.0)
        amax = tl.maximum(amax, tl.max(a, 1))
    return tl.where(amax > 0, amax / 448.0, 1.0)
