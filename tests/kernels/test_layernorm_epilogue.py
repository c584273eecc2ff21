"""kernels/layernorm_epilogue.py: the deferred LayerNorm's row pass over a cuBLAS product (prefill
sizes) against reference.ln_epilogue, with statistics from either kind of producer and rows whose
mean dwarfs their spread; its own statistics read back through reference.ln_scale."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.layernorm_epilogue import ln_row_epilogue, ln_row_stats
from fusionserve.kernels.layernorm_linear import GELU_CODES, linear_layernorm
from tests.kernels.common import DEVICE, DTYPES, INTERPRET, TOL, check, rand  # noqa: F401

EPS = 1e-5


@pytest.mark.parametrize("n", [37, 600, 2500])  # 600: three of the interpreter's 256-wide blocks
@pytest.mark.parametrize("shift", [0.5, 300.0])
def test_row_stats_match_the_reference(n, shift):
    x = rand(5, n, scale=2.0) + shift
    packed = ln_row_stats(x)
    block = min(256 if INTERPRET else 1024, 1 << (n - 1).bit_length())
    assert packed.shape == (5, 2 * -(-n // block))
    mean, rstd = ref.ln_scale(packed, n, 0.0)
    check(mean.squeeze(-1), x.double().mean(-1), torch.float32)
    check(1 / rstd.double().squeeze(-1) ** 2, x.double().var(-1, unbiased=False), torch.float32)


@pytest.mark.parametrize("gelu", [None, "none", "tanh"])
@pytest.mark.parametrize("producer", ["row", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_epilogue_matches_the_reference(dtype, producer, gelu):
    """x (T=40 rows, K=300, mean 300x its spread) with the statistics a row pass or a decode GEMM's
    tiles wrote; the epilogue on an fp32 product x W'ᵀ against reference.ln_epilogue in float64."""
    t, k, n = 40, 300, 530
    x = (rand(t, k, scale=2.0) + 300.0).to(dtype)
    if producer == "row":
        stats = ln_row_stats(x)
    else:  # 16-wide GEMM tiles: 19 partials
        eye = torch.eye(k, dtype=dtype, device=DEVICE)
        x, stats = linear_layernorm(x, eye, want_stats=True, config=(16, 16, 16, 4, 1, 1))
    w = rand(n, k, dtype=dtype, scale=k**-0.5)
    col_sums, bias, residual = w.double().sum(-1).float(), rand(n), rand(t, n, dtype=dtype)
    acc = (x.double() @ w.double().t()).float()
    y, packed = ln_row_epilogue(
        acc, k, col_sums, bias, residual, stats, EPS, True, None, dtype, GELU_CODES[gelu]
    )
    want, _ = ref.ln_epilogue(
        acc.double(),
        k,
        col_sums.double(),
        bias.double(),
        residual.double(),
        stats,
        EPS,
        False,
        torch.float64,
        gelu,
    )
    assert y.dtype == dtype and not torch.isnan(y).any()
    check(y, want, dtype)
    mean, rstd = ref.ln_scale(packed, n, 0.0)  # y's own statistics, for the next consumer
    check(mean.squeeze(-1), y.double().mean(-1), torch.float32)
    check(1 / rstd.double().squeeze(-1) ** 2, y.double().var(-1, unbiased=False), torch.float32)


def test_fp32_logits_in_place():
    x = rand(33, 64, scale=2.0) + 50.0
    w = rand(300, 64, scale=0.125)
    c, b = w.double().sum(-1).float(), rand(300)
    acc = x @ w.t()
    want, _ = ref.ln_epilogue(
        acc.double(), 64, c.double(), b.double(), None, ref.ln_stats(x), EPS, False, torch.float64
    )
    out, none = ln_row_epilogue(acc, 64, c, b, None, ln_row_stats(x), EPS, False, out=acc)
    assert out.data_ptr() == acc.data_ptr() and none is None
    check(out, want, torch.float32)
