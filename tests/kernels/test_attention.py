"""kernels/attention.py: a mixed step's leading decodes take the decode kernel, the rest the prefill kernel."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.attention import paged_attention, prefill_attention
from tests.kernels.common import DEVICE, DTYPES, caches, check, poison_outputs, rand, random_batch  # noqa: F401

BS = 16


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (3, 1, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_step_decodes_take_the_decode_kernel(dtype, hq, hk, d):
    """A serving step: three decodes lead, then prompt chunks (one of them a single token)."""
    query_lens = [1, 1, 1, 7, 1, 20]
    context_lens = [30, 1, 64, 7, 15, 50]
    batch = random_batch(query_lens, context_lens, 30)
    assert batch.num_decodes == 3
    k_cache, v_cache = caches(30, hk, d, dtype)
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
