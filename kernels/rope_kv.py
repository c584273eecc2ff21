"""RoPE (HF half-split layout) + paged KV-cache write, in one pass over the qkv GEMM output.

At large M this is the consumer that applies the deferred norm: it reads the raw cuBLAS qkv rows,
multiplies each by rsqrt(Σ row_stats / K + eps), adds the qkv bias (which must come after the
scale), rotates q and k, writes q out and k, v into the paged cache. Negative slots are skipped.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusionserve.kernels.batch import Geometry, LayerKV, Rotary
from fusionserve.kernels.pdl import PdlPolicy, pdl_args, pdl_wait
from fusionserve.kernels.triton_env import INTERPRET, next_pow2
from fusionserve.kernels.triton_helpers import cast, row_scale, stats_operand


def rope_cos_sin(
    max_pos: int,
    head_dim: int,
    theta: float = 10000.0,
    scaling: dict | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The cos_sin table [max_pos, D] fp32 (cos in the first D/2 columns, sin in the last).

    `scaling` is HF's rope_scaling dict; rope_type "llama3" (Llama 3.1) rescales the inverse
    frequencies by wavelength band; "linear" divides positions by `factor`; others are ignored.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos_div = 1.0
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        pos_div = float(scaling["factor"])
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] / pos_div * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(device)


@triton.jit
def _rotate_store(
    src,
    dst,
    cos,
    sin,
    r,
    bias_ptr,
    n_heads,
    D: tl.constexpr,
    HALF: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    """Rotate n_heads heads at src (head stride D) and store them at dst (head stride D): the first
    2·HALF dims rotate in pairs (d, d + HALF); the rest (partial rotary, GPT-NeoX) pass through."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < n_heads) & (d[None, :] < HALF)
    off = h[:, None] * D + d[None, :]
    a = tl.load(src + off, mask=mask, other=0.0).to(tl.float32) * r
    b = tl.load(src + off + HALF, mask=mask, other=0.0).to(tl.float32) * r
    if HAS_BIAS:
        a += tl.load(bias_ptr + off, mask=mask, other=0.0).to(tl.float32)
        b += tl.load(bias_ptr + off + HALF, mask=mask, other=0.0).to(tl.float32)
    ty = dst.dtype.element_ty
    tl.store(dst + off, cast(a * cos[None, :] - b * sin[None, :], ty), mask=mask)
    tl.store(dst + off + HALF, cast(b * cos[None, :] + a * sin[None, :], ty), mask=mask)
    if 2 * HALF < D:
        dp = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pmask = (h[:, None] < n_heads) & (dp[None, :] < D)
        poff = h[:, None] * D + dp[None, :]
        c = tl.load(src + poff, mask=pmask, other=0.0).to(tl.float32) * r
        if HAS_BIAS:
            c += tl.load(bias_ptr + poff, mask=pmask, other=0.0).to(tl.float32)
        tl.store(dst + poff, cast(c, ty), mask=pmask)


