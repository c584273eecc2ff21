"""The Triton backend's FP8 operations (kernels/fp8.py), mixed into TritonBackend: the block's GEMMs
on e4m3 weights with per-token e4m3 activations.

Decode sizes (M ≤ small_m_max), fused: producers (o_proj, down_proj with the residual) write Σh² and
max|h| partials from one epilogue (statistics packed [M, 2P]); the qkv and gate/up GEMMs quantize h
per token inside their K loop with the scale those partials give and apply r · s_x · s_w to the fp32
accumulator: no normalized copy, no quantized copy. Inputs that no norm precedes take their max|x|
partials from their own producer's epilogue too: silu·mul's from the gate/up GEMM, the attention
output's from the decode attention kernel (all-decode steps). Mixed steps' o and the unfused path's
normalized x get theirs from one small amax pass; the GEMM still quantizes on the fly. Larger M: x is quantized once
(r folded into its scale when the norm is deferred) and cuBLASLt's FP8 GEMM (torch._scaled_mm)
runs with row-wise activation and column-wise weight scales; statistics then travel as the rows
themselves (reference.stats_are_rows). The LM head and the embedding stay in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusionserve.kernels import reference
from fusionserve.kernels.attention import paged_attention
from fusionserve.kernels.batch import LayerKV, PagedBatch, Rotary
from fusionserve.kernels.fp8 import Fp8Weight
from fusionserve.kernels.fp8_rows import amax_rows, quantize_rows
from fusionserve.kernels.norm_linear import launch
from fusionserve.kernels.rope_kv import rope_kv_write
from fusionserve.kernels.silu_mul import silu_mul
from fusionserve.kernels.tile_configs import m_bucket, pick_config


def split_fp8_stats(stats: torch.Tensor | None, x: torch.Tensor):
    """(Σx² partials or None, max|x| partials) from what a producer handed on: packed [M, 2P], the
    rows of x themselves, or nothing (x is used as it is)."""
    if stats is None:
        return None, amax_rows(x)  # the amax pass of an input no producer measured
    if reference.stats_are_rows(stats, x.shape[-1]):
        return reference.row_sumsq(stats), amax_rows(stats)
    p = stats.shape[1] // 2
    return stats[:, :p], stats[:, p:]


def scaled_mm(xq: torch.Tensor, scale_a: torch.Tensor, w: Fp8Weight, out_dtype: torch.dtype) -> torch.Tensor:
    """x_q W_qᵀ · scale_a[m] · s_w[n]: cuBLASLt's FP8 GEMM on CUDA; off CUDA (the interpreter's tests)
    the same exact products in fp32."""
    if xq.is_cuda:
        return torch._scaled_mm(
            xq, w.data.t(), scale_a=scale_a, scale_b=w.scale[None, :], out_dtype=out_dtype
        )
    return ((xq.float() @ w.data.float().t()) * scale_a * w.scale[None, :]).to(out_dtype)


class Fp8Ops:
    """FP8 GEMMs of TritonBackend (which provides geometry, tiles, fp8_tiles, _small, _pdl_policy)."""

    #: BLOCK_K multiplier of the FP8 decode GEMM over the bf16 tile table's choice: one-byte weights
    #: put half the bytes in flight per stage at the same BLOCK_K (bench/decode_pdl.py A/Bs it).
    fp8_k_factor: int = 1

    def _fp8_config(self, m: int, n: int, k: int, device, gate_up: bool):
        """FP8 tiles where the FP8 table has the shape, else the bf16 table's (or rule's) choice."""
        if (n, k, m_bucket(m), gate_up) in self.fp8_tiles:
            return pick_config(m, n, k, device, gate_up, 2, self.fp8_tiles)
        bm, bn, bk, warps, stages, split = pick_config(m, n, k, device, gate_up, 2, self.tiles)
        if self.fp8_k_factor > 1 and k >= bk * self.fp8_k_factor * split:
            bk *= self.fp8_k_factor
        return (bm, bn, bk, warps, stages, split)

    def fp8_linear(
        self,
        x: torch.Tensor,
        weight: Fp8Weight,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        row_stats: torch.Tensor | None = None,
        want_stats: bool = False,
        gate_up: bool = False,
        want_amax: bool = False,
        x_amax: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """reference.linear (or gate_up_silu) on an FP8 weight; statistics as the module says.
        `x_amax`: x's max|x| partials from its producer (the gate/up epilogue for down_proj);
        `want_amax` alone: y's max|y| partials for an un-normalized FP8 consumer."""
        eps = self.geometry.eps
        if self._small(x):
            sumsq, amax = split_fp8_stats(row_stats, x) if x_amax is None else (row_stats, x_amax)
            n = weight.shape[0] // 2 if gate_up else weight.shape[0]
            y, packed, _ = launch(
                x, weight, n, bias=bias, residual=residual, row_stats=sumsq, eps=eps,
                want_stats=want_stats, want_amax=want_stats or want_amax, gate_up=gate_up,
                config=self._fp8_config(x.shape[0], n, x.shape[1], x.device, gate_up),
                pdl=self._pdl_policy, x_amax=amax,
            )  # fmt: skip
            return y, packed
        xq, row_scale = quantize_rows(x, row_stats, eps)  # the deferred norm's r joins the row scale
        y = scaled_mm(xq, row_scale, weight, x.dtype)
        if bias is not None:
            y += bias
        if residual is not None:
            y += residual
        if gate_up:
            y = silu_mul(y)
        return y, (y if want_stats else None)  # large M: the rows are the statistics (or unneeded)

    def fp8_attn_input(self, x, row_stats, w_qkv: Fp8Weight, b_qkv, rotary: Rotary, kv: LayerKV):
        """At decode sizes RoPE and the KV write ride in the FP8 qkv GEMM's epilogue, as in bf16."""
        rope = self._rope_write(rotary, kv) if self._small(x) else None
        if rope is not None:
            sumsq, amax = split_fp8_stats(row_stats, x)
            n = w_qkv.shape[0]
            q, _, _ = launch(
                x, w_qkv, n, bias=b_qkv, row_stats=sumsq, eps=self.geometry.eps, pdl=self._pdl_policy,
                config=self._fp8_config(x.shape[0], n, x.shape[1], x.device, False), x_amax=amax, rope=rope,
            )  # fmt: skip
            return q.view(-1, self.geometry.num_heads, self.geometry.head_dim)
        qkv, _ = self.fp8_linear(x, w_qkv, b_qkv, row_stats=row_stats)
        return rope_kv_write(qkv, rotary, kv, self.geometry, pdl=self._pdl(x))

    def attention_with_amax(self, q: torch.Tensor, kv: LayerKV, batch: PagedBatch):
        """(o, its per-head max|o| [T, Hq] or None): for an FP8 o_proj at decode sizes the decode
        kernel writes the partials its per-token scale needs, so no amax pass runs before it; other
        steps measure o in the GEMM's own path (None)."""
        if not (self._small(q) and batch.is_decode_only and q.shape[0] == batch.num_seqs):
            return self.attention(q, kv, batch), None
        amax = torch.empty((q.shape[0], q.shape[1]), device=q.device, dtype=torch.float32)
        o = paged_attention(
            q, kv.k_cache, kv.v_cache, batch, self.geometry.scale, pdl=self._pdl(q), split=self.decode_split,
            amax_out=amax,
        )  # fmt: skip
        return o, amax

    def fp8_lm_head_stats(self, row_stats: torch.Tensor | None, k: int) -> torch.Tensor | None:
        """The bf16 LM head reads only the Σh² half of an FP8 producer's packed statistics."""
        if row_stats is None or reference.stats_are_rows(row_stats, k):
            return row_stats
        return row_stats[:, : row_stats.shape[1] // 2]

    def fp8_embedding(self, ids: torch.Tensor, table: torch.Tensor, want_stats: bool):
        """Layer 0's statistics are the embedding rows themselves (its consumer measures both)."""
        x = F.embedding(ids, table)
        return x, (x if want_stats else None)
