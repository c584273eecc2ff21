"""kernels/embedding.py: the gather emits layer 0's Σh² partials."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import embedding as emb
from fusionserve.kernels import reference as ref
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, check, poison_outputs, rand  # noqa: F401

K = 45
EPS = 1e-5


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_emits_layer0_stats(dtype, m):
    table = rand(50, K, dtype=dtype)
    ids = torch.randint(0, 50, (m,), device=DEVICE)
    out, stats = emb.embedding(ids, table, want_stats=True)
    want, want_stats = ref.embedding(ids, table.double(), want_stats=True)
    check(out, want, dtype)
    check(stats, want_stats, torch.float32)
    out2, none = emb.embedding(ids, table, want_stats=False)
    assert none is None and torch.equal(out2, out)
