"""Device helpers every Triton kernel here shares: rounding casts, the fp32-accumulating dot, SiLU,
and the deferred-norm row scale a consumer computes from its producer's statistics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.reference import stats_are_rows
from fusionserve.kernels.triton_env import INTERPRET, next_pow2

_ROUND_FIX = tl.constexpr(INTERPRET)


@triton.jit
def cast(x, ty: tl.constexpr):
    """x.to(ty), rounding to nearest even also in the interpreter (whose fp32 -> bf16 cast truncates)."""
    if _ROUND_FIX and ty == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def row_scale(stats_ptr, row, P, stride_s, inv_k, eps, BLOCK_P: tl.constexpr, FROM_ROWS: tl.constexpr):
    """rsqrt(Σ/K + eps) for one row: Σ of its P partial sums of squares, or (FROM_ROWS) of the squares
    of its K values of x itself (reference.stats_are_rows)."""
    ss = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        v = tl.load(stats_ptr + row * stride_s + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)
        if FROM_ROWS:
            v = v * v
        ss += v
    return tl.math.rsqrt(tl.sum(ss, 0) * inv_k + eps)


def stats_operand(row_stats: torch.Tensor | None, k: int) -> tuple[torch.Tensor | None, int, int, bool, int]:
    """A consumer kernel's view of `row_stats`: (tensor, P, row stride, FROM_ROWS, BLOCK_P). Partials go
    in as fp32; rows of x as they are (no cast pass)."""
    if row_stats is None:
        return None, 1, 0, False, 1
    if stats_are_rows(row_stats, k):
        if row_stats.stride(-1) != 1:
            row_stats = row_stats.contiguous()
        return row_stats, k, row_stats.stride(0), True, min(256 if INTERPRET else 1024, next_pow2(k))
    row_stats = row_stats.float().contiguous()
    p = row_stats.shape[1]
    return row_stats, p, row_stats.stride(0), False, min(128, next_pow2(p))


@triton.jit
def mma(acc, a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b in fp32. UPCAST works around the interpreter's broken bf16 dot; IEEE keeps fp32 exact."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def silu(g):
    """g * sigmoid(g) without overflow: exp of a non-positive argument only."""
    e = tl.exp(-tl.abs(g))
    return g * tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def gelu(x, MODE: tl.constexpr):
    """GELU of an fp32 tensor in a GPT-NeoX epilogue: MODE 0 none, 1 exact (erf), 2 the tanh form
    (kernels/layernorm_linear.GELU_CODES)."""
    if MODE == 1:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    if MODE == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    return x


_E4M3_EMULATE = tl.constexpr(INTERPRET)


@triton.jit
def to_e4m3(x):
    """fp32 → e4m3, round to nearest even, saturating at ±448. The interpreter's own cast mis-rounds
    (0.4867 → 0.25), so there the value is rounded onto the e4m3 grid in fp32 instead (3 mantissa
    bits, subnormal step 2^-9) and stays fp32: every e4m3 value is exact in it, and the interpreter's
    dot runs in fp32 anyway."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if _E4M3_EMULATE:
        e = ((x.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
        step = ((tl.maximum(e, -6) + 124) << 23).to(tl.uint32).to(tl.float32, bitcast=True)  # 2^(e-3)
        return ((x / step + 12582912.0) - 12582912.0) * step  # 1.5·2^23: fp32 adds round to even
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")
