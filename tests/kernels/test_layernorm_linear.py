"""kernels/layernorm_linear.py: the deferred LayerNorm (mean and variance from the producer's partials) vs float64."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels.layernorm_linear import linear_layernorm
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, TOL, check, poison_outputs, rand  # noqa: F401

N, K = 37, 45  # odd: no multiple of any block size
EPS = 1e-5


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_linear(dtype, m):
    """Deferred LayerNorm: producer Σx, Σx² partials; consumer applies 1/σ and the mean correction."""
    h = rand(m, K, dtype=dtype, scale=2.0) + 0.5
    gamma, beta = rand(K, scale=0.5) + 1.0, rand(K, scale=0.1)
    w, b = rand(N, K, dtype=dtype, scale=K**-0.5), rand(N)
    w_folded = (w.double() * gamma.double()).to(dtype)  # W' = W diag(γ), folded once
    col_sums = w_folded.double().sum(-1).float()  # c = W' 1
    b_folded = (w.double() @ beta.double() + b.double()).float()  # b' = W β + b
    # the producer: some GEMM whose epilogue writes h and its Σ/Σ² partials
    w_p = rand(K, 7, dtype=dtype, scale=7**-0.5)
    a = rand(m, 7, dtype=dtype)
    h_out, sq, su = linear_layernorm(a, w_p, residual=h, want_stats=True)
    check(h_out, a.double() @ w_p.double().t() + h.double(), dtype)
    check(su.sum(-1), h_out.double().sum(-1), torch.float32)
    check(sq.sum(-1), (h_out.double() ** 2).sum(-1), torch.float32)
    y, _, _ = linear_layernorm(h_out, w_folded, col_sums, b_folded, sq, su, EPS)
    hn = torch.nn.functional.layer_norm(h_out.double(), (K,), gamma.double(), beta.double(), EPS)
    check(y, hn @ w.double().t() + b.double(), dtype)
