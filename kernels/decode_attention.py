"""Paged decode attention: one new query per sequence (GQA), its context split over several programs
when there are too few (sequence, kv head) pairs to fill the GPU.

The last split program of each (sequence, kv head) to finish (an int32 arrival counter, acq_rel
atomic) can merge the partials in split order and reset its counter (one launch); otherwise a tiny
second kernel merges. `DecodeSplitPolicy` says which, and how far to split (measured:
bench/results/decode_small_*). Semantics: reference.paged_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusionserve.kernels.attention_tiles import LOG2E, attend_range, empty_state, prefetch_kv
from fusionserve.kernels.decode_merge import merge_splits, merge_splits_launch
from fusionserve.kernels.pdl import PdlPolicy, pdl_args, pdl_wait
from fusionserve.kernels.triton_env import INTERPRET, arrival_counters, next_pow2, sm_count
from fusionserve.kernels.triton_helpers import cast


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    ctx_ptr,
    o_ptr,
    po_ptr,
    pml_ptr,
    cnt_ptr,
    amax_ptr,
    HQ,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_blk,
    stride_tok,
    stride_kh,
    qk_scale,
    split_len,
    min_split,
    single_ctx,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    SPLIT: tl.constexpr,
    FUSED: tl.constexpr,
    BLOCK_GG: tl.constexpr,
    MERGE_S: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
    PF_TOKENS: tl.constexpr,
    D_LINES: tl.constexpr,
    LINE: tl.constexpr,
    WANT_AMAX: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    n_splits = tl.num_programs(2)
    ctx = tl.load(ctx_ptr + b)
    # Splits partition this sequence's own context (not the batch maximum), so a CUDA graph captured
    # for the longest context still spreads a short context over every split.
    seq_split = tl.minimum(tl.cdiv(tl.cdiv(ctx, BLOCK_N), n_splits) * BLOCK_N, split_len)
    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    out_mask = g_mask[:, None] & (d < D)[None, :]
    o_offs = b * stride_ot + heads[:, None] * stride_oh + d[None, :]
    if SPLIT and FUSED:
        # Splits of at least min_split tokens, and one split for contexts up to single_ctx: only the
        # first n_active programs of (b, kvh) work. Each stores its partial and takes a ticket; the
        # last to arrive merges all of them in split order (deterministic) and resets the counter.
        seq_split = tl.maximum(seq_split, min_split)
        if ctx <= single_ctx:
            seq_split = tl.maximum(seq_split, ctx)
        n_active = tl.maximum(tl.cdiv(ctx, seq_split), 1)
    start = sp * seq_split
    end = tl.minimum(ctx, start + seq_split)
    kv = (
        k_ptr,
        v_ptr,
        bt_ptr + b.to(tl.int64) * stride_bt,
        kvh.to(tl.int64) * stride_kh,
        stride_blk,
        stride_tok,
    )
    if PDL and EARLY:
        prefetch_kv(kv, start, end, PAGE, PF_TOKENS, D_LINES, LINE, PDL)
    pdl_wait(PDL, EARLY)
    active = True
    if SPLIT and FUSED:
        active = sp < n_active
    if active:
        # Every key before `end` is visible to the one new query: the causal mask with qpos = end - 1.
        d_mask = d < D
        q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=out_mask, other=0.0)
        query = (q, tl.zeros([BLOCK_G], dtype=tl.int32) + (end - 1), d, d_mask, qk_scale)
        state = empty_state(BLOCK_G, BLOCK_D)
        acc, l_i, m_i = attend_range(state, query, kv, start, end, end, True, BLOCK_N, PAGE, UPCAST, IEEE)
        whole = not SPLIT  # this program saw the whole context: it writes o itself
        if SPLIT and FUSED:
            whole = n_active == 1
        if whole:
            o = cast(acc / tl.where(l_i > 0, l_i, 1.0)[:, None], o_ptr.dtype.element_ty)
            tl.store(o_ptr + o_offs, o, mask=out_mask)
            if WANT_AMAX:  # an FP8 o_proj's per-token scale: max|o| per head, of the rounded o
                oa = tl.where(out_mask, tl.abs(o.to(tl.float32)), 0.0)
                tl.store(amax_ptr + b * HQ + heads, tl.max(oa, 1), mask=g_mask)
        else:
            row = (b * HQ + heads) * n_splits + sp
            tl.store(po_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=out_mask)
            tl.store(pml_ptr + row * 2, m_i, mask=g_mask)
            tl.store(pml_ptr + row * 2 + 1, l_i, mask=g_mask)
            if FUSED:
                tl.debug_barrier()  # every thread's partial stores precede the release below
                cnt = cnt_ptr + b * tl.num_programs(1) + kvh
                ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
                if ticket == n_active - 1:
                    out = (o_ptr, stride_ot, stride_oh, amax_ptr)
                    where = (b, kvh, HQ, n_splits, n_active)
                    merge_splits(po_ptr, pml_ptr, out, where, GROUP, D, BLOCK_D, BLOCK_GG, MERGE_S, WANT_AMAX)
                    tl.store(cnt, 0)  # every split has arrived: ready for the next launch / replay


@dataclass(frozen=True)
class DecodeSplitPolicy:
    """How decode attention spreads one sequence's context over programs.

    `plan` "fill": 64 tokens per step (128 for head_dim <= 64, whose tiles are small), and as many
    splits as keep about 4 programs per SM in one wave; "wave2": 64 tokens, about 2 per SM.
    `fused_merge`: True = the last split program of each (sequence, kv head) merges (one launch);
    False = a second launch merges; None = fused when there are at most `fused_merge_max_programs`
    (sequence, kv head) pairs. Measured (bench/results/decode_small_*): fused wins where many splits
    each hold about one chunk (135M batch 1: 5.5 vs 6.2 µs; 8B batch 1: 5.7 vs 8.2 µs) and loses where
    each split loops over many chunks (8B batch 8-32 at ctx 4096: up to 35% slower). Splitting less
    (`min_split_tokens` 256, `single_split_ctx` 1024, `max_splits` 1) lost everywhere it was tried at
    ctx 512; those two are read on the device against each sequence's own length, so a graph captured
    for the longest context honours them (fused merge only).
    """

    plan: str = "fill"
    fused_merge: bool | None = None
    fused_merge_max_programs: int = 16
    min_split_tokens: int = 0
    single_split_ctx: int = 0
    max_splits: int = 128

    def fused(self, pairs: int) -> bool:
        return self.fused_merge if self.fused_merge is not None else pairs <= self.fused_merge_max_programs


DEFAULT_SPLIT = DecodeSplitPolicy()

# Arrival counters of the fused merge, one int32 per (sequence, kv head), zero between launches (the
# last arriver resets its own). One buffer per device, shared by every layer and CUDA graph (launches
# on one stream are ordered). A buffer that is outgrown stays alive: captured graphs still use it.


def decode_plan(
    bsz: int,
    hk: int,
    max_context_len: int,
    d: int,
    device: torch.device,
    policy: DecodeSplitPolicy = DEFAULT_SPLIT,
) -> tuple[int, int]:
    """(num_splits, BLOCK_N) for decode attention under `policy` (see DecodeSplitPolicy.plan)."""
    sms = sm_count(device)
    if INTERPRET:
        block_n, per_sm = 16, 1
    elif policy.plan == "fill":
        block_n, per_sm = (128 if d <= 64 else 64), 4
    else:
        block_n, per_sm = 64, 2
    n_chunks = max(1, triton.cdiv(max_context_len, block_n))
    if policy.plan == "fill":
        splits = max(1, (per_sm * sms) // max(1, bsz * hk))
    else:
        splits = max(1, triton.cdiv(per_sm * sms, max(1, bsz * hk)))
    return min(n_chunks, splits, policy.max_splits), block_n


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
    *,
    policy: DecodeSplitPolicy = DEFAULT_SPLIT,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
    pdl: PdlPolicy | None = None,
    amax_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new query per sequence: q [B, Hq, D] over its cached context → o [B, Hq, D].

    The context is split over programs per (sequence, kv head) as `policy` says (`num_splits` and
    `block_n` override its plan: tests, sweeps). `amax_out` [B, Hq] fp32: each head's max|o| (of o
    as stored), written where o is: the per-token scale partials of an FP8 o_proj (kernels/fp8.py).
    """
    bsz, hq, d = q.shape
    hk = k_cache.shape[2]
    assert hq % hk == 0 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    o = out if out is not None else torch.empty_like(q)
    if bsz == 0:
        return o
    plan_splits, plan_bn = decode_plan(bsz, hk, max_context_len, d, q.device, policy)
    block_n = block_n or plan_bn
    n_chunks = max(1, triton.cdiv(max_context_len, block_n))
    split_len = triton.cdiv(n_chunks, max(1, num_splits or plan_splits)) * block_n
    num_splits = max(1, triton.cdiv(max(max_context_len, 1), split_len))
    fused = num_splits > 1 and policy.fused(bsz * hk)
    plan = (num_splits, split_len, block_n, fused)
    _launch_decode(q, k_cache, v_cache, block_tables, context_lens, o, scale, plan, policy, pdl, amax_out)
    return o


