"""kernels/norm_linear.py (the deferred-norm decode GEMM: scale, bias, residual, Σy² out, gate/up, LayerNorm, split-K) vs a float64 reference."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import norm_linear as nl
from fusionserve.kernels import reference as ref
from fusionserve.kernels.triton_env import arrival_counters
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, TOL, check, poison_outputs, rand  # noqa: F401
from tests.kernels.linear_cases import CASES, EPS, K, N, case_args, producer_stats, ref_linear64


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_linear(dtype, m, case):
    c = CASES[case]
    x, w, bias, residual, stats = case_args(m, dtype, c)
    y, st = nl.linear(x, w, bias, residual, stats, EPS, c.get("want_stats", False))
    want = ref_linear64(x, w, bias, residual, stats)
    check(y, want, dtype)
    assert y.dtype == dtype and y.shape == (m, N)
    if c.get("want_stats"):
        assert st.dtype == torch.float32 and st.shape[0] == m and st.shape[1] > 1
        check(st.sum(-1), ref.row_sumsq(y.double()).squeeze(-1), torch.float32)  # from the rounded y
        check(st.sum(-1), (want * want).sum(-1), dtype)
    else:
        assert st is None


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_up_silu(dtype, m):
    x = rand(m, K, dtype=dtype)
    w = rand(2 * N, K, dtype=dtype, scale=K**-0.5)
    for stats in (None, producer_stats(m)):
        out = nl.gate_up_silu(x, w, stats, EPS)
        g = ref_linear64(x, w, row_stats=stats)
        want = torch.nn.functional.silu(g[:, :N]) * g[:, N:]
        check(out, want, dtype)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k(dtype, m):
    """Split-K: the last split to arrive reduces the parked tiles and runs the epilogue; counters re-arm."""
    c = CASES["all"]
    cfg = (16, 16, 16, 1, 1, 3) if DEVICE.type == "cpu" else (16, 16, 16, 4, 2, 3)
    for _ in range(2):  # the second call proves the arrival counters were reset
        x, w, bias, residual, stats = case_args(m, dtype, c)
        y, st = nl.linear(x, w, bias, residual, stats, EPS, True, config=cfg)
        want = ref_linear64(x, w, bias, residual, stats)
        check(y, want, dtype)
        check(st.sum(-1), ref.row_sumsq(y.double()).squeeze(-1), torch.float32)
        w2 = rand(2 * N, K, dtype=dtype, scale=K**-0.5)
        g = ref_linear64(x, w2, row_stats=stats)
        check(
            nl.gate_up_silu(x, w2, stats, EPS, config=cfg),
            torch.nn.functional.silu(g[:, :N]) * g[:, N:],
            dtype,
        )
    assert int(arrival_counters(x.device, 1, "split_k").abs().sum()) == 0
