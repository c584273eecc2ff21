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
def ln_prefetch(stats_ptr, sums_ptr, offs_m, m_mask, stride_s, stride_u, P, BLOCK_P: tl.constexpr):
    """LayerNorm: issue the loads of the first BLOCK_P partial sums and shifted sums of squares per
    row before the K loop, like stats_prefetch, so their latency hides under the weight stream."""
    offs_p = tl.arange(0, BLOCK_P)
    pm = m_mask[:, None] & (offs_p[None, :] < P)
    s1 = tl.load(sums_ptr + offs_m[:, None] * stride_u + offs_p[None, :], mask=pm, other=0.0)
    s2 = tl.load(stats_ptr + offs_m[:, None] * stride_s + offs_p[None, :], mask=pm, other=0.0)
    return s1, s2


@triton.jit
def _ln_chunk(s1, s2, pm, offs_p, shift, K, TILE_W):
    """One chunk of partials: (Σ d_t, Σ d_t² / n_t, Σ M2_t) with d_t = S_t − n_t · shift."""
    n_t = tl.maximum(tl.minimum(TILE_W, K - offs_p * TILE_W), 1).to(tl.float32)
    d = tl.where(pm, s1 - n_t[None, :] * shift[:, None], 0.0)
    return tl.sum(d, 1), tl.sum(d * d / n_t[None, :], 1), tl.sum(tl.where(pm, s2, 0.0), 1)


@triton.jit
def ln_finish(
    s1,
    s2,
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
    """LayerNorm (1/σ, mean) per row from the producer's per-tile Σx (S_t) and Σ(x − tile mean)²
    (M2_t), tile t holding n_t = min(TILE_W, K − t·TILE_W) columns, in one pass over the partials
    (the first BLOCK_P of them prefetched by ln_prefetch):

        a = S_0 / n_0, d_t = S_t − n_t a     (shifted by the first tile's mean, a sample of the row)
        mean = a + Σ d_t / K
        M2   = Σ M2_t + Σ d_t² / n_t − (Σ d_t)² / K     (Chan et al.'s combination, shifted)

    Shifting by a value of the row's own scale keeps Σ d_t²/n_t − (Σ d_t)²/K free of the n·mean²
    terms that would cancel in fp32 for a large mean."""
    offs_p = tl.arange(0, BLOCK_P)
    pm = m_mask[:, None] & (offs_p[None, :] < P)
    n_0 = tl.minimum(TILE_W, K).to(tl.float32)
    shift = tl.sum(tl.where(offs_p[None, :] == 0, s1, 0.0), 1) / n_0
    sd, sdd, m2 = _ln_chunk(s1, s2, pm, offs_p, shift, K, TILE_W)
    for p0 in range(BLOCK_P, P, BLOCK_P):
        offs_q = p0 + tl.arange(0, BLOCK_P)
        qm = m_mask[:, None] & (offs_q[None, :] < P)
        t1 = tl.load(sums_ptr + offs_m[:, None] * stride_u + offs_q[None, :], mask=qm, other=0.0)
        t2 = tl.load(stats_ptr + offs_m[:, None] * stride_s + offs_q[None, :], mask=qm, other=0.0)
        a, b, c = _ln_chunk(t1, t2, qm, offs_q, shift, K, TILE_W)
        sd += a
        sdd += b
        m2 += c
    total = tl.maximum(m2 + sdd - sd * sd * inv_k, 0.0)
    return tl.math.rsqrt(total * inv_k + eps), shift + sd * inv_k
