"""The linear-layer cases and float64 references that the GEMM and backend tests share."""

from __future__ import annotations

import torch

from tests.kernels.common import rand

N, K = 37, 45  # odd: no multiple of any block size
EPS = 1e-5


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


CASES = {
    "plain": dict(),
    "bias_scale": dict(bias=True, scale=True),
    "res_stats": dict(residual=True, want_stats=True),
    "all": dict(bias=True, residual=True, scale=True, want_stats=True),
}


def case_args(m, dtype, case):
    x = rand(m, K, dtype=dtype)
    w = rand(N, K, dtype=dtype, scale=K**-0.5)
    bias = rand(N, dtype=dtype) if case.get("bias") else None
    residual = rand(m, N, dtype=dtype) if case.get("residual") else None
    stats = producer_stats(m) if case.get("scale") else None
    return x, w, bias, residual, stats
