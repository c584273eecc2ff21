"""Paged attention (decode with/without split-K, varlen prefill with cached prefix) vs the reference."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.attention import decode_attention, paged_attention, prefill_attention
from fusionserve.kernels.batch import PagedBatch, leading_ones
from fusionserve.kernels.triton_env import arrival_counters
from tests.test_kernels_common import DEVICE, DTYPES, check, poison_outputs, rand  # noqa: F401

BS = 16


def random_batch(query_lens, context_lens, num_blocks, spare=0):
    """Sequences scattered over randomly permuted physical blocks (room for `spare` more tokens each)."""
    widths = [-(-(c + spare) // BS) for c in context_lens]
    perm = torch.randperm(num_blocks).tolist()
    assert sum(widths) <= num_blocks
    tables = torch.full((len(context_lens), max(widths) + 1), -1, dtype=torch.int32)
    slots, used = [], 0
    for i, (q, c) in enumerate(zip(query_lens, context_lens)):
        blocks = perm[used : used + widths[i]]
        used += widths[i]
        tables[i, : widths[i]] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[p // BS] * BS + p % BS for p in range(c - q, c)]
    qs = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qs[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    return PagedBatch(
        query_start=qs,
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        block_size=BS,
        num_decodes=leading_ones(query_lens),
    )


def _caches(num_blocks, hk, d, dtype):
    return rand(num_blocks, BS, hk, d, dtype=dtype), rand(num_blocks, BS, hk, d, dtype=dtype)


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (3, 1, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention(dtype, hq, hk, d, splits):
    ctx = [int(c) for c in torch.randint(1, 70, (3,))] + [1]
    batch = random_batch([1] * len(ctx), ctx, 40)
    k_cache, v_cache = _caches(40, hk, d, dtype)
    q = rand(len(ctx), hq, d, dtype=dtype)
    scale = d**-0.5
    want = ref.paged_attention(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), batch, scale)
    b = batch.to(DEVICE)
    out = decode_attention(
        q, k_cache, v_cache, b.block_tables, b.context_lens, b.max_context_len, scale, num_splits=splits
    )
    check(out, want, dtype)
    check(paged_attention(q, k_cache, v_cache, b, scale), want, dtype)


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (3, 1, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_with_cached_prefix(dtype, hq, hk, d):
    query_lens = [5, 1, 33, 17]
    context_lens = [5, 20, 40, 50]  # fresh prompt, a decode, chunked prefills after cached prefixes
    batch = random_batch(query_lens, context_lens, 20)
    k_cache, v_cache = _caches(20, hk, d, dtype)
    q = rand(sum(query_lens), hq, d, dtype=dtype)
    scale = d**-0.5
    want = ref.paged_attention(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), batch, scale)
    out = prefill_attention(q, k_cache, v_cache, batch.to(DEVICE), scale)
    check(out, want, dtype)
    check(paged_attention(q, k_cache, v_cache, batch.to(DEVICE), scale), want, dtype)


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (3, 1, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_step_decodes_take_the_decode_kernel(dtype, hq, hk, d):
    """A serving step: three decodes lead, then prompt chunks (one of them a single token)."""
    query_lens = [1, 1, 1, 7, 1, 20]
    context_lens = [30, 1, 64, 7, 15, 50]
    batch = random_batch(query_lens, context_lens, 30)
    assert batch.num_decodes == 3
    k_cache, v_cache = _caches(30, hk, d, dtype)
    q = rand(sum(query_lens), hq, d, dtype=dtype)
    scale = d**-0.5
    want = ref.paged_attention(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), batch, scale)
    b = batch.to(DEVICE)
    check(paged_attention(q, k_cache, v_cache, b, scale), want, dtype)
    check(prefill_attention(q, k_cache, v_cache, b, scale), want, dtype)  # the one-kernel path agrees
    # The prefill kernel leaves the skipped sequences' rows alone.
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, b, scale, out=out, first_seq=3)
    assert torch.isnan(out[:3]).all() and not torch.isnan(out[3:]).any()


SPLIT_VARIANTS = {
    "fused": dict(fused_merge=True),
    "two_kernel": dict(fused_merge=False),
    "fused_min_split": dict(fused_merge=True, min_split_tokens=40),
    "fused_single_short": dict(fused_merge=True, single_split_ctx=48),
}


@pytest.mark.parametrize(
    "dtype,variant", [(torch.float32, v) for v in SPLIT_VARIANTS] + [(torch.bfloat16, "fused")]
)
def test_decode_attention_split_merge(dtype, variant):
    """Split decode as a CUDA graph runs it: planned for a longer max context than any sequence's,
    ragged lengths (1 token, one block, several splits with a partial last one), scattered blocks,
    NaN-poisoned output, three calls in a row (the arrival counters must be back at zero after each,
    and the merge order is fixed, so the same input gives the same bits)."""

    hq, hk, d = 6, 2, 32
    ctx = [1, 17, 48, 49, 130, 7]
    batch = random_batch([1] * len(ctx), ctx, 64)
    k_cache, v_cache = _caches(64, hk, d, dtype)
    b = batch.to(DEVICE)
    scale = d**-0.5
    qs = [rand(len(ctx), hq, d, dtype=dtype) for _ in range(2)]
    outs = []
    for q in (qs[0], qs[1], qs[0]):
        out = torch.full_like(q, float("nan"))
        decode_attention(
            q, k_cache, v_cache, b.block_tables, b.context_lens, 192, scale, num_splits=6, block_n=16, out=out,
            **SPLIT_VARIANTS[variant],
        )  # fmt: skip
        want = ref.paged_attention(
            q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), batch, scale
        )
        check(out, want, dtype)
        outs.append(out)
        if SPLIT_VARIANTS[variant]["fused_merge"]:
            assert int(arrival_counters(out.device, 1, "decode_attention").abs().sum()) == 0
    assert torch.equal(outs[0], outs[2])
