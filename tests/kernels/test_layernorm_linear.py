"""kernels/layernorm_linear.py: the deferred LayerNorm (mean and variance from the producer's shifted
per-tile statistics) vs float64, including rows whose mean dwarfs their spread, and the GELU epilogue."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.layernorm_linear import linear_layernorm
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, TOL, check, poison_outputs, rand  # noqa: F401

N, K = 37, 45  # odd: no multiple of any block size
EPS = 1e-5


def folded(dtype, n=N, k=K):
    gamma, beta = rand(k, scale=0.5) + 1.0, rand(k, scale=0.1)
    w, b = rand(n, k, dtype=dtype, scale=k**-0.5), rand(n)
    w_folded = (w.double() * gamma.double()).to(dtype)  # W' = W diag(γ), folded once
    col_sums = w_folded.double().sum(-1).float()  # c = W' 1
    b_folded = (w.double() @ beta.double() + b.double()).float()  # b' = W β + b
    return w, b, gamma, beta, w_folded, col_sums, b_folded


@pytest.mark.parametrize("shift", [0.5, 300.0])
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_linear(dtype, m, shift):
    """A producer GEMM writes h = a W_pᵀ + residual and its packed statistics; the consumer applies
    the mean correction and 1/σ. shift=300: the rows' mean is 300x their spread (bf16 still holds
    it), where Σx² − Kμ² in fp32 would have lost the variance."""
    h = rand(m, K, dtype=dtype, scale=2.0) + shift
    w, b, gamma, beta, w_folded, col_sums, b_folded = folded(dtype)
    w_p = rand(K, 7, dtype=dtype, scale=7**-0.5)
    a = rand(m, 7, dtype=dtype)
    h_out, stats = linear_layernorm(a, w_p, residual=h, want_stats=True, config=(16, 16, 16, 4, 1, 1))
    check(h_out, a.double() @ w_p.double().t() + h.double(), dtype)
    assert stats.shape == (m, 2 * 3)  # three 16-wide tiles of K = 45 columns
    mean, rstd = ref.ln_scale(stats, K, 0.0)
    hd = h_out.double()
    check(mean.squeeze(-1), hd.mean(-1), torch.float32)
    check(1 / rstd.double().squeeze(-1) ** 2, hd.var(-1, unbiased=False), torch.float32)
    y, _ = linear_layernorm(h_out, w_folded, col_sums, b_folded, stats, EPS)
    hn = torch.nn.functional.layer_norm(hd, (K,), gamma.double(), beta.double(), EPS)
    want = hn @ w.double().t() + b.double()
    # x W'ᵀ − μ c cancels |μ|/σ-fold: the epilogue's fp32 keeps ~1e-7 · 300 relative
    check(y, want, dtype, factor=1.0 if shift < 1 or dtype != torch.float32 else 10.0)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_epilogue_with_the_deferred_norm(dtype, approximate):
    h = rand(3, K, dtype=dtype, scale=2.0) + 0.5
    stats = ref.ln_stats(h)
    _, _, gamma, beta, w_folded, col_sums, b_folded = folded(dtype, n=70)
    w = w_folded.double() / gamma.double()
    y, none = linear_layernorm(h, w_folded, col_sums, b_folded, stats, EPS, gelu=approximate)
    hn = torch.nn.functional.layer_norm(h.double(), (K,), gamma.double(), beta.double(), EPS)
    bias = b_folded.double() - w @ beta.double()
    want = torch.nn.functional.gelu(hn @ w.t() + bias, approximate=approximate)
    assert none is None
    check(y, want, dtype)


@pytest.mark.parametrize("m", [1, 3])
def test_more_partials_than_one_prefetched_chunk(m):
    """2085 columns in 16-wide producer tiles: 131 partials, more than the 128 the consumer prefetches
    before its K loop, so ln_finish folds a second chunk into the first (shifted by tile 0's mean)."""
    k = 16 * 130 + 5
    h = rand(m, k, dtype=torch.float32, scale=2.0) + 300.0
    h[:, -37:] += 6.0  # the second chunk's tiles sit off the row's mean: dropping them would show
    w, b, gamma, beta, w_folded, col_sums, b_folded = folded(torch.float32, n=5, k=k)
    w_p = rand(k, 7, scale=7**-0.5)
    h_out, stats = linear_layernorm(
        rand(m, 7), w_p, residual=h, want_stats=True, config=(16, 16, 16, 4, 1, 1)
    )
    assert stats.shape == (m, 2 * 131)
    y, _ = linear_layernorm(h_out, w_folded, col_sums, b_folded, stats, EPS, config=(16, 16, 16, 4, 1, 1))
    hn = torch.nn.functional.layer_norm(h_out.double(), (k,), gamma.double(), beta.double(), EPS)
    check(y, hn @ w.double().t() + b.double(), torch.float32, factor=10.0)
