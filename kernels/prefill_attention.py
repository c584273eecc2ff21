"""Paged varlen causal prefill attention: query j of a sequence with n new tokens and context length
L sits at position L - n + j and sees keys 0 .. L - n + j (reference.paged_attention). K/V come from
the paged cache through the block tables; an online softmax divides once at the end."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.attention_tiles import LOG2E, attend_range, empty_state
from fusionserve.kernels.batch import PagedBatch
from fusionserve.kernels.triton_env import INTERPRET, next_pow2
from fusionserve.kernels.triton_helpers import cast


@triton.jit(do_not_specialize=["first_seq"])  # one compiled kernel whatever the mixed step's decode count
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    qs_ptr,
    ctx_ptr,
    o_ptr,
    n_m_blocks,
    first_seq,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_blk,
    stride_tok,
    stride_kh,
    qk_scale,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    h = tl.program_id(0)
    mb = n_m_blocks - 1 - tl.program_id(1)  # the longest (most causal work) blocks first
    b = tl.program_id(2) + first_seq
    q_start = tl.load(qs_ptr + b)
    n = tl.load(qs_ptr + b + 1) - q_start
    if mb * BLOCK_M < n:
        ctx = tl.load(ctx_ptr + b)
        prefix = ctx - n
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        r_mask = rows < n
        d = tl.arange(0, BLOCK_D)
        d_mask = d < D
        tok_rows = (q_start + rows).to(tl.int64)
        q = tl.load(
            q_ptr + tok_rows[:, None] * stride_qt + h * stride_qh + d[None, :],
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        query = (q, prefix + rows, d, d_mask, qk_scale)
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        kv = (k_ptr, v_ptr, bt_row, (h // GROUP).to(tl.int64) * stride_kh, stride_blk, stride_tok)
        first = prefix + mb * BLOCK_M  # keys below this are visible to every row of the block
        full_end = (first // BLOCK_N) * BLOCK_N
        hi = tl.minimum(ctx, prefix + (mb + 1) * BLOCK_M)
        state = empty_state(BLOCK_M, BLOCK_D)
        state = attend_range(state, query, kv, 0, full_end, ctx, False, BLOCK_N, PAGE, UPCAST, IEEE)
        acc, l_i, m_i = attend_range(state, query, kv, full_end, hi, ctx, True, BLOCK_N, PAGE, UPCAST, IEEE)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            o_ptr + tok_rows[:, None] * stride_ot + h * stride_oh + d[None, :],
            cast(o, o_ptr.dtype.element_ty),
            mask=r_mask[:, None] & d_mask[None, :],
        )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    first_seq: int = 0,
) -> torch.Tensor:
    """Causal attention of packed new queries q [T, Hq, D] over each sequence's paged context.

    Sequences before `first_seq` are skipped (their rows of `out` are left as they are)."""
    t, hq, d = q.shape
    hk, page = k_cache.shape[2], k_cache.shape[1]
    assert hq % hk == 0 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    o = out if out is not None else torch.empty_like(q)
    if t == 0 or batch.num_seqs <= first_seq:
        return o
    block_d = next_pow2(d)
    if config is None:
        if INTERPRET:
            config = (16, 16, 1, 1)
        elif block_d <= 64:
            config = (128, 64, 4, 3)
        else:
            config = (128, 64, 8, 3)
    bm, bn, warps, stages = config
    n_m = triton.cdiv(max(batch.max_query_len, 1), bm)
    _prefill_kernel[(hq, n_m, batch.num_seqs - first_seq)](
        q,
        k_cache,
        v_cache,
        batch.block_tables,
        batch.query_start,
        batch.context_lens,
        o,
        n_m,
        first_seq,
        q.stride(0),
        q.stride(1),
        o.stride(0),
        o.stride(1),
        batch.block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        scale * LOG2E,
        GROUP=hq // hk,
        D=d,
        BLOCK_D=block_d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        PAGE=page,
        UPCAST=INTERPRET,
        IEEE=q.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages,
    )
    return o
