"""The Triton backend's LayerNorm (GPT-NeoX) operations, mixed into TritonBackend.

Decode sizes (M ≤ small_m_max): every consumer GEMM applies the deferred LayerNorm in its epilogue
(kernels/layernorm_linear.py: the mean through W's column sums, 1/σ from the producer's shifted
statistics, the folded bias, GELU for the MLP's up projection), and every producer (o_proj, the MLP's
down projection) writes its output's packed statistics from the same epilogue. Larger M: cuBLAS
writes the fp32 accumulator and one Triton row pass applies the same epilogue
(kernels/layernorm_epilogue.py), so the mean correction never cancels against a bf16-rounded
product. Measured on the H200 (Pythia-1.4B, M = 64): our decode GEMM was ~1.5x cuBLAS's time, so
fused steps past small_m_max take cuBLAS like the unfused ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusionserve.kernels.backend import draw_tokens, keep_flagged
from fusionserve.kernels.batch import LayerKV, Rotary
from fusionserve.kernels.layernorm_epilogue import ln_row_epilogue, ln_row_stats
from fusionserve.kernels.layernorm_linear import GELU_CODES, linear_layernorm
from fusionserve.kernels.rope_kv import rope_kv_write


class LayerNormOps:
    """LayerNorm-model operations of TritonBackend (which provides geometry, tiles, _small, _pdl*,
    _small_head_plan)."""

    def ln_embedding(self, ids: torch.Tensor, table: torch.Tensor, want_stats: bool):
        x = F.embedding(ids, table)
        return x, (ln_row_stats(x) if want_stats else None)

    def layernorm(self, x: torch.Tensor) -> torch.Tensor:
        """The 'off' path's explicit norm: torch's fused LayerNorm kernel (no affine: folded)."""
        return F.layer_norm(x, (x.shape[-1],), eps=self.geometry.eps)

    def ln_linear(self, x, weight, col_sums=None, bias=None, residual=None, row_stats=None, want_stats=False):
        if self._small(x):
            return linear_layernorm(
                x, weight, col_sums, bias, row_stats, self.geometry.eps, residual, want_stats,
                config=self.tiles, pdl=self._pdl_policy,
            )  # fmt: skip
        return self._ln_large(x, weight, col_sums, bias, residual, row_stats, want_stats)

    def gelu_mlp_input(self, x, row_stats, w_up, c_up, b_up):
        g = self.geometry
        if self._small(x):
            y, _ = linear_layernorm(
                x, w_up, c_up, b_up, row_stats, g.eps, gelu=g.gelu, config=self.tiles, pdl=self._pdl_policy
            )
            return y
        return self._ln_large(x, w_up, c_up, b_up, None, row_stats, False, gelu=g.gelu)[0]

    def ln_attn_input(self, x, row_stats, w_qkv, c_qkv, b_qkv, rotary: Rotary, kv: LayerKV) -> torch.Tensor:
        g = self.geometry
        qkv, _ = self.ln_linear(x, w_qkv, c_qkv, b_qkv, row_stats=row_stats)
        return rope_kv_write(qkv, rotary, kv, g, pdl=self._pdl(x))  # partial rotary: the table's width

    def ln_lm_head(self, x, row_stats, weight, col_sums, bias, draw=None) -> torch.Tensor:
        """fp32 logits through the (deferred) final LayerNorm and its folded bias; with `draw`, the
        tokens drawn from them (in the small-M GEMM's epilogue: FlashSampling)."""
        if self._small(x):
            in_epilogue, out = self._small_head_plan(x, weight, draw)
            y, _ = linear_layernorm(
                x, weight, col_sums, bias, row_stats, self.geometry.eps, config=self.tiles, out=out,
                pdl=self._pdl_policy, draw=in_epilogue,
            )  # fmt: skip
            return y if draw is None or in_epilogue is not None else draw_tokens(y, draw)
        logits = self._ln_large(x, weight, col_sums, bias, None, row_stats, False, out_dtype=torch.float32)[0]
        return logits if draw is None else draw_tokens(keep_flagged(logits, draw), draw)

    def _ln_large(
        self, x, weight, col_sums, bias, residual, row_stats, want_stats, gelu=None, out_dtype=None
    ):
        """cuBLAS into fp32, then the epilogue in one row pass (prefill-sized M)."""
        from fusionserve.kernels.triton_backend import mm_fp32_out

        if row_stats is None and out_dtype is None:  # no mean correction: cuBLAS as it comes
            y = F.linear(x, weight, bias)
            if residual is not None:
                y += residual
            y = F.gelu(y, approximate=gelu) if gelu is not None else y
            return y, (ln_row_stats(y) if want_stats else None)  # a producer's: one read of y
        acc = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=torch.float32)
        mm_fp32_out(x, weight, acc)
        out = acc if out_dtype == torch.float32 else None  # fp32 logits: in place
        k, eps = x.shape[-1], self.geometry.eps
        return ln_row_epilogue(
            acc, k, col_sums, bias, residual, row_stats, eps, want_stats, out, x.dtype, GELU_CODES[gelu]
        )