@triton.jit
def rope_kv_tile(
    a,
    b,
    offs_m,
    m_mask,
    head,
    d,
    q_ptr,
    stride_q,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    pos_ptr,
    cs_ptr,
    stride_cs,
    stride_slot,
    HQ,
    HK,
    D: tl.constexpr,
    HALF: tl.constexpr,
):
    """The qkv GEMM's epilogue at decode sizes (kernels/norm_linear.py, PAIR_ROPE): fp32 tiles `a` (dims
    d of `head`, d < HALF) and `b` (dims d + HALF), already scaled and biased, of rows offs_m. q and k
    heads rotate; q goes to q_ptr [M, HQ·D], k and v into their paged caches [blocks, bs, HK, D] at the
    rows' slots (a negative slot writes nothing). One rounding, from the fp32 accumulator."""
    if head < HQ + HK:  # q or k: rotate (a head's program is all q, all k or all v)
        pos = tl.load(pos_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        cs = cs_ptr + pos[:, None] * stride_cs + d[None, :]
        cos = tl.load(cs, mask=m_mask[:, None], other=0.0)
        sin = tl.load(cs + HALF, mask=m_mask[:, None], other=0.0)
        a, b = a * cos - b * sin, b * cos + a * sin
    if head < HQ:
        q = q_ptr + offs_m[:, None] * stride_q + (head * D + d)[None, :]
        tl.store(q, cast(a, q_ptr.dtype.element_ty), mask=m_mask[:, None])
        tl.store(q + HALF, cast(b, q_ptr.dtype.element_ty), mask=m_mask[:, None])
    else:
        slot = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
        keep = (m_mask & (slot >= 0))[:, None]
        kv_head = tl.where(head < HQ + HK, head - HQ, head - HQ - HK)
        off = tl.where(slot >= 0, slot, 0)[:, None] * stride_slot + (kv_head * D + d)[None, :]
        if head < HQ + HK:
            tl.store(k_cache_ptr + off, cast(a, k_cache_ptr.dtype.element_ty), mask=keep)
            tl.store(k_cache_ptr + off + HALF, cast(b, k_cache_ptr.dtype.element_ty), mask=keep)
        else:
            tl.store(v_cache_ptr + off, cast(a, v_cache_ptr.dtype.element_ty), mask=keep)
            tl.store(v_cache_ptr + off + HALF, cast(b, v_cache_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _rope_kv_kernel(
    qkv_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    pos_ptr,
    cs_ptr,
    stats_ptr,
    bias_ptr,
    HQ,
    HK,
    P,
    stride_t,
    stride_qo,
    stride_slot,
    stride_cs,
    stride_s,
    inv_k,
    eps,
    D: tl.constexpr,
    HALF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    FROM_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
):
    t = tl.program_id(0)
    # Step inputs (positions, slots, the RoPE table) are the host's: read while the GEMM finishes.
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d, mask=d < HALF, other=0.0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    pdl_wait(PDL, EARLY)
    r = 1.0
    if HAS_SCALE:
        r = row_scale(stats_ptr, t, P, stride_s, inv_k, eps, BLOCK_P, FROM_ROWS)
    row = qkv_ptr + t * stride_t
    _rotate_store(
        row,
        q_out_ptr + t * stride_qo,
        cos,
        sin,
        r,
        bias_ptr,
        HQ,
        D,
        HALF,
        HAS_BIAS,
        BLOCK_HQ,
        BLOCK_HALF,
        BLOCK_PASS,
    )
    keep = slot >= 0
    slot_c = tl.where(keep, slot, 0)
    _rotate_store(
        row + HQ * D,
        k_cache_ptr + slot_c * stride_slot,
        cos,
        sin,
        r,
        bias_ptr + HQ * D,
        tl.where(keep, HK, 0),  # a negative slot writes nothing
        D,
        HALF,
        HAS_BIAS,
        BLOCK_HK,
        BLOCK_HALF,
        BLOCK_PASS,
    )
    h = tl.arange(0, BLOCK_HK)
    dd = tl.arange(0, BLOCK_D)
    vmask = (h[:, None] < tl.where(keep, HK, 0)) & (dd[None, :] < D)
    off = h[:, None] * D + dd[None, :]
    v = tl.load(row + (HQ + HK) * D + off, mask=vmask, other=0.0).to(tl.float32) * r
    if HAS_BIAS:
        v += tl.load(bias_ptr + (HQ + HK) * D + off, mask=vmask, other=0.0).to(tl.float32)
    tl.store(v_cache_ptr + slot_c * stride_slot + off, cast(v, v_cache_ptr.dtype.element_ty), mask=vmask)


def rope_kv_write(
    qkv: torch.Tensor,
    rotary: Rotary,
    kv: LayerKV,
    geom: Geometry,
    row_stats: torch.Tensor | None = None,
    k: int = 1,
    bias: torch.Tensor | None = None,
    pdl: PdlPolicy | None = None,
) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hk) D] → q [T, Hq, D] rotated; k rotated and v into caches [blocks, bs, Hk, D].

    With row_stats ([T, P] Σx² partials of the GEMM input, K = k, or the rows of x: see
    reference.stats_are_rows) each row is first scaled by rsqrt(Σ/k + geom.eps); `bias`
    ([(Hq + 2 Hk) D]) is added after the scale.
    """
    positions, cos_sin, slot_mapping = rotary.positions, rotary.cos_sin, kv.slot_mapping
    k_cache, v_cache, eps = kv.k_cache, kv.v_cache, geom.eps
    num_heads, num_kv_heads, head_dim = geom.num_heads, geom.num_kv_heads, geom.head_dim
    t = qkv.shape[0]
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and head_dim % 2 == 0
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert k_cache.shape[2] == num_kv_heads and k_cache.shape[3] == head_dim
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty((t, num_heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    if t == 0:
        return q
    cos_sin = cos_sin.float()
    if cos_sin.stride(1) != 1:
        cos_sin = cos_sin.contiguous()
    stats, p, stride_s, from_rows, block_p = stats_operand(row_stats, k)
    half = cos_sin.shape[-1] // 2  # the table's width is the rotary dims (GPT-NeoX: part of the head)
    assert 0 < 2 * half <= head_dim
    block_half = next_pow2(half)
    block_hq = next_pow2(num_heads)
    warps = 1 if INTERPRET else max(1, min(8, block_hq * block_half // 512))
    _rope_kv_kernel[(t,)](
        qkv,
        q,
        k_cache,
        v_cache,
        slot_mapping,
        positions,
        cos_sin,
        stats if stats is not None else cos_sin,
        bias if bias is not None else qkv,
        num_heads,
        num_kv_heads,
        p,
        qkv.stride(0),
        q.stride(0),
        k_cache.stride(1),
        cos_sin.stride(0),
        stride_s,
        1.0 / k,
        eps,
        D=head_dim,
        HALF=half,
        HAS_SCALE=stats is not None,
        FROM_ROWS=from_rows,
        HAS_BIAS=bias is not None,
        BLOCK_HQ=block_hq,
        BLOCK_HK=next_pow2(num_kv_heads),
        BLOCK_HALF=block_half,
        BLOCK_PASS=next_pow2(max(head_dim - 2 * half, 1)),
        BLOCK_D=next_pow2(head_dim),
        BLOCK_P=block_p,
        **pdl_args(pdl, t, qkv.device),
        num_warps=warps,
    )
    return q
