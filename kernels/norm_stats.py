"""The consumer side of a deferred norm's statistics, as Triton device functions of the decode GEMM
(kernels/norm_linear.py): RMSNorm's 1/rms from Σx² partials, LayerNorm's mean and 1/σ from packed
shifted partials (docs/DESIGN.md, "The deferred-norm contract")."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def stats_prefetch(stats_ptr, offs_m, m_mask, stride_s, P, BLOCK_P: tl.constexpr):
    """RMSNorm: issue the loads of the first BLOCK_P Σx² partials per row; nothing waits for them
    until they are used (after the K loop)."""
    offs_p = tl.arange(0, BLOCK_P)
    pm = m_mask[:, None] & (offs_p[None, :] < P)
    return tl.load(stats_ptr + offs_m[:, None] * stride_s + offs_p[None, :], mask=pm, other=0.0)


@triton.jit
def stats_finish(s, stats_ptr, offs_m, m_mask, stride_s, P, inv_k, eps, BLOCK_P: tl.constexpr):
    """RMSNorm's 1/rms per row from the prefetched and any remaining Σx² partials."""
    ss = tl.sum(s, 1)
    for p0 in range(BLOCK_P, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pm = m_mask[:, None] & (offs_p[None, :] < P)
        ss += tl.sum(tl.load(stats_ptr + offs_m[:, None] * stride_s + offs_p[None, :], mask=pm, other=0.0), 1)
    return tl.math.rsqrt(ss * inv_k + eps)


@triton.jit
def ln_finish(
    stats_ptr,
    sums_ptr,
    offs_m,
    m_mask,
    stride_s,
    stride_u,
    P,
    K,
    TILE_W,
    inv_k,
    eps,
    BLOCK_P: tl.constexpr,
):
    """LayerNorm (1/σ, mean) per row from the producer's per-tile Σx (sums) and Σ(x − tile mean)²
    (stats): M2 = Σ_t M2_t + Σ_t (S_t − n_t μ)² / n_t, tile t holding n_t = min(TILE_W, K − t·TILE_W)
    columns. Two passes over the partials (the mean first), after the K loop: prefetching both
    arrays would hold 2 x BLOCK_M x BLOCK_P registers through it."""
    su = tl.zeros([offs_m.shape[0]], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pm = m_mask[:, None] & (offs_p[None, :] < P)
        su += tl.sum(tl.load(sums_ptr + offs_m[:, None] * stride_u + offs_p[None, :], mask=pm, other=0.0), 1)
    mean = su * inv_k
    total = tl.zeros([offs_m.shape[0]], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pm = m_mask[:, None] & (offs_p[None, :] < P)
        n_t = tl.maximum(tl.minimum(TILE_W, K - offs_p * TILE_W), 1).to(tl.float32)
        s2 = tl.load(stats_ptr + offs_m[:, None] * stride_s + offs_p[None, :], mask=pm, other=0.0)
        s1 = tl.load(sums_ptr + offs_m[:, None] * stride_u + offs_p[None, :], mask=pm, other=0.0)
        d = s1 - n_t[None, :] * mean[:, None]
        total += tl.sum(tl.where(pm, s2 + d * d / n_t[None, :], 0.0), 1)
    return tl.math.rsqrt(total * inv_k + eps), mean
