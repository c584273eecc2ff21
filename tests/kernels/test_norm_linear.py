"""kernels/norm_linear.py (the deferred-norm decode GEMM: scale, bias, residual, Σy² out, gate/up, LayerNorm, split-K) vs a float64 reference."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import norm_linear as nl
from fusionserve.kernels import reference as ref
from fusionserve.kernels.triton_env import arrival_counters
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, TOL, check, poison_outputs, rand  # noqa: F401

N, K = 37, 45  # odd: no multiple of any block size
EPS = 1e-5


CASES = {
    "plain": dict(),
    "bias_scale": dict(bias=True, scale=True),
    "res_stats": dict(residual=True, want_stats=True),
    "all": dict(bias=True, residual=True, scale=True, want_stats=True),
}


def ref_linear64(x, w, bias=None, residual=None, row_stats=None, eps=EPS, dtype=None):
    """The float64 oracle: the epilogue math of reference.linear without any rounding."""
    acc = x.double() @ w.double().t()
    if row_stats is not None:
        acc = acc * torch.rsqrt(row_stats.double().sum(-1, keepdim=True) / x.shape[-1] + eps)
    if bias is not None:
        acc = acc + bias.double()
    if residual is not None:
        acc = acc + residual.double()
    return acc


def producer_stats(m, k=K):
    """Σx² partials as a producer would emit them: several columns of a plausible magnitude."""
    return (torch.rand(m, 3, dtype=torch.float64) * k / 3 + 0.1).float().to(rand(1).device)


def _args(m, dtype, case):
    x = rand(m, K, dtype=dtype)
    w = rand(N, K, dtype=dtype, scale=K**-0.5)
    bias = rand(N, dtype=dtype) if case.get("bias") else None
    residual = rand(m, N, dtype=dtype) if case.get("residual") else None
    stats = producer_stats(m) if case.get("scale") else None
    return x, w, bias, residual, stats


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_linear(dtype, m, case):
    c = CASES[case]
    x, w, bias, residual, stats = _args(m, dtype, c)
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
        x, w, bias, residual, stats = _args(m, dtype, c)
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
