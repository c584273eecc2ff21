"""kernels/silu_mul.py: silu(gate) * up after a cuBLAS gate/up GEMM, with the deferred norm's row scale
from partial sums or from the rows of the GEMM input, vs float64."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.silu_mul import silu_mul
from tests.kernels.common import DTYPES, check, poison_outputs, rand  # noqa: F401
from tests.kernels.linear_cases import EPS, K, N, producer_stats


def scaled_silu_mul64(gu: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    g = gu.double()
    return torch.nn.functional.silu(g[:, :N] * r) * g[:, N:] * r


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype, m):
    gu = rand(m, 2 * N, dtype=dtype)
    check(silu_mul(gu), ref.silu_mul(gu.double()), dtype)
    stats = producer_stats(m)
    r = torch.rsqrt(stats.double().sum(-1, keepdim=True) / K + EPS)
    check(silu_mul(gu, stats, K, EPS), scaled_silu_mul64(gu, r), dtype)
    x = rand(m, K, dtype=dtype)  # the rows of the GEMM input as the statistic (reference.stats_are_rows)
    r = torch.rsqrt((x.double() ** 2).sum(-1, keepdim=True) / K + EPS)
    check(silu_mul(gu, x, K, EPS), scaled_silu_mul64(gu, r), dtype)
