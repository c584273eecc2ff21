"""kernels/rmsnorm.py (RMSNorm, fused add, LayerNorm, per-row statistics) vs float64."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels import rmsnorm as rn
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, check, poison_outputs, rand  # noqa: F401

K = 45
EPS = 1e-5


def rms64(h, eps=EPS):
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_fused_add(dtype, m):
    x, res = rand(m, K, dtype=dtype, scale=3.0), rand(m, K, dtype=dtype)
    check(rn.rmsnorm(x, EPS), rms64(x), dtype)
    w = rand(K, dtype=dtype) + 1
    check(rn.rmsnorm(x, EPS, w), rms64(x) * w.double(), dtype)
    h, y = rn.add_rmsnorm(x, res, EPS)
    check(h, x.double() + res.double(), dtype)
    check(y, rms64(h), dtype)  # normalizes the stored (rounded) h, as the next reader would


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm(dtype, m):
    x, res = rand(m, K, dtype=dtype, scale=2.0) + 1.0, rand(m, K, dtype=dtype)
    w, b = rand(K, dtype=dtype) + 1, rand(K, dtype=dtype)
    ln = torch.nn.functional.layer_norm
    check(rn.layernorm(x, EPS, w, b), ln(x.double(), (K,), w.double(), b.double(), EPS), dtype)
    h, y = rn.layernorm(x, EPS, residual=res)
    check(h, x.double() + res.double(), dtype)
    check(y, ln(h.double(), (K,), eps=EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_stats(dtype):
    x = rand(7, 300, dtype=dtype, scale=2.0)
    sq, su = rn.row_stats(x, want_sums=True)
    check(sq, ref.row_sumsq(x.double()), torch.float32)
    check(su, x.double().sum(-1, keepdim=True), torch.float32)
    check(rn.row_stats(x), ref.row_sumsq(x.double()), torch.float32)
