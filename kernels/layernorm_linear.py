"""Deferred LayerNorm before a linear layer, on the decode GEMM of kernels/norm_linear.py: the
producer's Σx and Σx² partials give the row's mean and variance, the gain is folded into W' and the
bias into b', and the consumer's epilogue subtracts the mean through the column sums of W'."""

from __future__ import annotations

import torch

from fusionserve.kernels.norm_linear import launch
from fusionserve.kernels.pdl import PdlPolicy


def linear_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    col_sums: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    row_stats: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    want_stats: bool = False,
    config=None,
    pdl: PdlPolicy | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Deferred LayerNorm: y = rsqrt(var + eps) * (x W'^T - mean * c) + b' (+ residual).

    W' = W diag(gamma), c = W' 1 (`col_sums`, fp32 [N]) and b' = W beta + b (`bias`) are precomputed at
    load; row_stats / row_sums are the producer's Σx² and Σx partials. Returns (y, Σy² partials,
    Σy partials) when want_stats, for a following LayerNorm.
    """
    if row_stats is not None:
        assert row_sums is not None and col_sums is not None
    y, stats, sums = launch(
        x,
        weight,
        weight.shape[0],
        bias=bias,
        residual=residual,
        row_stats=row_stats,
        row_sums=row_sums,
        col_sums=col_sums.float() if col_sums is not None else None,
        eps=eps,
        want_sums=want_stats,
        config=config,
        pdl=pdl,
    )
    return y, stats, sums
