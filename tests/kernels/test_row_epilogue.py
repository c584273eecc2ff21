"""kernels/silu_mul.py and kernels/row_epilogue.py, the large-M consumers that apply the deferred scale after cuBLAS, vs float64."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.row_epilogue import row_epilogue
from fusionserve.kernels.silu_mul import silu_mul
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, TOL, check, poison_outputs, rand  # noqa: F401

N, K = 37, 45  # odd: no multiple of any block size
EPS = 1e-5


def producer_stats(m, k=K):
    """Σx² partials as a producer would emit them: several columns of a plausible magnitude."""
    return (torch.rand(m, 3, dtype=torch.float64) * k / 3 + 0.1).float().to(rand(1).device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_consumers(dtype):
    m = 5
    gu = rand(m, 2 * N, dtype=dtype)
    stats = producer_stats(m)
    r = torch.rsqrt(stats.double().sum(-1, keepdim=True) / K + EPS)
    want = torch.nn.functional.silu(gu.double()[:, :N] * r) * gu.double()[:, N:] * r
    check(silu_mul(gu, stats, K, EPS), want, dtype)
    check(silu_mul(gu), ref.silu_mul(gu.double()), dtype)
    y, bias, res = rand(m, N, dtype=dtype), rand(N, dtype=dtype), rand(m, N, dtype=dtype)
    out, st = row_epilogue(y, K, stats, bias, res, EPS, want_stats=True)
    check(out, y.double() * r + bias.double() + res.double(), dtype)
    check(st.sum(-1), (out.double() ** 2).sum(-1), torch.float32)
    # The rows of the GEMM input as the statistic (reference.stats_are_rows): squared and summed.
    x = rand(m, K, dtype=dtype)
    r = torch.rsqrt((x.double() ** 2).sum(-1, keepdim=True) / K + EPS)
    want = torch.nn.functional.silu(gu.double()[:, :N] * r) * gu.double()[:, N:] * r
    check(silu_mul(gu, x, K, EPS), want, dtype)
    out, _ = row_epilogue(y, K, x, bias, None, EPS)
    check(out, y.double() * r + bias.double(), dtype)
