"""kernels/decode_attention.py against reference.paged_attention: GQA, split-K with a fused or a second-launch merge, split policies."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.attention import paged_attention
from fusionserve.kernels.decode_attention import DecodeSplitPolicy, decode_attention
from fusionserve.kernels.triton_env import arrival_counters
from tests.kernels.common import DEVICE, DTYPES, caches, check, poison_outputs, rand, random_batch  # noqa: F401

BS = 16


SPLIT_VARIANTS = {
    "fused": DecodeSplitPolicy(fused_merge=True),
    "two_kernel": DecodeSplitPolicy(fused_merge=False),
    "fused_min_split": DecodeSplitPolicy(fused_merge=True, min_split_tokens=40),
    "fused_single_short": DecodeSplitPolicy(fused_merge=True, single_split_ctx=48),
}


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (3, 1, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention(dtype, hq, hk, d, splits):
    ctx = [int(c) for c in torch.randint(1, 70, (3,))] + [1]
    batch = random_batch([1] * len(ctx), ctx, 40)
    k_cache, v_cache = caches(40, hk, d, dtype)
    q = rand(len(ctx), hq, d, dtype=dtype)
    scale = d**-0.5
    want = ref.paged_attention(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), batch, scale)
    b = batch.to(DEVICE)
    out = decode_attention(
        q, k_cache, v_cache, b.block_tables, b.context_lens, b.max_context_len, scale, num_splits=splits
    )
    check(out, want, dtype)
    check(paged_attention(q, k_cache, v_cache, b, scale), want, dtype)


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
    k_cache, v_cache = caches(64, hk, d, dtype)
    b = batch.to(DEVICE)
    scale = d**-0.5
    qs = [rand(len(ctx), hq, d, dtype=dtype) for _ in range(2)]
    outs = []
    for q in (qs[0], qs[1], qs[0]):
        out = torch.full_like(q, float("nan"))
        decode_attention(
            q,
            k_cache,
            v_cache,
            b.block_tables,
            b.context_lens,
            192,
            scale,
            num_splits=6,
            block_n=16,
            out=out,
            policy=SPLIT_VARIANTS[variant],
        )
        want = ref.paged_attention(
            q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), batch, scale
        )
        check(out, want, dtype)
        outs.append(out)
        if SPLIT_VARIANTS[variant].fused_merge:
            assert int(arrival_counters(out.device, 1, "decode_attention").abs().sum()) == 0
    assert torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("variant", ["unsplit", "fused", "two_kernel", "fused_single_short"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_writes_max_abs_o_per_head(dtype, variant):
    """For an FP8 o_proj the decode kernel writes each head's max|o| (of o as stored) where it writes
    o: unsplit, in the fused merge and in the second-launch merge; exactly o's own per-head max."""
    hq, hk, d = 6, 2, 32
    ctx = [1, 17, 49, 130]
    batch = random_batch([1] * len(ctx), ctx, 64)
    k_cache, v_cache = caches(64, hk, d, dtype)
    b = batch.to(DEVICE)
    q = rand(len(ctx), hq, d, dtype=dtype)
    amax = torch.full((len(ctx), hq), float("nan"), device=DEVICE)
    policy = SPLIT_VARIANTS.get(variant, DecodeSplitPolicy())
    o = decode_attention(
        q, k_cache, v_cache, b.block_tables, b.context_lens, 192, d**-0.5,
        num_splits=1 if variant == "unsplit" else 4, block_n=16, policy=policy, amax_out=amax,
    )  # fmt: skip
    assert torch.equal(amax, o.float().abs().amax(-1))
    amax2 = torch.full_like(amax, float("nan"))
    o2 = paged_attention(q, k_cache, v_cache, b, d**-0.5, amax_out=amax2)
    assert torch.equal(amax2, o2.float().abs().amax(-1))
