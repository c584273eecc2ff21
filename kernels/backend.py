"""The one seam between the decoder and the kernels.

The decoder calls only these operations; a backend decides how to run them. The torch backend
(CPU, tests) composes kernels/reference.py; the Triton backend (CUDA) runs the fused deferred-norm
kernels. Both take `row_stats` with the same meaning (see kernels/reference.py), so fusion on/off is
one flag in the model and never a second code path per device. The model's geometry (heads, head
size, eps, softmax scale) is bound when the backend is built; a call passes only tensors and the
step's small typed records (Rotary, LayerKV, PagedBatch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from fusionserve.kernels import reference
from fusionserve.kernels.batch import Draw, Geometry, LayerKV, PagedBatch, Rotary

Stats = torch.Tensor | None  # a producer's per-row statistics (reference.py), None on the unfused path


class Backend(Protocol):
    name: str
    geometry: Geometry
    #: whether a decode step can be captured into a CUDA graph: no host reads of device data
    graph_capturable: bool

    def embedding(
        self, ids: torch.Tensor, table: torch.Tensor, want_stats: bool
    ) -> tuple[torch.Tensor, Stats]: ...

    def rmsnorm(self, x: torch.Tensor) -> torch.Tensor: ...

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        row_stats: Stats = None,
        want_stats: bool = False,
        x_stats: Stats = None,
    ) -> tuple[torch.Tensor, Stats]:
        """x W^T (+ bias) (+ residual), optionally row-scaled / emitting Σy² (kernels/reference.py).
        `x_stats`: what the GEMM itself needs of an un-normalized x, as mlp_input handed it on (an
        FP8 weight's per-token scale: max|x| partials); None: measured here if needed.

        `residual` is consumed: a backend may write the result into it (the residual stream is
        never read again once the next h exists), which saves a copy of it per large-M GEMM."""
        ...

    def lm_head(
        self, x: torch.Tensor, weight: torch.Tensor, row_stats: Stats = None, draw: Draw | None = None
    ) -> torch.Tensor:
        """Logits [M, V] in fp32 from the GEMM's fp32 accumulator (reference.lm_head); with `draw`,
        the [M] int64 tokens drawn from those logits (FlashSampling: kernels/sampling.py)."""
        ...

    def attn_input(
        self,
        x: torch.Tensor,
        row_stats: Stats,
        w_qkv: torch.Tensor,
        b_qkv: torch.Tensor | None,
        rotary: Rotary,
        kv: LayerKV,
    ) -> torch.Tensor:
        """qkv GEMM (deferred norm) → RoPE → K/V written to the cache; returns q [T, Hq, D]."""
        ...

    def attention(self, q: torch.Tensor, kv: LayerKV, batch: PagedBatch) -> torch.Tensor: ...

    def mlp_input(
        self, x: torch.Tensor, row_stats: Stats, w_gate_up: torch.Tensor
    ) -> tuple[torch.Tensor, Stats]:
        """(silu(gate) · up, the statistics its consumer, down_proj, takes as `x_stats`: FP8's
        max|act| partials from the same epilogue, else None)."""
        ...


class TorchBackend:
    """Reference kernels in plain torch: correct everywhere, fast enough on CPU for the 135M model."""

    name = "torch"
    graph_capturable = False  # the reference kernels branch on device data (e.g. skipped KV slots)

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry

    def embedding(self, ids, table, want_stats):
        return reference.embedding(ids, table, want_stats)

    def rmsnorm(self, x):
        return reference.rmsnorm(x, self.geometry.eps)

    def linear(self, x, weight, bias=None, residual=None, row_stats=None, want_stats=False, x_stats=None):
        return reference.linear(x, weight, bias, residual, row_stats, self.geometry.eps, want_stats)

    def lm_head(self, x, weight, row_stats=None, draw=None):
        logits = reference.lm_head(x, weight, row_stats, self.geometry.eps)
        return logits if draw is None else draw_tokens(keep_flagged(logits, draw), draw)

    def attn_input(self, x, row_stats, w_qkv, b_qkv, rotary, kv):
        return reference.attn_input(x, row_stats, w_qkv, b_qkv, rotary, kv, self.geometry)

    def attention(self, q, kv, batch):
        return reference.paged_attention(q, kv.k_cache, kv.v_cache, batch, self.geometry.scale)

    # -- LayerNorm models (GPT-NeoX): statistics are (Σx, Σ(x − mean)²) per row ------------------

    def ln_embedding(self, ids, table, want_stats):
        return reference.ln_embedding(ids, table, want_stats)

    def layernorm(self, x):
        return reference.layernorm(x, self.geometry.eps)

    def ln_linear(self, x, weight, col_sums=None, bias=None, residual=None, row_stats=None, want_stats=False):
        return reference.ln_linear(
            x, weight, col_sums, bias, residual, row_stats, self.geometry.eps, want_stats
        )

    def ln_attn_input(self, x, row_stats, w_qkv, c_qkv, b_qkv, rotary, kv):
        return reference.ln_attn_input(x, row_stats, w_qkv, c_qkv, b_qkv, rotary, kv, self.geometry)

    def gelu_mlp_input(self, x, row_stats, w_up, c_up, b_up):
        g = self.geometry
        return reference.gelu_mlp_input(x, row_stats, w_up, c_up, b_up, g.eps, g.gelu)

    def ln_lm_head(self, x, row_stats, weight, col_sums, bias, draw=None):
        """fp32 logits through the (deferred) final LayerNorm and its folded bias (or, with `draw`,
        the tokens drawn from them)."""
        logits = reference.ln_linear(
            x, weight, col_sums, bias, None, row_stats, self.geometry.eps, False, torch.float32
        )[0]
        return logits if draw is None else draw_tokens(keep_flagged(logits, draw), draw)

    def mlp_input(self, x, row_stats, w_gate_up):
        return reference.gate_up_silu(x, w_gate_up, row_stats, self.geometry.eps), None


def keep_flagged(logits: torch.Tensor, draw: Draw) -> torch.Tensor:
    """A mixed step's logits where its Draw wants them (every row written: a superset of the flagged
    ones), for LM heads that compute all the logits anyway."""
    if draw.logits is not None and draw.logits.data_ptr() != logits.data_ptr():
        draw.logits.copy_(logits)
    return logits


def draw_tokens(logits: torch.Tensor, draw: Draw) -> torch.Tensor:
    """The tokens [M] a Draw picks from written fp32 logits [M, V]: on CUDA the Triton pass that shares
    the fused LM head's device helpers (kernels/sampling.py), elsewhere the torch reference; the same
    bits either way, so a fused draw and this one agree."""
    if logits.is_cuda:
        from fusionserve.kernels.sampling import gumbel_argmax_triton

        return gumbel_argmax_triton(logits, draw.temps, draw.keys, draw.random)
    if not draw.random:
        return logits.argmax(dim=-1)
    return reference.gumbel_argmax(logits, draw.temps, draw.keys)


def select_backend(
    device: torch.device | str, geometry: Geometry, kind: str = "auto", tile_cache: Path | None = None
) -> Backend:
    """Triton on CUDA (unless kind='torch'), the torch reference elsewhere. `tile_cache`: where sweeps
    cache decode-GEMM tiles per GPU model and weight format (kernels/tile_configs.tile_table_for)."""
    device = torch.device(device)
    if kind == "torch" or (kind == "auto" and device.type != "cuda"):
        return TorchBackend(geometry)
    if kind in ("auto", "triton"):
        try:
            from fusionserve.kernels.triton_backend import TritonBackend
        except ImportError as exc:  # pragma: no cover - depends on the install
            if kind == "triton":
                raise RuntimeError(f"Triton backend unavailable: {exc}") from exc
            return TorchBackend(geometry)
        from fusionserve.kernels.tile_configs import tile_table_for

        return TritonBackend(
            geometry,
            tiles=tile_table_for(device, tile_cache),
            fp8_tiles=tile_table_for(device, tile_cache, "fp8"),
        )
    raise ValueError(f"unknown backend {kind!r} (expected auto, torch or triton)")
