"""The split-K merge of decode attention: each split program of a (sequence, kv head) leaves a
partial (running max, denominator, weighted sum) per query head; the merge rescales them to one
max and divides once. Fused: the last split program to arrive merges in the same launch
(`merge_splits`, called from the decode kernel); otherwise a second, tiny launch does
(`merge_splits_launch`). kernels/decode_attention.py's DecodeSplitPolicy picks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.pdl import pdl_args, pdl_wait
from fusionserve.kernels.triton_env import INTERPRET, next_pow2
from fusionserve.kernels.triton_helpers import cast


@triton.jit
def merge_splits(
    po_ptr,
    pml_ptr,
    out,
    where,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_GG: tl.constexpr,
    MERGE_S: tl.constexpr,
    WANT_AMAX: tl.constexpr,
):
    """Merge the partials of splits 0 .. n_active-1 of (b, kvh), in split order, and write o
    (`out` = (o_ptr, stride_ot, stride_oh, amax_ptr): with WANT_AMAX also each head's max|o|).

    The partials were written by other programs of this launch: .cg loads read them from L2."""
    o_ptr, stride_ot, stride_oh, amax_ptr = out
    b, kvh, HQ, n_splits, n_active = where  # this program's (sequence, kv head), and the splits
    gg = tl.arange(0, BLOCK_GG)
    g_mask = gg < GROUP
    heads = kvh * GROUP + gg
    base = (b * HQ + heads) * n_splits
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    m = tl.full([BLOCK_GG], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BLOCK_GG], dtype=tl.float32)
    acc = tl.zeros([BLOCK_GG, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_active, MERGE_S):
        s = s0 + tl.arange(0, MERGE_S)
        rows = base[:, None] + s[None, :]
        msk = g_mask[:, None] & (s < n_active)[None, :]
        ms = tl.load(pml_ptr + rows * 2, mask=msk, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(pml_ptr + rows * 2 + 1, mask=msk, other=0.0, cache_modifier=".cg")
        ps = tl.load(
            po_ptr + rows[:, :, None] * BLOCK_D + d[None, None, :],
            mask=msk[:, :, None] & d_mask[None, None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        m_new = tl.maximum(m, tl.max(ms, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_ref)
        w = tl.math.exp2(ms - m_ref[:, None])
        den = den * alpha + tl.sum(w * ls, 1)
        acc = acc * alpha[:, None] + tl.sum(ps * w[:, :, None], 1)
        m = m_new
    o = cast(acc / tl.where(den > 0, den, 1.0)[:, None], o_ptr.dtype.element_ty)
    o_mask = g_mask[:, None] & d_mask[None, :]
    tl.store(o_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :], o, mask=o_mask)
    if WANT_AMAX:
        oa = tl.where(o_mask, tl.abs(o.to(tl.float32)), 0.0)
        tl.store(amax_ptr + b * HQ + heads, tl.max(oa, 1), mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    po_ptr,
    pml_ptr,
    o_ptr,
    amax_ptr,
    HQ,
    n_splits,
    stride_ot,
    stride_oh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
    WANT_AMAX: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pdl_wait(PDL, EARLY)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < n_splits
    row = (b * HQ + h) * n_splits + s
    m = tl.load(pml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    li = tl.load(pml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max)
    denom = tl.sum(w * li, 0)
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(
        po_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None] & (d[None, :] < D), other=0.0
    )
    o = cast(tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0), o_ptr.dtype.element_ty)
    tl.store(o_ptr + b * stride_ot + h * stride_oh + d, o, mask=d < D)
    if WANT_AMAX:
        tl.store(amax_ptr + b * HQ + h, tl.max(tl.where(d < D, tl.abs(o.to(tl.float32)), 0.0), 0))


def merge_splits_launch(
    po: torch.Tensor,
    pml: torch.Tensor,
    o: torch.Tensor,
    num_splits: int,
    pdl,
    amax_out: torch.Tensor | None = None,
) -> None:
    """The second launch: o [B, Hq, D] from the partials `po` [B*Hq*splits, BLOCK_D] and `pml` (max,
    denominator); with `amax_out` [B, Hq] each head's max|o| too."""
    bsz, hq, d = o.shape
    _decode_reduce_kernel[(bsz, hq)](
        po,
        pml,
        o,
        amax_out if amax_out is not None else pml,
        hq,
        num_splits,
        o.stride(0),
        o.stride(1),
        D=d,
        BLOCK_D=next_pow2(d),
        BLOCK_S=max(2, next_pow2(num_splits)),
        **pdl_args(pdl, bsz * hq, o.device),
        num_warps=1 if INTERPRET else 4,
        WANT_AMAX=amax_out is not None,
    )
