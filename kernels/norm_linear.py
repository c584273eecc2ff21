"""Deferred-norm GEMMs for decode (small M): the producer epilogue emits Σh² partials, the consumer scales.

One Triton kernel, specialised by constexpr flags, covers every decode GEMM of a block:

    y[m, n] = r_m * (x @ W^T)[m, n] (+ bias[n]) (+ residual[m, n])
    r_m     = rsqrt(sum(row_stats[m, :]) / K + eps)              (RMSNorm, deferred)
    y[m, n] = r_m * ((x @ W^T)[m, n] - mu_m * c[n]) + b'[n]       (LayerNorm, deferred: mean correction)

with optional per-row partial statistics of the rounded output tile written to [M, n_tiles] fp32
buffers: exactly what the next norm would read. RMSNorm: Σy². LayerNorm: Σy and Σ(y − tile mean)²
(shifted, so a large mean cannot cancel the variance away); the consumer combines the tiles' shifted
sums exactly (Chan et al.) with their widths, derived from the tile count. An optional GELU
(exact or tanh) ends the epilogue of a GPT-NeoX MLP's up projection. The gate/up variant
computes the gate and up tiles of one column block together and stores silu(gate) * up.

Weights are [N, K] as in checkpoints (gains already folded in). Large M (prefill) stays on cuBLAS:
kernels/silu_mul.py and kernels/row_epilogue.py apply the deferred scale there; tile choices are
in kernels/tile_configs.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusionserve.kernels.batch import Draw, RopeWrite
from fusionserve.kernels.fp8 import Fp8Weight
from fusionserve.kernels.fp8_rows import amax_scale
from fusionserve.kernels.norm_stats import ln_finish, ln_prefetch, stats_finish, stats_prefetch
from fusionserve.kernels.pdl import PdlPolicy, pdl_args, pdl_trigger, pdl_wait, prefetch_l2, prefetch_lines
from fusionserve.kernels.rope_kv import rope_kv_tile
from fusionserve.kernels.sampling import SAMPLE_OFF, SampleBuffers, argmax_tiles, gumbel_scores, sample_mode
from fusionserve.kernels.split_k import split_k_reduce
from fusionserve.kernels.tile_configs import TUNED, norm_cfg, pick_config
from fusionserve.kernels.triton_env import INTERPRET, arrival_counters, next_pow2
from fusionserve.kernels.triton_helpers import cast, gelu, mma, silu, to_e4m3

PAIR_GATE_UP, PAIR_ROPE = 1, 2  # the PAIR constexpr: a second accumulator N rows on, or HALF rows on
_GATE_UP, _ROPE = tl.constexpr(PAIR_GATE_UP), tl.constexpr(PAIR_ROPE)  # the same, readable in kernels


# fmt: off
@triton.jit
def _linear_kernel(
    # operands: x, W, y; the epilogue's inputs and outputs (unused ones get a dummy)
    x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr,
    stats_ptr, sums_ptr, colsum_ptr, stats_out_ptr, sums_out_ptr,
    # split-K workspace; FP8 scales and max|x| partials
    ws_ptr, cnt_ptr, wscale_ptr, amax_ptr, amax_out_ptr,
    # FlashSampling (kernels/sampling.py); RoPE + the paged KV write (kernels/rope_kv.py)
    temp_ptr, key_ptr, argkey_ptr, scnt_ptr, ids_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, cs_ptr,
    # sizes, strides and scalars
    M, N, K, P, PA, stride_am, k_per_split, stride_xm,
    stride_wn, stride_ym, stride_rm, stride_s, stride_u, stride_so, inv_k, eps,
    TILE_W, pair_off, HQ, HK, stride_cs, stride_slot,
    # what the epilogue fuses in, then tiles and launch (constexpr)
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, LN: tl.constexpr,
    WANT_STATS: tl.constexpr, WANT_SUMS: tl.constexpr, PAIR: tl.constexpr, HEAD_D: tl.constexpr,
    HALF: tl.constexpr, GELU: tl.constexpr, W_FP8: tl.constexpr, WANT_AMAX: tl.constexpr,
    SAMPLE: tl.constexpr, SLOTS: tl.constexpr, KEEP_FLAGGED: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_PA: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
    EARLY: tl.constexpr, LATE_TRIGGER: tl.constexpr, PF_LINES: tl.constexpr, LINE: tl.constexpr,
):
    # fmt: on
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    head = 0
    if PAIR == _ROPE:  # a tile of one head's first half; its partner tile is HALF rows on
        head = pid_n // (HALF // BLOCK_N)
        offs_n = head * HEAD_D + (pid_n % (HALF // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Weight rows past N are clamped (valid memory, never stored) so the hot loop needs no N mask;
    # activation rows past M are masked: zero-filled without memory traffic.
    offs_nc = tl.where(n_mask, offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:
        k_lo = tl.program_id(2) * k_per_split * BLOCK_K  # k_per_split counts BLOCK_K blocks
        k_hi = tl.minimum(K, k_lo + k_per_split * BLOCK_K)

    if PDL and PF_LINES > 0:
        # While the producer of x still runs: pull the first PF_LINES lines of each weight row of
        # this program into L2 (weights are never written by a preceding kernel).
        pf_k = tl.minimum(k_lo + tl.arange(0, PF_LINES) * LINE, k_hi - 1)
        pf = w_ptr + offs_nc[:, None] * stride_wn + pf_k[None, :]
        prefetch_l2(pf, PDL)
        if PAIR != 0:
            prefetch_l2(pf + pair_off * stride_wn, PDL)
    pdl_wait(PDL, EARLY)

    # The deferred norm's statistics: tiny L2 reads issued before the K loop, consumed after it,
    # so their latency hides under the weight stream.
    if HAS_SCALE and not LN:
        s_pre = stats_prefetch(stats_ptr, offs_m, m_mask, stride_s, P, BLOCK_P)
    if HAS_SCALE and LN:
        l_sums, l_m2 = ln_prefetch(stats_ptr, sums_ptr, offs_m, m_mask, stride_s, stride_u, P, BLOCK_P)

    if W_FP8:  # per-token e4m3 activations: the row's scale first, from the producer's max|x| partials
        s_x = amax_scale(amax_ptr, offs_m, m_mask, stride_am, PA, BLOCK_PA)
        inv_s = 1.0 / s_x

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_nc[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    u_ptrs = w_ptrs + pair_off * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(0, tl.cdiv(k_hi - k_lo, BLOCK_K)):
        k0 = k_lo + it * BLOCK_K
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            wt = tl.load(w_ptrs)
        else:
            k_mask = (k0 + offs_k) < K
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
        if W_FP8:
            xt = to_e4m3(xt.to(tl.float32) * inv_s[:, None])
        acc = mma(acc, xt, tl.trans(wt), UPCAST, IEEE)
        if PAIR != 0:
            if EVEN_K:
                ut = tl.load(u_ptrs)
            else:
                ut = tl.load(u_ptrs, mask=k_mask[None, :], other=0.0)
            acc_u = mma(acc_u, xt, tl.trans(ut), UPCAST, IEEE)
            u_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if LATE_TRIGGER:
        pdl_trigger(PDL)

    r = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SCALE and not LN:  # LayerNorm finishes its statistics in the epilogue (ln_finish)
        r = stats_finish(s_pre, stats_ptr, offs_m, m_mask, stride_s, P, inv_k, eps, BLOCK_P)
    run = True
    if SPLIT_K > 1:
        acc, acc_u, run = split_k_reduce(
            acc, acc_u, ws_ptr, cnt_ptr, pid_m, pid_n, BLOCK_M, BLOCK_N, SPLIT_K, PAIR != 0
        )
    # The epilogue: scale (+ mean correction) → bias → residual → [silu(gate) * up] → round → store → Σ², Σ.
    if run:
        if W_FP8:  # x_q W_qᵀ · s_x · s_w: the quantization scales join the norm's in the epilogue
            acc = acc * s_x[:, None] * tl.load(wscale_ptr + offs_nc)[None, :]
            if PAIR != 0:
                acc_u = acc_u * s_x[:, None] * tl.load(wscale_ptr + pair_off + offs_nc)[None, :]
        if HAS_SCALE and LN:  # only the program that runs the epilogue combines the partials
            r, mean = ln_finish(
                l_sums,
                l_m2,
                stats_ptr,
                sums_ptr,
                offs_m,
                m_mask,
                stride_s,
                stride_u,
                P,
                K,
                TILE_W,
                inv_k,
                eps,
                BLOCK_P,
            )
        if HAS_SCALE:
            if LN:
                c = tl.load(colsum_ptr + offs_nc).to(tl.float32)
                acc = acc - mean[:, None] * c[None, :]
            acc = acc * r[:, None]
            if PAIR != 0:
                acc_u = acc_u * r[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_nc).to(tl.float32)[None, :]
            if PAIR == _ROPE:
                acc_u += tl.load(bias_ptr + pair_off + offs_nc).to(tl.float32)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if HAS_RES:
            res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
            acc += res.to(tl.float32)
        if PAIR == _GATE_UP:
            acc = silu(acc) * acc_u
        acc = gelu(acc, GELU)
        if PAIR == _ROPE:  # q out, k and v into the paged cache (kernels/rope_kv.py)
            rope_kv_tile(
                acc, acc_u, offs_m, m_mask, head, offs_n - head * HEAD_D, y_ptr, stride_ym,
                k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, cs_ptr, stride_cs, stride_slot, HQ, HK, HEAD_D, HALF,
            )  # fmt: skip
        elif SAMPLE != 0:  # FlashSampling: the token, not the logits (kernels/sampling.py)
            temp = tl.load(temp_ptr + offs_m, mask=m_mask, other=0.0)
            key = tl.load(key_ptr + offs_m, mask=m_mask, other=0)
            if KEEP_FLAGGED:  # rows with T < 0 (the sampler's, in a mixed step) also get their logits
                tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=mask & (temp < 0)[:, None])
            scores = gumbel_scores(acc, temp, key, offs_n, SAMPLE == 2)
            argmax_tiles(
                scores, offs_m, m_mask, n_mask, pid_m, pid_n, tl.num_programs(0),
                argkey_ptr, scnt_ptr, ids_ptr, BLOCK_M, BLOCK_N, SLOTS,
            )  # fmt: skip
        else:
            y = cast(acc, y_ptr.dtype.element_ty)
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask)
            if WANT_STATS:
                yf = tl.where(mask, y.to(tl.float32), 0.0)
                if WANT_SUMS:  # LayerNorm: Σy and the tile's Σ(y − its mean)²
                    tile_sum = tl.sum(yf, 1)
                    width = tl.sum(n_mask.to(tl.float32), 0)
                    dev = tl.where(mask, yf - (tile_sum / width)[:, None], 0.0)
                    tl.store(stats_out_ptr + offs_m * stride_so + pid_n, tl.sum(dev * dev, 1), mask=m_mask)
                    tl.store(sums_out_ptr + offs_m * stride_so + pid_n, tile_sum, mask=m_mask)
                else:
                    tl.store(stats_out_ptr + offs_m * stride_so + pid_n, tl.sum(yf * yf, 1), mask=m_mask)
            if WANT_AMAX:  # an FP8 consumer's per-token scale: this tile's max|y| per row
                ya = tl.where(mask, tl.abs(y.to(tl.float32)), 0.0)
                tl.store(amax_out_ptr + offs_m * stride_so + pid_n, tl.max(ya, 1), mask=m_mask)


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    n: int,
    *,
    bias=None,
    residual=None,
    row_stats=None,
    row_sums=None,
    col_sums=None,
    eps: float = 1e-6,
    want_stats: bool = False,
    want_sums: bool = False,
    gate_up: bool = False,
    gelu: int = 0,
    config=None,
    out: torch.Tensor | None = None,
    pdl: PdlPolicy | None = None,
    x_amax: torch.Tensor | None = None,
    want_amax: bool = False,
    draw: Draw | None = None,
    rope: RopeWrite | None = None,
):
    """FP8 `weight` (kernels/fp8.py): with `x_amax`, max|x| partials [M, PA]. `want_amax`: y's per-tile
    max|y| follow its statistics ([M, 2 · n_tiles]: Σy², then max|y|) for an FP8 consumer. `draw`
    (an LM head): y is the [M] int64 tokens drawn in the epilogue from the fp32 logits it would store.
    `rope` (the qkv GEMM, n = (Hq + 2 Hk)·D): y is q [M, Hq·D] rotated; k, v go rotated into the cache."""
    w_scale = amax_out = None
    if isinstance(weight, Fp8Weight):
        assert x_amax is not None, "an FP8 GEMM quantizes x per token: pass its max|x| partials"
        weight, w_scale = weight.data, weight.scale
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    m, k = x.shape
    cfg = (
        norm_cfg(config)
        if isinstance(config, tuple)
        else pick_config(m, n, k, x.device, gate_up, x.element_size(), TUNED if config is None else config)
    )
    if w_scale is not None and cfg[2] < 32:  # an e4m3 tl.dot needs BLOCK_K ≥ 32
        cfg = (*cfg[:2], 32, *cfg[3:])
    if rope is not None:  # pair tiles: BLOCK_N columns of a head's first half and their partners
        cfg = (cfg[0], min(cfg[1], rope.half), *cfg[2:])
    n_tiles = triton.cdiv(n, cfg[1])
    sample = SampleBuffers(m, n_tiles, x.device, triton.cdiv(m, cfg[0])) if draw is not None else None
    y = _output(x, n, out, sample, rope)
    y_arg = draw.logits if draw is not None and draw.logits is not None else y  # where y_ptr writes
    stats = sums = None
    if want_sums:  # LayerNorm statistics, packed [M, 2 · n_tiles]: Σy partials, then the shifted Σ²
        packed = torch.empty((m, 2 * n_tiles), device=x.device, dtype=torch.float32)
        sums, stats = packed[:, :n_tiles], packed[:, n_tiles:]
    elif want_stats or want_amax:
        packed = torch.empty((m, (want_stats + want_amax) * n_tiles), device=x.device, dtype=torch.float32)
        stats = packed[:, :n_tiles] if want_stats else None
        amax_out = packed[:, -n_tiles:] if want_amax else None
    if m == 0:
        return y, (packed if want_sums or want_amax else stats), sums
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    ln = row_sums is not None
    if ln:
        assert row_stats is not None and col_sums is not None
        row_sums = row_sums.float()
    if row_stats is not None:
        row_stats = row_stats.float()
        if row_stats.stride(1) != 1:
            row_stats = row_stats.contiguous()
    ops = _Operands(
        bias, residual, row_stats, row_sums, col_sums, stats, sums, w_scale,
        x_amax.float() if x_amax is not None else None, amax_out if want_amax else None,
        draw, sample, rope,
    )  # fmt: skip
    _run(x, weight, y_arg, n, cfg, ops, eps, PAIR_ROPE if rope else (PAIR_GATE_UP if gate_up else 0), gelu, pdl)
    return y, (packed if want_sums or want_amax else stats), sums


def _output(x: torch.Tensor, n: int, out, sample: SampleBuffers | None, rope: RopeWrite | None) -> torch.Tensor:
    """What y_ptr points at: the drawn ids, q (RoPE: K and V go to the cache), `out`, or a new [M, N]."""
    if sample is not None:
        return sample.ids
    if rope is not None:
        return torch.empty((x.shape[0], rope.num_heads * 2 * rope.half), device=x.device, dtype=x.dtype)
    return out if out is not None else torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class _Operands:
    """The optional tensors of one _linear_kernel launch (None: that part of the epilogue is off)."""

    bias: torch.Tensor | None
    residual: torch.Tensor | None
    row_stats: torch.Tensor | None  # RMSNorm Σx² partials, or LayerNorm's shifted Σ(x − mean)²
    row_sums: torch.Tensor | None  # LayerNorm's Σx partials
    col_sums: torch.Tensor | None  # LayerNorm's c = W' 1
    stats: torch.Tensor | None  # out: Σy² (or shifted) partials
    sums: torch.Tensor | None  # out: LayerNorm Σy partials
    w_scale: torch.Tensor | None  # FP8 weight scales
    x_amax: torch.Tensor | None  # FP8: max|x| partials
    amax_out: torch.Tensor | None  # out: max|y| partials
    draw: Draw | None  # FlashSampling: the rows' temperatures and keys
    sample: SampleBuffers | None  # out: its partial maxima, arrival counters and token ids
    rope: RopeWrite | None  # the qkv GEMM's RoPE + paged KV write

    def ptr(self, name: str, dummy: torch.Tensor) -> torch.Tensor:
        t = getattr(self, name)
        return t if t is not None else dummy

    def stride(self, name: str) -> int:
        t = getattr(self, name)
        return t.stride(0) if t is not None else 0


def _draw_ptrs(ops: _Operands, dummy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """temp, key, argmax-key slots, counters, ids: FlashSampling's operands (or dummies)."""
    d, s = ops.draw, ops.sample
    if d is None or s is None:
        return (dummy,) * 5
    return d.temps.float().contiguous(), d.keys.contiguous(), s.slots, s.counters, s.ids


