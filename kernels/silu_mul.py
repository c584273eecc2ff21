"""silu(gate) * up for large M, where cuBLAS ran the gate/up GEMM on raw x: the deferred norm's row
scale rides on this elementwise pass, which runs anyway (reference.silu_mul)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.triton_env import INTERPRET, next_pow2
from fusionserve.kernels.triton_helpers import cast, row_scale, silu, stats_operand


@triton.jit
def _silu_mul_kernel(
    gu_ptr,
    out_ptr,
    stats_ptr,
    n_half,
    P,
    stride_g,
    stride_o,
    stride_s,
    inv_k,
    eps,
    HAS_SCALE: tl.constexpr,
    FROM_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_half
    g = tl.load(gu_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + n_half + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        r = row_scale(stats_ptr, row, P, stride_s, inv_k, eps, BLOCK_P, FROM_ROWS)
        g = g * r
        u = u * r
    y = silu(g) * u
    tl.store(out_ptr + row * stride_o + offs, cast(y, out_ptr.dtype.element_ty), mask=mask)


def silu_mul(
    gate_up: torch.Tensor, row_stats: torch.Tensor | None = None, k: int = 1, eps: float = 1e-6
) -> torch.Tensor:
    """silu(r*gate) * (r*up) of a [T, 2I] GEMM output; r = rsqrt(Σ row_stats / k + eps) when given."""
    t, two_i = gate_up.shape
    i = two_i // 2
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((t, i), device=gate_up.device, dtype=gate_up.dtype)
    if t == 0:
        return out
    stats, p, stride_s, from_rows, block_p = stats_operand(row_stats, k)
    block = min(1024 if not INTERPRET else 256, next_pow2(i))
    _silu_mul_kernel[(t, triton.cdiv(i, block))](
        gate_up,
        out,
        stats if stats is not None else out,
        i,
        p,
        gate_up.stride(0),
        out.stride(0),
        stride_s,
        1.0 / k,
        eps,
        HAS_SCALE=stats is not None,
        FROM_ROWS=from_rows,
        BLOCK=block,
        BLOCK_P=block_p,
        num_warps=4,
    )
    return out