def _launch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    o: torch.Tensor,
    scale: float,
    plan: tuple[int, int, int, bool],
    policy: DecodeSplitPolicy,
    pdl: PdlPolicy | None,
    amax_out: torch.Tensor | None = None,
) -> None:
    """The split kernel (and, split but not fused, the merge kernel) for decode_attention's `plan`:
    (num_splits, split_len, block_n, fused)."""
    num_splits, split_len, block_n, fused = plan
    bsz, hq, d = q.shape
    hk, page = k_cache.shape[2], k_cache.shape[1]
    group, block_d, split = hq // hk, next_pow2(d), num_splits > 1
    block_gg = max(2, next_pow2(group))
    if split:
        po = torch.empty((bsz * hq * num_splits, block_d), device=q.device, dtype=torch.float32)
        pml = torch.empty((bsz * hq * num_splits, 2), device=q.device, dtype=torch.float32)
    else:
        po = pml = o
    cnt = arrival_counters(q.device, bsz * hk, "decode_attention") if fused else pml
    _decode_kernel[(bsz, hk, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        o,
        po,
        pml,
        cnt,
        amax_out if amax_out is not None else pml,
        hq,
        q.stride(0),
        q.stride(1),
        o.stride(0),
        o.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        scale * LOG2E,
        split_len,
        triton.cdiv(max(policy.min_split_tokens, 1), block_n) * block_n,
        policy.single_split_ctx,
        GROUP=group,
        D=d,
        BLOCK_G=max(16, next_pow2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        PAGE=page,
        SPLIT=split,
        FUSED=fused,
        BLOCK_GG=block_gg,
        MERGE_S=2 if INTERPRET else max(1, min(32, 8192 // (block_gg * block_d))),
        UPCAST=INTERPRET,
        IEEE=q.dtype == torch.float32,
        **pdl_args(pdl, bsz * hk * num_splits, q.device),
        PF_TOKENS=min(block_n, pdl.attention_prefetch_tokens) if pdl is not None else 16,
        D_LINES=max(1, next_pow2(d * k_cache.element_size()) // 128),
        LINE=128 // k_cache.element_size(),
        num_warps=1 if INTERPRET else 4,
        num_stages=1 if INTERPRET else 3,
        WANT_AMAX=amax_out is not None,
    )
    if split and not fused:
        merge_splits_launch(po, pml, o, num_splits, pdl, amax_out)
