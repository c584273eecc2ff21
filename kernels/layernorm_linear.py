"""Deferred LayerNorm before a linear layer, on the decode GEMM of kernels/norm_linear.py: the
producer's per-tile Σx and shifted Σ(x − tile mean)² give the row's mean and variance, the gain is
folded into W' and the bias into b', and the consumer's epilogue subtracts the mean through the
column sums of W' (docs/DESIGN.md, "The deferred-norm contract").

Statistics travel packed, [T, 2P] fp32: P partial sums, then P shifted sums of squares
(reference.ln_stats writes the same layout with P = 1).
"""

from __future__ import annotations

import torch

from fusionserve.kernels.batch import Draw
from fusionserve.kernels.norm_linear import launch
from fusionserve.kernels.pdl import PdlPolicy

#: GELU variants of the epilogue: none, exact (erf), tanh approximation.
GELU_CODES = {None: 0, "none": 1, "tanh": 2}


def linear_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    col_sums: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    want_stats: bool = False,
    gelu: str | None = None,
    config=None,
    out: torch.Tensor | None = None,
    pdl: PdlPolicy | None = None,
    draw: Draw | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = rsqrt(var + eps) * (x W'^T - mean * c) + b' (+ residual) [→ GELU], and y's own packed
    LayerNorm statistics when `want_stats` (reference.ln_linear).

    W' = W diag(gamma), c = W' 1 (`col_sums`, fp32 [N]) and b' = W beta + b (`bias`) are precomputed at
    load; `stats` is the producer's packed statistics of x (None: x is used as it is). `draw`: y is the
    [M] tokens drawn from the fp32 logits instead (FlashSampling, kernels/sampling.py)."""
    row_sums = row_m2 = None
    if stats is not None:
        assert col_sums is not None
        p = stats.shape[1] // 2
        row_sums, row_m2 = stats[:, :p], stats[:, p:]
    y, packed, _ = launch(
        x,
        weight,
        weight.shape[0],
        bias=bias,
        residual=residual,
        row_stats=row_m2,
        row_sums=row_sums,
        col_sums=col_sums.float() if col_sums is not None else None,
        eps=eps,
        want_sums=want_stats,
        gelu=GELU_CODES[gelu],
        config=config,
        out=out,
        pdl=pdl,
        draw=draw,
    )
    return y, (packed if want_stats else None)
