"""FP8 (e4m3) weights and per-token activation scales: the data type, and the torch arithmetic every
FP8 path must reproduce (docs/DESIGN.md, "FP8").

A weight is stored once as e4m3 with one fp32 scale per output channel (W ≈ s_w[n] · W_q[n, :]). An
activation row is quantized when a GEMM reads it: s_x = max|x| / 448, x_q = e4m3(x / s_x). The
product is then y = (x_q · W_qᵀ) · s_x · s_w, and a deferred RMSNorm's scale r is one more per-row
factor: quantizing h or r·h gives the same x_q (r > 0 cancels in x / s_x), so the consumer of an
un-normalized h applies r · s_x · s_w to its fp32 accumulator and no normalized copy ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


@dataclass(frozen=True)
class Fp8Weight:
    """A linear layer's weight [N, K] in e4m3 with its per-output-channel fp32 scales [N]."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale[:, None]).to(dtype)


def quantize_weight(w: torch.Tensor) -> Fp8Weight:
    """Per-output-channel e4m3: s_w[n] = max|W[n, :]| / 448 (all-zero rows keep scale 1)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return Fp8Weight(to_e4m3(wf / scale[:, None]), scale.contiguous())


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even e4m3, saturating at ±448 (torch's cast would turn overflow into NaN)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def activation_scale(amax: torch.Tensor) -> torch.Tensor:
    """s_x per row from max|x| (fp32); an all-zero row gets 1 (its x_q is zero either way)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic e4m3: (x_q [T, K] e4m3, s_x [T, 1] fp32)."""
    s = activation_scale(x.float().abs().amax(dim=-1, keepdim=True))
    return to_e4m3(x.float() * (1.0 / s)), s  # x · (1/s), as the kernels compute it


def fp8_matmul(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """The fp32 accumulator of an FP8 GEMM, x_q W_qᵀ · s_x · s_w, x quantized per row here (e4m3
    products are exact in fp32, so this is what any FP8 GEMM computes up to summation order)."""
    xq, s = quantize_rows(x)
    return (xq.float() @ w.data.float().t()) * s * w.scale[None, :]
