"""kernels/triton_backend.py: which kernels each M takes (decode GEMMs, cuBLAS + elementwise consumers, rows as statistics), and whole blocks fused vs off vs the torch reference."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.batch import Geometry
from fusionserve.kernels.triton_backend import TritonBackend
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, TOL, check, poison_outputs, rand  # noqa: F401
from tests.kernels.linear_cases import CASES, EPS, K, N, case_args, producer_stats, ref_linear64


def sumsq_of(stats: torch.Tensor, width: int) -> torch.Tensor:
    """Σy² per row from a producer's statistic: its partials, or the rows of y themselves."""
    if ref.stats_are_rows(stats, width):
        return ref.row_sumsq(stats.double()).squeeze(-1)
    return stats.double().sum(-1)


@pytest.mark.parametrize("rows_stats_max_m", [512, 0], ids=["rows", "row_pass"])
@pytest.mark.parametrize("m", [3, 17])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_m_paths(dtype, m, rows_stats_max_m):
    """small_m_max=2 sends M = 3, 17 down the large-M path: cuBLAS + consumer kernels, the producer
    statistic being h itself (rows_stats_max_m=512, big decode batches) or a row pass (0, prefill)."""
    be = TritonBackend(Geometry.of(1, 1, 2, EPS), small_m_max=2, rows_stats_max_m=rows_stats_max_m)
    for case in CASES.values():
        x, w, bias, residual, stats = case_args(m, dtype, case)
        want = ref_linear64(x, w, bias, residual, stats)  # first: the backend may consume `residual`
        y, st = be.linear(x, w, bias, residual, stats, case.get("want_stats", False))
        check(y, want, dtype)
        if case.get("want_stats"):
            # h itself only where no epilogue pass runs anyway (a scaled consumer's pass sums squares)
            assert ref.stats_are_rows(st, N) == (rows_stats_max_m > 0 and stats is None)
            check(sumsq_of(st, N), ref.row_sumsq(y.double()).squeeze(-1), torch.float32)
    x, w2 = rand(m, K, dtype=dtype), rand(2 * N, K, dtype=dtype, scale=K**-0.5)
    w_wide, b_wide = rand(3 * K, K, dtype=dtype, scale=K**-0.5), rand(3 * K, dtype=dtype)
    h = rand(m, K, dtype=dtype)  # a producer's output handed on as its own statistic
    for stats in (producer_stats(m), h):
        g = ref_linear64(x, w2, row_stats=stats.double() ** 2 if stats is h else stats)
        check(be.mlp_input(x, stats, w2)[0], torch.nn.functional.silu(g[:, :N]) * g[:, N:], dtype)
        # A wide consumer (the LM head, N > K) scales its input rows instead of a pass over the output.
        y, st = be.linear(x, w_wide, b_wide, None, stats)
        check(
            y, ref_linear64(x, w_wide, b_wide, row_stats=stats.double() ** 2 if stats is h else stats), dtype
        )
        assert st is None
        # The same statistic reaching a small-M consumer (the LM head over a few rows of the step).
        y, _ = be.linear(x[:2], w_wide, b_wide, None, stats[:2])
        check(
            y,
            ref_linear64(x[:2], w_wide, b_wide, row_stats=(stats.double() ** 2 if stats is h else stats)[:2]),
            dtype,
        )
