"""The Triton backend: every Backend operation on the fused deferred-norm kernels.

Decode / small M (M <= small_m_max = 32; measured: our tile loop matches or beats cuBLAS up to 32): Triton GEMMs whose epilogues carry the norm: producers (o_proj,
down_proj with the residual add) emit Σh² partials per output tile, consumers (qkv, gate_up, LM head)
scale their rows by rsqrt(Σ/K + eps). Large M: cuBLAS on raw x (the residual add fused as
torch.addmm), and the deferred scale (and bias, which must follow it) applied by the elementwise
consumer that runs anyway: RoPE + KV write for q/k/v, silu*mul for gate/up. Up to
rows_stats_max_m rows (big decode batches) the producer hands on h itself as the statistic and those
consumers square and sum its row (reference.stats_are_rows): no Σh² pass of its own, two launches
fewer per layer than the unfused path's two RMSNorms. Beyond (prefill), silu*mul's column blocks
would each re-read a row from HBM, so a per-row Σh² pass runs after the GEMM instead.

On CPU tensors this works only under TRITON_INTERPRET=1 (the tests); select_backend picks the torch
backend for CPU devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusionserve.kernels.attention import paged_attention
from fusionserve.kernels.backend import draw_tokens
from fusionserve.kernels.batch import Draw, Geometry, LayerKV, PagedBatch, RopeWrite, Rotary
from fusionserve.kernels.decode_attention import DecodeSplitPolicy
from fusionserve.kernels.embedding import embedding
from fusionserve.kernels.fp8 import Fp8Weight
from fusionserve.kernels.fp8_backend import Fp8Ops
from fusionserve.kernels.layernorm_backend import LayerNormOps
from fusionserve.kernels.norm_linear import gate_up_silu, launch
from fusionserve.kernels.norm_linear import linear as small_m_linear
from fusionserve.kernels.pdl import PdlPolicy, pdl_available
from fusionserve.kernels.reference import stats_are_rows
from fusionserve.kernels.rmsnorm import rmsnorm
from fusionserve.kernels.rmsnorm import (
    row_stats as row_pass,  # Σx² per row (the name row_stats is the argument's)
)
from fusionserve.kernels.rope_kv import rope_kv_write
from fusionserve.kernels.row_epilogue import row_epilogue
from fusionserve.kernels.silu_mul import silu_mul
from fusionserve.kernels.tile_configs import TileTable, pick_config, tile_table_for

#: FlashSampling's epilogue (an atomic max and an arrival per column tile) pays per tile: on the H200,
#: 8B batch 1, the LM head at 2,004 tiles drew as fast as the unfused pass over written logits
#: (4.10 vs 4.10 ms a step) but at 8,016 tiles it was 0.03-0.04 ms slower (4.22 vs 4.19); the 135M
#: one at 3,072 tiles 0.009 ms slower, at 384 even (bench/README.md, #22). An LM head whose tile
#: table gives more tiles than this draws from its written logits instead (same tokens).
FLASH_MAX_TILES = 2048


def mm_fp32_out(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = x Wᵀ in fp32 from cuBLAS's fp32 accumulator (bf16/fp16 inputs, no rounding of y). Off
    CUDA (the Triton interpreter's tests) the same product is computed in fp32 by torch."""
    if x.is_cuda and x.dtype != torch.float32:
        torch.mm(x, weight.t(), out_dtype=torch.float32, out=out)
    else:
        torch.mm(x.float(), weight.float().t(), out=out)


