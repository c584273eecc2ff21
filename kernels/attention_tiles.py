"""Device functions both paged-attention kernels share: gather K/V tiles through the block table,
prefetch them into L2 before a PDL wait, and attend over a token range with an online softmax."""

from __future__ import annotations

import triton
import triton.language as tl

from fusionserve.kernels.pdl import prefetch_l2
from fusionserve.kernels.triton_helpers import cast, mma

LOG2E = 1.4426950408889634


@triton.jit
def load_kv(
    k_ptr, v_ptr, bt_row, toks, valid, head_off, d, d_mask, stride_blk, stride_tok, PAGE: tl.constexpr
):
    """Gather BLOCK_N cached tokens (rows of D) of one kv head through the block table."""
    blk = tl.load(bt_row + toks // PAGE, mask=valid, other=0).to(tl.int64)
    off = blk * stride_blk + (toks % PAGE).to(tl.int64) * stride_tok + head_off
    mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def prefetch_kv(
    k_ptr,
    v_ptr,
    bt_row,
    start,
    end,
    head_off,
    stride_blk,
    stride_tok,
    PAGE: tl.constexpr,
    PF_TOKENS: tl.constexpr,
    D_LINES: tl.constexpr,
    LINE: tl.constexpr,
    PDL: tl.constexpr,
):
    """L2 prefetch of the cached K/V rows of tokens [start, start + PF_TOKENS) ∩ [start, end).

    Block tables and context lengths are step inputs and past K/V was written by earlier steps, so this
    runs before the PDL wait, under the tail of the kernel that writes q."""
    toks = start + tl.arange(0, PF_TOKENS)
    valid = toks < end
    blk = tl.load(bt_row + toks // PAGE, mask=valid, other=0).to(tl.int64)
    off = tl.where(valid, blk * stride_blk + (toks % PAGE).to(tl.int64) * stride_tok, 0) + head_off
    lines = off[:, None] + (tl.arange(0, D_LINES) * LINE)[None, :]
    prefetch_l2(k_ptr + lines, PDL)
    prefetch_l2(v_ptr + lines, PDL)


@triton.jit
def attend_range(
    acc,
    l_i,
    m_i,
    q,
    qpos,
    k_ptr,
    v_ptr,
    bt_row,
    head_off,
    d,
    d_mask,
    stride_blk,
    stride_tok,
    qk_scale,
    lo,
    hi,
    ctx,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Online softmax of queries q (positions qpos) over keys [lo, hi) of one sequence (ctx keys in all);
    unnormalised: the caller divides by l_i once at the end. MASKED applies the causal mask."""
    for n0 in range(lo, hi, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        valid = toks < ctx
        k, v = load_kv(k_ptr, v_ptr, bt_row, toks, valid, head_off, d, d_mask, stride_blk, stride_tok, PAGE)
        s = mma(tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), q, tl.trans(k), UPCAST, IEEE) * qk_scale
        if MASKED:
            s = tl.where((toks[None, :] <= qpos[:, None]) & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(acc * alpha[:, None], cast(p, v.dtype), v, UPCAST, IEEE)
        m_i = m_new
    return acc, l_i, m_i
