"""kernels/prefill_attention.py against reference.paged_attention: ragged prompts after a cached prefix."""

from __future__ import annotations

import pytest

from fusionserve.kernels import reference as ref
from fusionserve.kernels.attention import paged_attention, prefill_attention
from tests.kernels.common import DEVICE, DTYPES, caches, check, poison_outputs, rand, random_batch  # noqa: F401

BS = 16


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (3, 1, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_with_cached_prefix(dtype, hq, hk, d):
    query_lens = [5, 1, 33, 17]
    context_lens = [5, 20, 40, 50]  # fresh prompt, a decode, chunked prefills after cached prefixes
    batch = random_batch(query_lens, context_lens, 20)
    k_cache, v_cache = caches(20, hk, d, dtype)
    q = rand(sum(query_lens), hq, d, dtype=dtype)
    scale = d**-0.5
    want = ref.paged_attention(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), batch, scale)
    out = prefill_attention(q, k_cache, v_cache, batch.to(DEVICE), scale)
    check(out, want, dtype)
    check(paged_attention(q, k_cache, v_cache, batch.to(DEVICE), scale), want, dtype)
