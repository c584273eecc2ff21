"""The Triton backend's LayerNorm (GPT-NeoX) operations, mixed into TritonBackend.

Decode sizes (M ≤ small_m_max): every consumer GEMM applies the deferred LayerNorm in its epilogue
(kernels/layernorm_linear.py: the mean through W's column sums, 1/σ from the producer's shifted
statistics, the folded bias, GELU for the MLP's up projection), and every producer (o_proj, the MLP's
down projection) writes its output's packed statistics from the same epilogue. Larger M: cuBLAS
writes the fp32 accumulator and one row pass applies the same epilogue (reference.ln_linear's
arithmetic), so the mean correction never cancels against a bf16-rounded product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusionserve.kernels import reference
from fusionserve.kernels.batch import LayerKV, Rotary
from fusionserve.kernels.layernorm_linear import linear_layernorm
from fusionserve.kernels.rope_kv import rope_kv_write


class LayerNormOps:
    """LayerNorm-model operations of TritonBackend (which provides geometry, tiles, _small, _pdl*)."""

    def ln_embedding(self, ids: torch.Tensor, table: torch.Tensor, want_stats: bool):
        x = F.embedding(ids, table)
        return x, (reference.ln_stats(x) if want_stats else None)

    def layernorm(self, x: torch.Tensor) -> torch.Tensor:
        """The 'off' path's explicit norm: torch's fused LayerNorm kernel (no affine: folded)."""
        return F.layer_norm(x, (x.shape[-1],), eps=self.geometry.eps)

    #: Rows up to which a *fused* LayerNorm GEMM stays on the Triton kernel (its epilogue does the
    #: norm); the unfused path takes cuBLAS past small_m_max, its own best.
    LN_FUSED_MAX_M = 128

    def _fused_small(self, x: torch.Tensor, fused: bool) -> bool:
        return self._small(x) or (fused and x.shape[0] <= self.LN_FUSED_MAX_M)

    def ln_linear(self, x, weight, col_sums=None, bias=None, residual=None, row_stats=None, want_stats=False):
        if self._fused_small(x, row_stats is not None or want_stats):
            return linear_layernorm(
                x, weight, col_sums, bias, row_stats, self.geometry.eps, residual, want_stats,
                config=self.tiles, pdl=self._pdl_policy,
            )  # fmt: skip
        return self._ln_large(x, weight, col_sums, bias, residual, row_stats, want_stats)

    def gelu_mlp_input(self, x, row_stats, w_up, c_up, b_up):
        g = self.geometry
        if self._fused_small(x, row_stats is not None):
            y, _ = linear_layernorm(
                x, w_up, c_up, b_up, row_stats, g.eps, gelu=g.gelu, config=self.tiles, pdl=self._pdl_policy
            )
            return y
        return self._ln_large(x, w_up, c_up, b_up, None, row_stats, False, gelu=g.gelu)[0]

    def ln_attn_input(self, x, row_stats, w_qkv, c_qkv, b_qkv, rotary: Rotary, kv: LayerKV) -> torch.Tensor:
        g = self.geometry
        qkv, _ = self.ln_linear(x, w_qkv, c_qkv, b_qkv, row_stats=row_stats)
        return rope_kv_write(qkv, rotary, kv, g, pdl=self._pdl(x))  # partial rotary: the table's width

    def ln_lm_head(self, x, row_stats, weight, col_sums, bias) -> torch.Tensor:
        """fp32 logits through the (deferred) final LayerNorm and its folded bias."""
        if self._fused_small(x, row_stats is not None):
            out = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=torch.float32)
            linear_layernorm(
                x, weight, col_sums, bias, row_stats, self.geometry.eps, config=self.tiles, out=out,
                pdl=self._pdl_policy,
            )  # fmt: skip
            return out
        return self._ln_large(x, weight, col_sums, bias, None, row_stats, False, out_dtype=torch.float32)[0]

    def _ln_large(
        self, x, weight, col_sums, bias, residual, row_stats, want_stats, gelu=None, out_dtype=None
    ):
        """cuBLAS into fp32, then the epilogue as torch row ops (prefill-sized M)."""
        from fusionserve.kernels.triton_backend import mm_fp32_out

        if row_stats is None and not want_stats and out_dtype is None:  # unfused: cuBLAS as it comes
            y = F.linear(x, weight, bias)
            if residual is not None:
                y += residual
            return (F.gelu(y, approximate=gelu) if gelu is not None else y), None
        acc = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=torch.float32)
        mm_fp32_out(x, weight, acc)
        k, eps = x.shape[-1], self.geometry.eps
        return reference.ln_epilogue(
            acc, k, col_sums, bias, residual, row_stats, eps, want_stats, out_dtype or x.dtype, gelu
        )
