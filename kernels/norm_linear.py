"""Deferred-norm GEMMs for decode (small M): the producer epilogue emits Σh² partials, the consumer scales.

One Triton kernel, specialised by constexpr flags, covers every decode GEMM of a block:

    y[m, n] = r_m * (x @ W^T)[m, n] (+ bias[n]) (+ residual[m, n])
    r_m     = rsqrt(sum(row_stats[m, :]) / K + eps)              (RMSNorm, deferred)
    y[m, n] = r_m * ((x @ W^T)[m, n] - mu_m * c[n]) + b'[n]       (LayerNorm, deferred: mean correction)

with optional per-row partial sums of squares (and sums, for LayerNorm) of the rounded output tile
written to a [M, n_tiles] fp32 buffer: exactly what the next norm would read. The gate/up variant
computes the gate and up tiles of one column block together and stores silu(gate) * up.

Weights are [N, K] as in checkpoints (gains already folded in). Large M (prefill) stays on cuBLAS:
`silu_mul` and `row_epilogue` are the elementwise consumers that apply the deferred scale there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.pdl import PdlPolicy, pdl_args, pdl_trigger, pdl_wait, prefetch_l2
from fusionserve.kernels.reference import stats_are_rows
from fusionserve.kernels.triton_env import INTERPRET, arrival_counters, next_pow2, sm_count

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
def _stats_prefetch(
    stats_ptr, sums_ptr, offs_m, m_mask, stride_s, stride_u, P, LN: tl.constexpr, BLOCK_P: tl.constexpr
):
    """Issue the loads of the first BLOCK_P partials per row; nothing waits for them until they are used."""
    offs_p = tl.arange(0, BLOCK_P)
    pm = m_mask[:, None] & (offs_p[None, :] < P)
    s = tl.load(stats_ptr + offs_m[:, None] * stride_s + offs_p[None, :], mask=pm, other=0.0)
    u = s
    if LN:
        u = tl.load(sums_ptr + offs_m[:, None] * stride_u + offs_p[None, :], mask=pm, other=0.0)
    return s, u


@triton.jit
def _stats_finish(
    s,
    u,
    stats_ptr,
    sums_ptr,
    offs_m,
    m_mask,
    stride_s,
    stride_u,
    P,
    inv_k,
    eps,
    LN: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Per-row deferred norm (rsqrt scale, mean) from the prefetched and any remaining partials."""
    ss = tl.sum(s, 1)
    su = tl.sum(u, 1)
    for p0 in range(BLOCK_P, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pm = m_mask[:, None] & (offs_p[None, :] < P)
        ss += tl.sum(tl.load(stats_ptr + offs_m[:, None] * stride_s + offs_p[None, :], mask=pm, other=0.0), 1)
        if LN:
            su += tl.sum(
                tl.load(sums_ptr + offs_m[:, None] * stride_u + offs_p[None, :], mask=pm, other=0.0), 1
            )
    if LN:
        mean = su * inv_k
        var = tl.maximum(ss * inv_k - mean * mean, 0.0)
        return tl.math.rsqrt(var + eps), mean
    else:
        return tl.math.rsqrt(ss * inv_k + eps), su


@triton.jit
def _epilogue(
    acc,
    acc_u,
    r,
    mean,
    offs_m,
    offs_n,
    offs_nc,
    m_mask,
    n_mask,
    pid_n,
    y_ptr,
    bias_ptr,
    res_ptr,
    colsum_ptr,
    stats_out_ptr,
    sums_out_ptr,
    stride_ym,
    stride_rm,
    stride_so,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    LN: tl.constexpr,
    WANT_STATS: tl.constexpr,
    WANT_SUMS: tl.constexpr,
    GATE_UP: tl.constexpr,
):
    """scale (+ mean correction) → bias → residual → [silu(gate) * up] → round → store → Σ², Σ partials."""
    if HAS_SCALE:
        if LN:
            c = tl.load(colsum_ptr + offs_nc).to(tl.float32)
            acc = acc - mean[:, None] * c[None, :]
        acc = acc * r[:, None]
        if GATE_UP:
            acc_u = acc_u * r[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_nc).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        acc += res.to(tl.float32)
    if GATE_UP:
        acc = silu(acc) * acc_u
    y = cast(acc, y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask)
    if WANT_STATS:
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        tl.store(stats_out_ptr + offs_m * stride_so + pid_n, tl.sum(yf * yf, 1), mask=m_mask)
        if WANT_SUMS:
            tl.store(sums_out_ptr + offs_m * stride_so + pid_n, tl.sum(yf, 1), mask=m_mask)


@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    bias_ptr,
    res_ptr,
    stats_ptr,
    sums_ptr,
    colsum_ptr,
    stats_out_ptr,
    sums_out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    P,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_rm,
    stride_s,
    stride_u,
    stride_so,
    inv_k,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    LN: tl.constexpr,
    WANT_STATS: tl.constexpr,
    WANT_SUMS: tl.constexpr,
    GATE_UP: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
    LATE_TRIGGER: tl.constexpr,
    PF_LINES: tl.constexpr,
    LINE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
        if GATE_UP:
            prefetch_l2(pf + N * stride_wn, PDL)
    pdl_wait(PDL, EARLY)

    # The deferred norm's statistics: tiny L2 reads issued before the K loop, consumed after it,
    # so their latency hides under the weight stream.
    if HAS_SCALE:
        s_pre, u_pre = _stats_prefetch(
            stats_ptr, sums_ptr, offs_m, m_mask, stride_s, stride_u, P, LN, BLOCK_P
        )

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_nc[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    u_ptrs = w_ptrs + N * stride_wn
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
        acc = mma(acc, xt, tl.trans(wt), UPCAST, IEEE)
        if GATE_UP:
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
    if HAS_SCALE:
        r, mean = _stats_finish(
            s_pre, u_pre, stats_ptr, sums_ptr, offs_m, m_mask, stride_s, stride_u, P, inv_k, eps, LN, BLOCK_P
        )
    if SPLIT_K == 1:
        _epilogue(
            acc, acc_u, r, mean, offs_m, offs_n, offs_nc, m_mask, n_mask, pid_n, y_ptr, bias_ptr, res_ptr,
            colsum_ptr, stats_out_ptr, sums_out_ptr, stride_ym, stride_rm, stride_so,
            HAS_BIAS, HAS_RES, HAS_SCALE, LN, WANT_STATS, WANT_SUMS, GATE_UP,
        )  # fmt: skip
    else:
        # Split-K without a second launch: every split parks its fp32 tile in the workspace and bumps
        # the tile's counter; the last to arrive sums the tiles in split order (deterministic), runs
        # the epilogue and re-arms the counter (so CUDA-graph replays start from zero).
        tile = pid_m * tl.num_programs(0) + pid_n
        TILE: tl.constexpr = BLOCK_M * BLOCK_N * (2 if GATE_UP else 1)
        idx = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        base = ws_ptr + tile.to(tl.int64) * (SPLIT_K * TILE)
        mine = base + tl.program_id(2) * TILE
        tl.store(mine + idx, acc)
        if GATE_UP:
            tl.store(mine + BLOCK_M * BLOCK_N + idx, acc_u)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(base + s * TILE + idx, cache_modifier=".cg")
                if GATE_UP:
                    acc_u += tl.load(base + s * TILE + BLOCK_M * BLOCK_N + idx, cache_modifier=".cg")
            tl.store(cnt_ptr + tile, 0)
            _epilogue(
                acc, acc_u, r, mean, offs_m, offs_n, offs_nc, m_mask, n_mask, pid_n, y_ptr, bias_ptr, res_ptr,
                colsum_ptr, stats_out_ptr, sums_out_ptr, stride_ym, stride_rm, stride_so,
                HAS_BIAS, HAS_RES, HAS_SCALE, LN, WANT_STATS, WANT_SUMS, GATE_UP,
            )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Tile configs. Decode GEMMs are weight-bandwidth bound: pick BLOCK_N so the grid covers the SMs
# several times over, BLOCK_K and stages so enough weight bytes are in flight per SM.
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)
Config = tuple[int, int, int, int, int, int]

# Measured winners per (N, K, M bucket, gate_up) on H100 (bench/kernels.py --sweep); heuristic otherwise.
TUNED: dict[tuple[int, int, int, bool], Config] = {
    # H100 80GB HBM3, torch 2.11 / triton 3.6, bench/kernels.py --sweep (CUDA graphs, rotating weights)
    (4096, 14336, 16, False): (16, 16, 128, 2, 4, 2),
    (4096, 14336, 32, False): (32, 32, 128, 4, 4, 2),
    # (4096, 4096) and (6144, 4096) at M <= 16: bench/decode_configs.py (whole 8B step with PDL), two rounds
    (4096, 4096, 16, False): (16, 16, 256, 2, 4, 2),
    (4096, 4096, 32, False): (32, 32, 256, 4, 4, 1),
    (6144, 4096, 16, False): (16, 16, 256, 2, 4, 1),
    (6144, 4096, 32, False): (32, 16, 128, 2, 4, 1),
    (14336, 4096, 16, True): (16, 64, 256, 4, 3, 1),
    (14336, 4096, 32, True): (32, 64, 128, 4, 4, 1),
    (28672, 4096, 16, False): (16, 64, 256, 4, 3, 1),
    (28672, 4096, 32, False): (32, 64, 256, 4, 3, 1),
    (128256, 4096, 16, False): (16, 16, 512, 4, 3, 1),
    (128256, 4096, 32, False): (32, 64, 128, 4, 4, 1),
    (576, 576, 16, False): (16, 16, 64, 4, 6, 1),
    (576, 576, 32, False): (32, 16, 64, 4, 6, 1),
    (576, 1536, 16, False): (16, 32, 64, 4, 6, 4),
    (576, 1536, 32, False): (32, 32, 128, 4, 4, 4),
    (960, 576, 16, False): (16, 16, 64, 4, 6, 1),
    (960, 576, 32, False): (32, 16, 64, 4, 6, 1),
    (1536, 576, 16, True): (16, 32, 64, 4, 6, 1),
    (1536, 576, 32, True): (32, 16, 64, 4, 6, 1),
    (3072, 576, 16, False): (16, 32, 64, 4, 6, 1),
    (3072, 576, 32, False): (32, 32, 64, 4, 6, 1),
    (49152, 576, 16, False): (16, 16, 128, 2, 4, 1),
    (49152, 576, 32, False): (32, 128, 64, 4, 4, 1),
}


def m_bucket(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _norm_cfg(cfg) -> Config:
    return tuple(cfg) + (1,) * (6 - len(cfg))  # type: ignore[return-value]


def smem_bytes(cfg, elt: int, gate_up: bool) -> int:
    bm, bn, bk, _, stages, _ = _norm_cfg(cfg)
    return max(1, stages - 1) * (bm + bn * (2 if gate_up else 1)) * bk * elt


def _fit(cfg, elt: int, gate_up: bool, limit: int = 160 * 1024) -> Config:
    """Shrink stages, then BLOCK_K, until the pipelined tiles fit in shared memory."""
    bm, bn, bk, warps, stages, split = _norm_cfg(cfg)
    while smem_bytes((bm, bn, bk, warps, stages), elt, gate_up) > limit:
        if stages > 2:
            stages -= 1
        elif bk > 32:
            bk //= 2
        else:
            break
    return (bm, bn, bk, warps, stages, split)


def pick_config(m: int, n: int, k: int, device: torch.device, gate_up: bool = False, elt: int = 2) -> Config:
    """n = output columns (I for gate/up). Tuned table first, else: enough CTAs to cover the SMs twice."""
    if INTERPRET or device.type != "cuda":
        return (16, 16, 32, 1, 1, 1)
    bm = m_bucket(m)
    hit = TUNED.get((n, k, bm, gate_up))
    if hit is not None:
        return _fit(hit, elt, gate_up)
    sms = sm_count(device)
    m_tiles = -(-m // bm)
    bn = 16
    for cand in (64, 32):
        if -(-n // cand) * m_tiles >= 2 * sms and cand * (2 if gate_up else 1) <= 128:
            bn = cand
            break
    bk = 256 if bm <= 16 else 128
    if k < bk:
        bk = max(32, next_pow2(k) // 2)
    ctas = -(-n // bn) * m_tiles
    split = 1
    while ctas * split < sms and k // (bk * split * 2) >= 2:
        split *= 2
    return _fit((bm, bn, bk, 4, 4, split), elt, gate_up)


def _launch(
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
    config=None,
    out: torch.Tensor | None = None,
    pdl: PdlPolicy | None = None,
):
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    m, k = x.shape
    cfg = (
        _norm_cfg(config) if config is not None else pick_config(m, n, k, x.device, gate_up, x.element_size())
    )
    bm, bn, bk, warps, stages, split = cfg
    n_tiles = triton.cdiv(n, bn)
    m_tiles = triton.cdiv(m, bm)
    y = out if out is not None else torch.empty((m, n), device=x.device, dtype=x.dtype)
    stats = sums = None
    if want_stats or want_sums:
        stats = torch.empty((m, n_tiles), device=x.device, dtype=torch.float32)
    if want_sums:
        sums = torch.empty((m, n_tiles), device=x.device, dtype=torch.float32)
    if m == 0:
        return y, stats, sums
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
    p = row_stats.shape[1] if row_stats is not None else 1
    k_per_split = triton.cdiv(triton.cdiv(k, bk), split)  # in BLOCK_K blocks
    split = triton.cdiv(k, k_per_split * bk)
    dummy = y
    if split > 1:
        ws = torch.empty(
            n_tiles * m_tiles * split * bm * bn * (2 if gate_up else 1), device=x.device, dtype=torch.float32
        )
        cnt = arrival_counters(x.device, n_tiles * m_tiles, "split_k", minimum=1 << 16)
    else:
        ws = cnt = dummy
    launch = pdl_args(pdl, n_tiles * m_tiles * split, x.device)
    early = launch["EARLY"]
    _linear_kernel[(n_tiles, m_tiles, split)](
        x,
        weight,
        y,
        bias if bias is not None else dummy,
        residual if residual is not None else dummy,
        row_stats if row_stats is not None else dummy,
        row_sums if ln else dummy,
        col_sums if ln else dummy,
        stats if stats is not None else dummy,
        sums if sums is not None else dummy,
        ws,
        cnt,
        m,
        n,
        k,
        p,
        k_per_split,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        residual.stride(0) if residual is not None else 0,
        row_stats.stride(0) if row_stats is not None else 0,
        row_sums.stride(0) if ln else 0,
        stats.stride(0) if stats is not None else 0,
        1.0 / k,
        eps,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        HAS_SCALE=row_stats is not None,
        LN=ln,
        WANT_STATS=stats is not None,
        WANT_SUMS=sums is not None,
        GATE_UP=gate_up,
        EVEN_K=k % bk == 0,
        UPCAST=INTERPRET,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_P=min(128, next_pow2(p)),
        SPLIT_K=split,
        LATE_TRIGGER=pdl is not None and not early and pdl.multiwave_trigger == "late",
        PF_LINES=prefetch_lines(
            k_per_split * bk, x.element_size(), n * (2 if gate_up else 1) * split, pdl, early
        ),
        LINE=128 // x.element_size(),
        num_warps=warps,
        num_stages=stages,
        **launch,
    )
    return y, stats, sums


def prefetch_lines(span: int, elt: int, rows: int, policy: PdlPolicy | None, early: bool = True) -> int:
    """128-byte lines per weight row (of `rows` in all, K splits counted) to prefetch before the PDL
    wait: the whole K span of a program, within the policy's lines per row and bytes per GEMM; none
    without PDL, or for a grid of several waves (`early` False) if the policy says so."""
    if policy is None or not (early or policy.prefetch_multiwave):
        return 0
    cap = min(policy.prefetch_lines_max, policy.prefetch_budget // max(1, rows * 128))
    if cap < 1:
        return 0
    return min(1 << (cap.bit_length() - 1), next_pow2(-(-span * elt // 128)))


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """reference.linear as one Triton GEMM: returns (y [M, N], Σy² partials [M, n_tiles] or None)."""
    y, stats, _ = _launch(
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
    )
    return y, stats


def gate_up_silu(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    row_stats: torch.Tensor | None = None,
    eps: float = 1e-6,
    config=None,
    pdl: PdlPolicy | None = None,
) -> torch.Tensor:
    """reference.gate_up_silu in one kernel: silu(r * x Wg^T) * (r * x Wu^T), W = [gate; up] of [2I, K]."""
    assert w_gate_up.shape[0] % 2 == 0
    y, _, _ = _launch(
        x,
        w_gate_up,
        w_gate_up.shape[0] // 2,
        row_stats=row_stats,
        eps=eps,
        gate_up=True,
        config=config,
        pdl=pdl,
    )
    return y


def linear_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    col_sums: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    row_stats: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    want_stats: bool = False,
    config=None,
    pdl: PdlPolicy | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Deferred LayerNorm: y = rsqrt(var + eps) * (x W'^T - mean * c) + b' (+ residual).

    W' = W diag(gamma), c = W' 1 (`col_sums`, fp32 [N]) and b' = W beta + b (`bias`) are precomputed at
    load; row_stats / row_sums are the producer's Σx² and Σx partials. Returns (y, Σy² partials,
    Σy partials) when want_stats, for a following LayerNorm.
    """
    if row_stats is not None:
        assert row_sums is not None and col_sums is not None
    y, stats, sums = _launch(
        x,
        weight,
        weight.shape[0],
        bias=bias,
        residual=residual,
        row_stats=row_stats,
        row_sums=row_sums,
        col_sums=col_sums.float() if col_sums is not None else None,
        eps=eps,
        want_sums=want_stats,
        config=config,
        pdl=pdl,
    )
    return y, stats, sums


# ----------------------------------------------------------------------------------------------------
# Large-M consumers (cuBLAS did the GEMM on raw x; these elementwise kernels run anyway).


@triton.jit
def _silu_mul_kernel(
    gu_ptr,
    out_ptr,
    stats_ptr,
    n_half,
    P,
    stride_g,
    stride_o,
    stride_s,
    inv_k,
    eps,
    HAS_SCALE: tl.constexpr,
    FROM_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_half
    g = tl.load(gu_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + n_half + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        r = row_scale(stats_ptr, row, P, stride_s, inv_k, eps, BLOCK_P, FROM_ROWS)
        g = g * r
        u = u * r
    y = silu(g) * u
    tl.store(out_ptr + row * stride_o + offs, cast(y, out_ptr.dtype.element_ty), mask=mask)


def silu_mul(
    gate_up: torch.Tensor, row_stats: torch.Tensor | None = None, k: int = 1, eps: float = 1e-6
) -> torch.Tensor:
    """silu(r*gate) * (r*up) of a [T, 2I] GEMM output; r = rsqrt(Σ row_stats / k + eps) when given."""
    t, two_i = gate_up.shape
    i = two_i // 2
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((t, i), device=gate_up.device, dtype=gate_up.dtype)
    if t == 0:
        return out
    stats, p, stride_s, from_rows, block_p = stats_operand(row_stats, k)
    block = min(1024 if not INTERPRET else 256, next_pow2(i))
    _silu_mul_kernel[(t, triton.cdiv(i, block))](
        gate_up,
        out,
        stats if stats is not None else out,
        i,
        p,
        gate_up.stride(0),
        out.stride(0),
        stride_s,
        1.0 / k,
        eps,
        HAS_SCALE=stats is not None,
        FROM_ROWS=from_rows,
        BLOCK=block,
        BLOCK_P=block_p,
        num_warps=4,
    )
    return out


@triton.jit
def _row_epilogue_kernel(
    y_ptr,
    out_ptr,
    bias_ptr,
    res_ptr,
    stats_ptr,
    stats_out_ptr,
    N,
    P,
    stride_y,
    stride_o,
    stride_r,
    stride_s,
    inv_k,
    eps,
    HAS_SCALE: tl.constexpr,
    FROM_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    WANT_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)
    if HAS_SCALE:
        r = row_scale(stats_ptr, row, P, stride_s, inv_k, eps, BLOCK_P, FROM_ROWS)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        mask = offs < N
        v = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * r
        if HAS_BIAS:
            v += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            v += tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        o = cast(v, out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_o + offs, o, mask=mask)
        if WANT_STATS:
            of = tl.where(mask, o.to(tl.float32), 0.0)
            acc_sq += of * of
    if WANT_STATS:
        tl.store(stats_out_ptr + row, tl.sum(acc_sq, 0))


def row_epilogue(
    y: torch.Tensor,
    k: int,
    row_stats: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    want_stats: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GEMM epilogue as one row-wise pass for cuBLAS outputs: r*y + bias + residual, Σ² → [T, 1]."""
    t, n = y.shape
    out = out if out is not None else torch.empty_like(y)
    stats = torch.empty((t, 1), device=y.device, dtype=torch.float32) if want_stats else None
    if t == 0:
        return out, stats
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    scale, p, stride_s, from_rows, block_p = stats_operand(row_stats, k)
    _row_epilogue_kernel[(t,)](
        y,
        out,
        bias if bias is not None else y,
        residual if residual is not None else y,
        scale if scale is not None else y,
        stats if stats is not None else y,
        n,
        p,
        y.stride(0),
        out.stride(0),
        residual.stride(0) if residual is not None else 0,
        stride_s,
        1.0 / k,
        eps,
        HAS_SCALE=scale is not None,
        FROM_ROWS=from_rows,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        WANT_STATS=want_stats,
        BLOCK=min(1024 if not INTERPRET else 256, next_pow2(n)),
        BLOCK_P=block_p,
        num_warps=4,
    )
    return out, stats
