"""The one seam between the decoder and the kernels.

The decoder calls only these operations; a backend decides how to run them. The
torch backend (CPU, tests) composes kernels/reference.py; the Triton backend
(CUDA) runs the fused deferred-norm kernels. Both take `row_stats` with the same
meaning (see kernels/reference.py), so fusion on/off is one flag in the model
and never a second code path per device.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fusionserve.kernels import reference
from fusionserve.kernels.batch import PagedBatch


class Backend(Protocol):
    name: str

    def embedding(
        self, ids: torch.Tensor, table: torch.Tensor, want_stats: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def rmsnorm(self, x: torch.Tensor, eps: float) -> torch.Tensor: ...

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        row_stats: torch.Tensor | None = None,
        eps: float = 1e-6,
        want_stats: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x W^T (+ bias) (+ residual), optionally row-scaled / emitting Σy² (kernels/reference.py).

        `residual` is consumed: a backend may write the result into it (the residual stream is
        never read again once the next h exists), which saves a copy of it per large-M GEMM."""
        ...

    def attn_input(
        self,
        x: torch.Tensor,
        row_stats: torch.Tensor | None,
        w_qkv: torch.Tensor,
        b_qkv: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
    ) -> torch.Tensor: ...

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch, scale: float
    ) -> torch.Tensor: ...

    def mlp_input(
        self, x: torch.Tensor, row_stats: torch.Tensor | None, w_gate_up: torch.Tensor, eps: float
    ) -> torch.Tensor: ...


class TorchBackend:
    """Reference kernels in plain torch: correct everywhere, fast enough on CPU for the 135M model."""

    name = "torch"

    def embedding(self, ids, table, want_stats):
        return reference.embedding(ids, table, want_stats)

    def rmsnorm(self, x, eps):
        return reference.rmsnorm(x, eps)

    def linear(self, x, weight, bias=None, residual=None, row_stats=None, eps=1e-6, want_stats=False):
        return reference.linear(x, weight, bias, residual, row_stats, eps, want_stats)

    def attn_input(self, x, row_stats, w_qkv, b_qkv, positions, cos_sin, k_cache, v_cache, slot_mapping,
                   num_heads, num_kv_heads, head_dim, eps):  # fmt: skip
        return reference.attn_input(
            x, row_stats, w_qkv, b_qkv, positions, cos_sin, k_cache, v_cache, slot_mapping,
            num_heads, num_kv_heads, head_dim, eps,
        )  # fmt: skip

    def attention(self, q, k_cache, v_cache, batch, scale):
        return reference.paged_attention(q, k_cache, v_cache, batch, scale)

    def mlp_input(self, x, row_stats, w_gate_up, eps):
        return reference.gate_up_silu(x, w_gate_up, row_stats, eps)


def select_backend(device: torch.device | str, kind: str = "auto") -> Backend:
    """Triton on CUDA (unless kind='torch'), the torch reference elsewhere."""
    device = torch.device(device)
    if kind == "torch" or (kind == "auto" and device.type != "cuda"):
        return TorchBackend()
    if kind in ("auto", "triton"):
        try:
            from fusionserve.kernels.triton_backend import TritonBackend
        except ImportError as exc:  # pragma: no cover - depends on the install
            if kind == "triton":
                raise RuntimeError(f"Triton backend unavailable: {exc}") from exc
            return TorchBackend()
        return TritonBackend()
    raise ValueError(f"unknown backend {kind!r} (expected auto, torch or triton)")
