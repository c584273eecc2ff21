"""kernels/row_epilogue.py: the deferred norm's row scale, bias, residual and Σy² partials as one pass
over a cuBLAS GEMM's output, vs float64."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels.row_epilogue import row_epilogue
from tests.kernels.common import DTYPES, check, poison_outputs, rand  # noqa: F401
from tests.kernels.linear_cases import EPS, K, N, producer_stats


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_epilogue(dtype, m):
    y, bias, res = rand(m, N, dtype=dtype), rand(N, dtype=dtype), rand(m, N, dtype=dtype)
    stats = producer_stats(m)
    r = torch.rsqrt(stats.double().sum(-1, keepdim=True) / K + EPS)
    out, st = row_epilogue(y, K, stats, bias, res, EPS, want_stats=True)
    check(out, y.double() * r + bias.double() + res.double(), dtype)
    check(st.sum(-1), (out.double() ** 2).sum(-1), torch.float32)
    x = rand(m, K, dtype=dtype)  # the rows of the GEMM input as the statistic (reference.stats_are_rows)
    r = torch.rsqrt((x.double() ** 2).sum(-1, keepdim=True) / K + EPS)
    out, none = row_epilogue(y, K, x, bias, None, EPS)
    check(out, y.double() * r + bias.double(), dtype)
    assert none is None


@pytest.mark.parametrize("m", [1, 3])
def test_wide_rows_split_over_programs_in_place_fp32(m):
    """The LM head's case: fp32 logits wider than one program's span, scaled in place; every column
    of every row scaled once (a span boundary handled twice or skipped would show)."""
    from fusionserve.kernels.row_epilogue import SPAN_BLOCKS
    from fusionserve.kernels.triton_env import INTERPRET

    n = (256 if INTERPRET else 1024) * SPAN_BLOCKS * 2 + 77  # two full spans and a ragged third
    y = rand(m, n, dtype=torch.float32, scale=4.0)
    want = y.double().clone()
    stats = producer_stats(m)
    r = torch.rsqrt(stats.double().sum(-1, keepdim=True) / K + EPS)
    out, none = row_epilogue(y, K, stats, eps=EPS, out=y)
    assert out.data_ptr() == y.data_ptr() and none is None
    check(out, want * r, torch.float32)
    assert torch.allclose(out.double(), want * r, rtol=1e-6, atol=0)