class TritonBackend(LayerNormOps, Fp8Ops):
    """`pdl`: the programmatic-dependent-launch policy of the small-M (decode) kernels (kernels/pdl.py):
    a PdlPolicy, True (the default policy), False (off) or, at construction, None (on where the GPU and
    Triton support it). Set it before capturing graphs. Large-M steps never use it: their neighbours
    are cuBLAS GEMMs, which it cannot overlap (H100: 135M batch 64 at 4k context 2% slower with it).
    `decode_split`: how decode attention splits a context (kernels/decode_attention.py); `tiles`: the
    decode GEMMs' tile table (kernels/tile_configs.py; None: the one shipped for this GPU, select_backend
    adds a table cached for it); `fp8_tiles`: the same for FP8 weights (a shape it lacks runs `tiles`'s
    choice); `rope_in_gemm`: at decode sizes the qkv GEMM's
    epilogue rotates q/k and writes the KV cache itself (False: the rope_kv kernel after it, the
    A/B). Benchmarks set these, never module globals."""

    name = "triton"
    graph_capturable = True

    def __init__(
        self,
        geometry: Geometry,
        small_m_max: int = 32,
        pdl: PdlPolicy | bool | None = None,
        rows_stats_max_m: int = 512,
        decode_split: DecodeSplitPolicy = DecodeSplitPolicy(),
        tiles: TileTable | None = None,
        rope_in_gemm: bool = True,
        fp8_tiles: TileTable | None = None,
    ):
        self.geometry = geometry
        self.decode_split = decode_split
        self.tiles = tiles if tiles is not None else tile_table_for("cuda")  # the shipped one for this GPU
        self.fp8_tiles = fp8_tiles if fp8_tiles is not None else tile_table_for("cuda", weights="fp8")
        self.small_m_max = small_m_max
        self.rows_stats_max_m = rows_stats_max_m
        self.rope_in_gemm = rope_in_gemm
        self.flash_max_tiles = FLASH_MAX_TILES
        self.pdl = pdl_available("cuda") if pdl is None else pdl

    @property
    def pdl(self) -> PdlPolicy | None:
        return self._pdl_policy

    @pdl.setter
    def pdl(self, value: PdlPolicy | bool) -> None:
        self._pdl_policy = value if isinstance(value, PdlPolicy) else (PdlPolicy() if value else None)

    def _small(self, x: torch.Tensor) -> bool:
        return x.shape[0] <= self.small_m_max

    def _pdl(self, x: torch.Tensor) -> PdlPolicy | None:
        return self._pdl_policy if self._small(x) else None

    @staticmethod
    def _partials(stats: torch.Tensor | None, k: int) -> torch.Tensor | None:
        """The small-M GEMM epilogue reads partial sums: rows of x handed on by a larger step (the LM
        head over a few rows of a medium prefill) are summed first."""
        if stats is not None and stats_are_rows(stats, k):
            return row_pass(stats)
        return stats

    def embedding(
        self, ids: torch.Tensor, table: torch.Tensor, want_stats: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.geometry.fp8:
            return self.fp8_embedding(ids, table, want_stats)
        return embedding(ids, table, want_stats, pdl=self._pdl(ids))

    def rmsnorm(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.geometry.eps, pdl=self._pdl(x))

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        row_stats: torch.Tensor | None = None,
        want_stats: bool = False,
        x_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(weight, Fp8Weight):
            return self.fp8_linear(x, weight, bias, residual, row_stats, want_stats, x_amax=x_stats)
        k, eps = x.shape[-1], self.geometry.eps
        if self._small(x):
            stats = self._partials(row_stats, k)
            return small_m_linear(
                x, weight, bias, residual, stats, eps, want_stats, self.tiles, self._pdl_policy
            )
        if row_stats is None and (bias is None or residual is None):
            # Raw cuBLAS with its own epilogue; the producer statistic is h itself (its consumers
            # square it) or, past rows_stats_max_m, one row pass over h.
            if residual is not None:  # in place: an out-of-place addmm first copies residual to y
                y = residual.addmm_(x, weight.t())
            else:
                y = F.linear(x, weight, bias)
            if not want_stats:
                return y, None
            return y, (y if y.shape[0] <= self.rows_stats_max_m else row_pass(y))
        if row_stats is not None and residual is None and not want_stats and weight.shape[0] > k:
            # A wide consumer with no elementwise pass of its own (the LM head): scaling its M x K
            # input is far cheaper than a pass over the M x N output (r x) W^T = r (x W^T).
            xs, _ = row_epilogue(x, k, row_stats, eps=eps)
            return F.linear(xs, weight, bias), None
        y = F.linear(x, weight)
        return row_epilogue(y, k, row_stats, bias, residual, eps, want_stats, out=y)

    def _small_head_plan(
        self, x: torch.Tensor, weight: torch.Tensor, draw: Draw | None
    ) -> tuple[Draw | None, torch.Tensor | None]:
        """(the Draw a small-M LM head's epilogue takes, the fp32 logits buffer it writes instead).
        FlashSampling, unless the tile table gives the head more column tiles than it pays off at
        (flash_max_tiles): then the head writes every row's logits (into the Draw's buffer, a superset
        of its flagged rows) and the caller draws from them."""
        m, n, k = x.shape[0], weight.shape[0], x.shape[-1]
        tiles = -(-n // pick_config(m, n, k, x.device, table=self.tiles)[1])
        if draw is not None and tiles <= self.flash_max_tiles:
            return draw, None
        if draw is not None and draw.logits is not None:
            return None, draw.logits
        return None, torch.empty((m, n), device=x.device, dtype=torch.float32)

    def lm_head(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        row_stats: torch.Tensor | None = None,
        draw: Draw | None = None,
    ) -> torch.Tensor:
        """fp32 logits: the small-M GEMM stores its fp32 accumulator; past small_m_max cuBLAS writes
        fp32 from its own (mm with out_dtype), then one in-place row pass (columns split over programs) applies the deferred scale
        in fp32. (Scaling the bf16 input instead, as the bf16 path does, would round r·x to bf16.)
        `draw`: the tokens instead, drawn in the small-M GEMM's epilogue (FlashSampling) or, past
        small_m_max, by one pass over the written logits."""
        m, k, eps = x.shape[0], x.shape[-1], self.geometry.eps
        if self.geometry.fp8:
            row_stats = self.fp8_lm_head_stats(row_stats, k)
        if self._small(x):
            stats = self._partials(row_stats, k)
            in_epilogue, out = self._small_head_plan(x, weight, draw)
            y, _ = small_m_linear(
                x,
                weight,
                None,
                None,
                stats,
                eps,
                False,
                self.tiles,
                self._pdl_policy,
                out=out,
                draw=in_epilogue,
            )
            return y if draw is None or in_epilogue is not None else draw_tokens(y, draw)
        out = draw.logits if draw is not None and draw.logits is not None else None
        out = (
            out
            if out is not None
            else torch.empty((m, weight.shape[0]), device=x.device, dtype=torch.float32)
        )
        mm_fp32_out(x, weight, out)
        if row_stats is not None:
            row_epilogue(out, k, row_stats, eps=eps, out=out)
        return out if draw is None else draw_tokens(out, draw)

    def attn_input(
        self,
        x: torch.Tensor,
        row_stats: torch.Tensor | None,
        w_qkv: torch.Tensor,
        b_qkv: torch.Tensor | None,
        rotary: Rotary,
        kv: LayerKV,
    ) -> torch.Tensor:
        if isinstance(w_qkv, Fp8Weight):
            return self.fp8_attn_input(x, row_stats, w_qkv, b_qkv, rotary, kv)
        eps, g = self.geometry.eps, self.geometry
        if self._small(x):
            stats = self._partials(row_stats, x.shape[-1])
            rope = self._rope_write(rotary, kv)
            if rope is not None:
                q, _, _ = launch(
                    x, w_qkv, w_qkv.shape[0], bias=b_qkv, row_stats=stats, eps=eps, config=self.tiles,
                    pdl=self._pdl_policy, rope=rope,
                )  # fmt: skip
                return q.view(-1, g.num_heads, g.head_dim)
            qkv, _ = small_m_linear(x, w_qkv, b_qkv, None, stats, eps, False, self.tiles, self._pdl_policy)
            scale_stats, bias = None, None
        else:
            qkv = F.linear(x, w_qkv)
            scale_stats, bias = row_stats, b_qkv
        return rope_kv_write(
            qkv, rotary, kv, self.geometry, row_stats=scale_stats, k=x.shape[-1], bias=bias, pdl=self._pdl(x)
        )

    def _rope_write(self, rotary: Rotary, kv: LayerKV) -> RopeWrite | None:
        """The qkv GEMM's RoPE + KV-write epilogue where it applies: full-width rotary and a half head
        that is a power of two ≥ 16 (its pair tiles); None: the separate rope_kv pass."""
        g, half = self.geometry, rotary.cos_sin.shape[-1] // 2
        if not self.rope_in_gemm or 2 * half != g.head_dim or half < 16 or half & (half - 1):
            return None
        cs = rotary.cos_sin
        if cs.dtype != torch.float32 or cs.stride(1) != 1:
            rotary = Rotary(rotary.positions, cs.float().contiguous())
        return RopeWrite(rotary, kv, g.num_heads, g.num_kv_heads, half)

    def attention(self, q: torch.Tensor, kv: LayerKV, batch: PagedBatch) -> torch.Tensor:
        return paged_attention(
            q, kv.k_cache, kv.v_cache, batch, self.geometry.scale, pdl=self._pdl(q), split=self.decode_split
        )

    def mlp_input(
        self, x: torch.Tensor, row_stats: torch.Tensor | None, w_gate_up: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(w_gate_up, Fp8Weight):  # with max|act| partials for the FP8 down projection
            return self.fp8_linear(x, w_gate_up, row_stats=row_stats, gate_up=True, want_amax=True)
        eps = self.geometry.eps
        if self._small(x):
            stats = self._partials(row_stats, x.shape[-1])
            return gate_up_silu(x, w_gate_up, stats, eps, self.tiles, self._pdl_policy), None
        return silu_mul(F.linear(x, w_gate_up), row_stats, x.shape[-1], eps), None
