"""The deferred LayerNorm's epilogue as one row pass over a cuBLAS product, for prefill-sized M
(reference.ln_epilogue): y = (acc − μ c) σ⁻¹ + b' (+ residual) [→ GELU], rounded once, and y's own
packed statistics per BLOCK-wide column block — the same layout the decode GEMM's producers write
(docs/DESIGN.md, "The deferred-norm contract"), so any consumer reads either.

`acc` is cuBLAS's fp32 accumulator (torch.mm with out_dtype): the mean correction subtracts μ·c from
x·W'ᵀ, which cancels |μ|/σ-fold, so it must not see a bf16-rounded product. With no operand but
`acc` and no store, the same kernel is the embedding's statistics pass (`ln_row_stats`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.norm_stats import ln_finish, ln_prefetch
from fusionserve.kernels.triton_env import INTERPRET, next_pow2
from fusionserve.kernels.triton_helpers import cast, gelu


@triton.jit
def _row_scalar(v, lane_mask):
    """The one live lane of a 2-lane row vector (ln_finish works on row vectors)."""
    return tl.sum(tl.where(lane_mask, v, 0.0), 0)


@triton.jit
def _ln_row_kernel(
    acc_ptr,
    out_ptr,
    colsum_ptr,
    bias_ptr,
    res_ptr,
    stats_ptr,
    sums_ptr,
    stats_out_ptr,
    sums_out_ptr,
    N,
    K,
    P,
    TILE_W,
    stride_a,
    stride_o,
    stride_r,
    stride_s,
    stride_so,
    inv_k,
    eps,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    GELU: tl.constexpr,
    STORE: tl.constexpr,
    WANT_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = tl.load(acc_ptr + row * stride_a + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        lanes = row + tl.arange(0, 2)
        live = lanes == row
        s1, s2 = ln_prefetch(stats_ptr, sums_ptr, lanes, live, stride_s, stride_s, P, BLOCK_P)
        r, mean = ln_finish(
            s1, s2, stats_ptr, sums_ptr, lanes, live, stride_s, stride_s, P, K, TILE_W, inv_k, eps, BLOCK_P
        )
        c = tl.load(colsum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = (v - _row_scalar(mean, live) * c) * _row_scalar(r, live)
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    v = gelu(v, GELU)
    o = cast(v, out_ptr.dtype.element_ty)
    if STORE:
        tl.store(out_ptr + row * stride_o + offs, o, mask=mask)
    if WANT_STATS:  # this block's Σy and Σ(y − block mean)², as a decode GEMM's output tile writes them
        of = tl.where(mask, o.to(tl.float32), 0.0)
        block_sum = tl.sum(of, 0)
        dev = tl.where(mask, of - block_sum / tl.sum(mask.to(tl.float32), 0), 0.0)
        tl.store(sums_out_ptr + row * stride_so + blk, block_sum)
        tl.store(stats_out_ptr + row * stride_so + blk, tl.sum(dev * dev, 0))


def ln_row_epilogue(
    acc: torch.Tensor,
    k: int,
    col_sums: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stats: torch.Tensor | None,
    eps: float,
    want_stats: bool,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    gelu: int = 0,
    store: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """reference.ln_epilogue in one pass: (y [T, N], packed statistics [T, 2P] or None), P = ⌈N/BLOCK⌉.

    `stats`: the producer's packed statistics of the GEMM's input x (K-wide rows; None: x was used as
    it is); `out` may be `acc` itself (fp32 logits, in place). `store=False` only measures `acc`."""
    t, n = acc.shape
    y = out if out is not None else torch.empty((t, n), device=acc.device, dtype=out_dtype or acc.dtype)
    block = min(256 if INTERPRET else 1024, next_pow2(n))
    n_blocks = triton.cdiv(n, block)
    packed = torch.empty((t, 2 * n_blocks), device=acc.device, dtype=torch.float32) if want_stats else None
    if t == 0:
        return y, packed
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    p = 1
    if stats is not None:
        assert col_sums is not None
        stats = stats.float()
        p = stats.shape[1] // 2
    _ln_row_kernel[(t, n_blocks)](
        acc,
        y,
        col_sums if stats is not None else acc,
        bias if bias is not None else acc,
        residual if residual is not None else acc,
        stats[:, p:] if stats is not None else acc,
        stats if stats is not None else acc,
        packed[:, n_blocks:] if packed is not None else acc,
        packed if packed is not None else acc,
        n,
        k,
        p,
        next_pow2(triton.cdiv(k, p)),  # the producer's column-block width
        acc.stride(0),
        y.stride(0),
        residual.stride(0) if residual is not None else 0,
        stats.stride(0) if stats is not None else 0,
        packed.stride(0) if packed is not None else 0,
        1.0 / k,
        eps,
        HAS_SCALE=stats is not None,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        GELU=gelu,
        STORE=store,
        WANT_STATS=want_stats,
        BLOCK=block,
        BLOCK_P=min(128, next_pow2(p)),
        num_warps=4,
    )
    return y, packed


def ln_row_stats(x: torch.Tensor) -> torch.Tensor:
    """Packed LayerNorm statistics of x's rows (the embedding's, for the first consumer): one read."""
    _, packed = ln_row_epilogue(x, x.shape[-1], None, None, None, None, 0.0, True, out=x, store=False)
    return packed
