"""Device functions both paged-attention kernels share: gather K/V tiles through the block table,
prefetch them into L2 before a PDL wait, and attend over a token range with an online softmax."""

from __future__ import annotations

import triton
import triton.language as tl

from fusionserve.kernels.pdl import prefetch_l2
from fusionserve.kernels.triton_helpers import cast, mma

LOG2E = 1.4426950408889634


# A paged KV view is the tuple (k_ptr, v_ptr, bt_row, head_off, stride_blk, stride_tok): one kv head of
# one sequence in the caches [num_blocks, PAGE, Hk, D], through that sequence's row of the block table.


@triton.jit
def load_kv(kv, toks, valid, d, d_mask, PAGE: tl.constexpr):
    """Gather BLOCK_N cached tokens (rows of D) of one kv head through the block table."""
    k_ptr, v_ptr, bt_row, head_off, stride_blk, stride_tok = kv
    blk = tl.load(bt_row + toks // PAGE, mask=valid, other=0).to(tl.int64)
    off = blk * stride_blk + (toks % PAGE).to(tl.int64) * stride_tok + head_off
    mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def prefetch_kv(
    kv,
    start,
    end,
    PAGE: tl.constexpr,
    PF_TOKENS: tl.constexpr,
    D_LINES: tl.constexpr,
    LINE: tl.constexpr,
    PDL: tl.constexpr,
):
    """L2 prefetch of the cached K/V rows of tokens [start, start + PF_TOKENS) ∩ [start, end).

    Block tables and context lengths are step inputs and past K/V was written by earlier steps, so this
    runs before the PDL wait, under the tail of the kernel that writes q."""
    k_ptr, v_ptr, bt_row, head_off, stride_blk, stride_tok = kv
    toks = start + tl.arange(0, PF_TOKENS)
    valid = toks < end
    blk = tl.load(bt_row + toks // PAGE, mask=valid, other=0).to(tl.int64)
    off = tl.where(valid, blk * stride_blk + (toks % PAGE).to(tl.int64) * stride_tok, 0) + head_off
    lines = off[:, None] + (tl.arange(0, D_LINES) * LINE)[None, :]
    prefetch_l2(k_ptr + lines, PDL)
    prefetch_l2(v_ptr + lines, PDL)


@triton.jit
def attend_range(
    state,
    query,
    kv,
    lo,
    hi,
    ctx,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Online softmax over keys [lo, hi) of one sequence (ctx keys in all) of the queries
    `query` = (q [rows, D], their positions qpos, d, d_mask, qk_scale), continuing `state` =
    (acc, l_i, m_i); unnormalised: the caller divides by l_i once at the end. MASKED applies the
    causal mask."""
    acc, l_i, m_i = state
    q, qpos, d, d_mask, qk_scale = query
    for n0 in range(lo, hi, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        valid = toks < ctx
        k, v = load_kv(kv, toks, valid, d, d_mask, PAGE)
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


@triton.jit
def empty_state(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(acc, l_i, m_i) before any key: nothing summed, running max -inf."""
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    return acc, tl.zeros([ROWS], dtype=tl.float32), tl.full([ROWS], float("-inf"), dtype=tl.float32)
