"""FP8 (e4m3) decode GEMMs of kernels/norm_linear.py against kernels/fp8.py's torch arithmetic: per-token
activation quantization inside the consumer from its producer's max|x| partials, the weight and
activation scales composed with the deferred RMSNorm's in the epilogue, and producers that emit
max|y| partials beside their Σy².

Tolerance: the kernel and the reference quantize x with the same fp32 operations, but on a GPU a
last-bit difference in x · (1/s) can move one element to the neighbouring e4m3 value (6% of that
term), so FP8 results are held to 1e-2 in every dtype."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels import fp8_rows, norm_linear
from fusionserve.kernels import reference as ref
from fusionserve.kernels.fp8 import E4M3, Fp8Weight, quantize_rows, quantize_weight, to_e4m3
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, check, rand  # noqa: F401

N, K = 37, 45
CFG = (16, 16, 32, 4, 1, 1)  # an e4m3 tl.dot needs K ≥ 32 per tile on the GPU


def amax_rows(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().amax(-1, keepdim=True)


def test_e4m3_rounding_matches_torch():
    """The kernel's cast of x · (1/s) (emulated under the interpreter) is torch's round-to-nearest-even
    e4m3, saturating at ±448, over normals, subnormals, ties and the range's ends: with max|x| = 448
    (s = 1) and an identity weight, y is e4m3(x) itself."""
    x = torch.cat([rand(16, 48, scale=3.0), rand(16, 8, scale=0.01), rand(16, 8, scale=300.0)], 1)
    x[0, :6] = torch.tensor([448.0, 460.0, -1000.0, 0.0, 2.0**-10, 0.0703125])  # 0.0703125: a tie
    eye = Fp8Weight(torch.eye(64, device=DEVICE).to(E4M3), torch.ones(64, device=DEVICE))
    y, _, _ = norm_linear.launch(x, eye, 64, config=CFG, x_amax=torch.full((16, 1), 448.0, device=DEVICE))
    assert torch.equal(y, to_e4m3(x).float())


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_linear_matches_the_reference(dtype, m):
    x = rand(m, K, dtype=dtype, scale=2.0)
    w = quantize_weight(rand(N, K, scale=K**-0.5))
    bias, residual = rand(N), rand(m, N, dtype=dtype)
    y, _, _ = norm_linear.launch(x, w, N, bias=bias, residual=residual, config=CFG, x_amax=amax_rows(x))
    want, _ = ref.linear(x, w, bias, residual.clone())
    assert y.dtype == dtype
    check(y, want, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deferred_norm_composes_with_the_quantization_scales(dtype):
    """A producer writes h with Σh² and max|h| partials; the FP8 consumer quantizes the
    un-normalized h and applies r · s_x · s_w: the reference quantizes h the same way (r > 0 cancels)
    and its result is the normalized x's product up to e4m3 rounding."""
    m = 5
    a, w_p = rand(m, 7, dtype=dtype), rand(K, 7, dtype=dtype, scale=7**-0.5)
    h_in = rand(m, K, dtype=dtype, scale=3.0)
    h, packed, _ = norm_linear.launch(a, w_p, K, residual=h_in, want_stats=True, want_amax=True, config=CFG)
    p = packed.shape[1] // 2
    assert torch.equal(packed[:, p:].amax(-1), h.float().abs().amax(-1))  # max is exact
    w = quantize_weight(rand(N, K, scale=K**-0.5))
    y, _, _ = norm_linear.launch(h, w, N, row_stats=packed[:, :p], x_amax=packed[:, p:], config=CFG, eps=1e-6)
    want, _ = ref.linear(h, w, row_stats=ref.row_sumsq(h), eps=1e-6)
    check(y, want, torch.bfloat16)
    exact = ref.rmsnorm(h.float(), 1e-6) @ w.dequantize().t()
    assert (y.float() - exact).norm() / exact.norm() < 0.1  # e4m3: ~3 significant bits per term


def test_fp8_gate_up_silu():
    x = rand(3, K, scale=2.0)
    w = quantize_weight(rand(2 * N, K, scale=K**-0.5))
    y = norm_linear.gate_up_silu(x, w, config=CFG, x_amax=amax_rows(x))
    check(y, ref.gate_up_silu(x, w), torch.bfloat16)


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    x = rand(4, K, scale=5.0)
    x[2] = 0.0
    xq, s = quantize_rows(x)
    assert xq.dtype == E4M3 and torch.equal(s[2], torch.ones(1, device=DEVICE))
    assert torch.allclose(xq.float().abs().amax(-1)[[0, 1, 3]], torch.full((3,), 448.0, device=DEVICE))


@pytest.mark.parametrize("stats", [None, "partials", "rows"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_passes_match_the_reference(dtype, stats):
    """fp8_rows: max|x| per row, and x_q with its row scale (times the deferred norm's r)."""
    x = rand(7, 300, dtype=dtype, scale=3.0)
    x[3] = 0.0
    assert torch.equal(fp8_rows.amax_rows(x), x.float().abs().amax(-1, keepdim=True))
    h = rand(7, 300, dtype=dtype)
    given = {None: None, "partials": ref.row_sumsq(h), "rows": h}[stats]
    xq, scale = fp8_rows.quantize_rows(x, given, eps=1e-6)
    want_q, want_s = quantize_rows(x)
    assert xq.dtype == E4M3 and torch.equal(xq.float(), want_q.float())
    if given is not None:
        want_s = want_s * ref.row_rsqrt(given, 300, 1e-6)
    check(scale, want_s, torch.float32)
