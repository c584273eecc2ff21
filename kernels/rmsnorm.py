"""The honest "off" path: (fused residual-add +) RMSNorm and LayerNorm kernels writing normalized rows.

Also the per-row statistics pass used at large M, where cuBLAS already fused the residual add
(torch.addmm) and the consumer elementwise kernel applies the deferred scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.pdl import PdlPolicy, pdl_args, pdl_wait
from fusionserve.kernels.triton_env import INTERPRET, next_pow2
from fusionserve.kernels.triton_helpers import cast


def _warps(block: int) -> int:
    return 1 if INTERPRET else max(1, min(16, block // 256))


@triton.jit
def _norm_kernel(
    x_ptr,
    res_ptr,
    h_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    K,
    stride_x,
    stride_r,
    stride_h,
    stride_y,
    inv_k,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    LAYER: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
):
    """One row per program: [h = x + res;] y = (h [- mean]) * rsqrt(var + eps) [* w] [+ b]."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    pdl_wait(PDL, EARLY)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = cast(x.to(tl.float32) + res.to(tl.float32), h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + offs, x, mask=mask)
    xf = x.to(tl.float32)
    if LAYER:
        mean = tl.sum(xf, 0) * inv_k
        xf = tl.where(mask, xf - mean, 0.0)
    r = tl.math.rsqrt(tl.sum(xf * xf, 0) * inv_k + eps)
    y = xf * r
    if HAS_W:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, cast(y, y_ptr.dtype.element_ty), mask=mask)


def _norm(x, residual, weight, bias, eps, layer, pdl: PdlPolicy | None = None):
    assert x.dim() == 2
    if x.stride(1) != 1:
        x = x.contiguous()
    t, k = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    if t:
        block = next_pow2(k)
        _norm_kernel[(t,)](
            x,
            residual if residual is not None else x,
            h if h is not None else x,
            y,
            weight if weight is not None else x,
            bias if bias is not None else x,
            k,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            h.stride(0) if h is not None else 0,
            y.stride(0),
            1.0 / k,
            eps,
            HAS_RES=residual is not None,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            LAYER=layer,
            BLOCK=block,
            **pdl_args(pdl, t, x.device),
            num_warps=_warps(block),
        )
    return y, h


def rmsnorm(
    x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, pdl: PdlPolicy | None = None
) -> torch.Tensor:
    """reference.rmsnorm as one kernel (gains normally folded into the next weight: weight=None)."""
    return _norm(x, None, weight, None, eps, False, pdl)[0]


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, eps: float, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns (h = x + residual, rmsnorm(h)); h rounded first, as stored."""
    y, h = _norm(x, residual, weight, None, eps, False)
    return h, y


def layernorm(
    x: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm (biased variance, fp32 math); with `residual`, returns (h = x + residual, layernorm(h))."""
    y, h = _norm(x, residual, weight, bias, eps, True)
    return y if residual is None else (h, y)


@triton.jit
def _row_stats_kernel(x_ptr, sq_ptr, sum_ptr, K, stride_x, WANT_SUMS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc += v * v
        if WANT_SUMS:
            acc_s += v
    tl.store(sq_ptr + row, tl.sum(acc, 0))
    if WANT_SUMS:
        tl.store(sum_ptr + row, tl.sum(acc_s, 0))


def row_stats(x: torch.Tensor, want_sums: bool = False):
    """Per-row Σx² (and Σx) as [T, 1] fp32 partials: the producer statistic after a cuBLAS addmm."""
    if x.stride(1) != 1:
        x = x.contiguous()
    t, k = x.shape
    sq = torch.empty((t, 1), device=x.device, dtype=torch.float32)
    su = torch.empty((t, 1), device=x.device, dtype=torch.float32) if want_sums else None
    if t:
        block = min(next_pow2(k), 256 if INTERPRET else 4096)
        _row_stats_kernel[(t,)](
            x,
            sq,
            su if su is not None else sq,
            k,
            x.stride(0),
            WANT_SUMS=want_sums,
            BLOCK=block,
            num_warps=_warps(block),
        )
    return (sq, su) if want_sums else sq