def _rope_args(ops: _Operands, dummy: torch.Tensor) -> tuple:
    """k cache, v cache, slots, positions, cos|sin, Hq, Hk, table stride, slot stride (or dummies)."""
    r = ops.rope
    if r is None:
        return (dummy,) * 5, (0, 0, 0, 0)
    ptrs = (r.kv.k_cache, r.kv.v_cache, r.kv.slot_mapping, r.rotary.positions, r.cos_sin)
    return ptrs, (r.num_heads, r.num_kv_heads, r.cos_sin.stride(0), r.kv.k_cache.stride(1))


def _run(x, weight, y, n, cfg, ops: _Operands, eps, pair: int, gelu, pdl):
    """One launch of _linear_kernel over (N tiles, M tiles, K splits) for launch's prepared operands."""
    m, k = x.shape
    bm, bn, bk, warps, stages, split = cfg
    n_tiles, m_tiles = triton.cdiv(n, bn * (2 if pair == PAIR_ROPE else 1)), triton.cdiv(m, bm)
    ln = ops.row_sums is not None
    p = ops.row_stats.shape[1] if ops.row_stats is not None else 1
    pa = ops.x_amax.shape[1] if ops.x_amax is not None else 1
    k_per_split = triton.cdiv(triton.cdiv(k, bk), split)  # in BLOCK_K blocks
    split = triton.cdiv(k, k_per_split * bk)
    dummy = y
    if split > 1:
        ws = torch.empty(
            n_tiles * m_tiles * split * bm * bn * (2 if pair else 1), device=x.device, dtype=torch.float32
        )
        cnt = arrival_counters(x.device, n_tiles * m_tiles, "split_k", minimum=1 << 16)
    else:
        ws = cnt = dummy
    launch = pdl_args(pdl, n_tiles * m_tiles * split, x.device)
    early = launch["EARLY"]
    names = ("bias", "residual", "row_stats", "row_sums", "col_sums", "stats", "sums")
    rope_ptrs, (hq, hk, stride_cs, stride_slot) = _rope_args(ops, dummy)
    half = ops.rope.half if ops.rope is not None else 1
    _linear_kernel[(n_tiles, m_tiles, split)](
        x, weight, y, *(ops.ptr(name, dummy) for name in names), ws, cnt,
        *(ops.ptr(name, dummy) for name in ("w_scale", "x_amax", "amax_out")),
        *_draw_ptrs(ops, dummy), *rope_ptrs,
        m, n, k, p, pa, ops.stride("x_amax"), k_per_split, x.stride(0), weight.stride(0), y.stride(0),
        ops.stride("residual"), ops.stride("row_stats"), ops.stride("row_sums"),
        ops.stride("stats") or ops.stride("amax_out"),
        1.0 / k,
        eps,
        next_pow2(triton.cdiv(k, p)),  # the producer's tile width (its BLOCK_N; K for one partial)
        half if pair == PAIR_ROPE else n,  # rows from a tile to its partner tile
        hq, hk, stride_cs, stride_slot,
        HAS_BIAS=ops.bias is not None,
        HAS_RES=ops.residual is not None,
        HAS_SCALE=ops.row_stats is not None,
        LN=ln,
        WANT_STATS=ops.stats is not None,
        WANT_SUMS=ops.sums is not None,
        PAIR=pair,
        HEAD_D=2 * half,
        HALF=half,
        GELU=gelu,
        W_FP8=ops.w_scale is not None,
        WANT_AMAX=ops.amax_out is not None,
        SAMPLE=SAMPLE_OFF if ops.draw is None else sample_mode(ops.draw.temps, ops.draw.random),
        SLOTS=ops.sample.slots_per_row if ops.sample is not None else 1,
        KEEP_FLAGGED=ops.draw is not None and ops.draw.logits is not None,
        EVEN_K=k % bk == 0,
        UPCAST=INTERPRET,
        IEEE=x.dtype == torch.float32 and ops.w_scale is None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        # LayerNorm prefetches two [BLOCK_M, BLOCK_P] arrays through the K loop: cap their registers
        BLOCK_P=min(128, next_pow2(p), max(16, 2048 // bm) if ln else 128),
        BLOCK_PA=min(128, next_pow2(pa)),
        SPLIT_K=split,
        LATE_TRIGGER=pdl is not None and not early and pdl.multiwave_trigger == "late",
        PF_LINES=prefetch_lines(
            k_per_split * bk, weight.element_size(), n * (2 if pair == PAIR_GATE_UP else 1) * split, pdl, early
        ),
        LINE=128 // weight.element_size(),
        num_warps=warps,
        num_stages=stages,
        **launch,
    )  # fmt: skip


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    row_stats: torch.Tensor | None = None,
    eps: float = 1e-6,
    want_stats: bool = False,
    config=None,
    pdl: PdlPolicy | None = None,
    out: torch.Tensor | None = None,
    draw: Draw | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """reference.linear as one Triton GEMM: returns (y [M, N], Σy² partials [M, n_tiles] or None);
    with `draw` (an LM head), y is the [M] tokens drawn from the fp32 logits (kernels/sampling.py).

    `config`: a tile config (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split-K), or a tile table to
    pick from (kernels/tile_configs.py; default TUNED). `out`: where y goes, in its own dtype (the
    LM head passes an fp32 tensor: the accumulator is stored without rounding to bf16)."""
    y, stats, _ = launch(
        x,
        weight,
        weight.shape[0],
        bias=bias,
        residual=residual,
        row_stats=row_stats,
        eps=eps,
        want_stats=want_stats,
        config=config,
        pdl=pdl,
        out=out,
        draw=draw,
    )
    return y, stats


def gate_up_silu(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    row_stats: torch.Tensor | None = None,
    eps: float = 1e-6,
    config=None,
    pdl: PdlPolicy | None = None,
    x_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """reference.gate_up_silu in one kernel: silu(r * x Wg^T) * (r * x Wu^T), W = [gate; up] of [2I, K]
    (FP8 weights: with x's max|x| partials)."""
    assert w_gate_up.shape[0] % 2 == 0
    y, _, _ = launch(
        x,
        w_gate_up,
        w_gate_up.shape[0] // 2,
        row_stats=row_stats,
        eps=eps,
        gate_up=True,
        config=config,
        pdl=pdl,
        x_amax=x_amax,
    )
    return y
