"""FlashSampling: Gumbel-max drawn where the logits are made, so a plain row's logits never reach HBM.

    token = argmax_v (z_v / T + g_v),   g_v = -log(-log u_v),   u_v = philox(key, v) ∈ (0, 1)

draws exactly from softmax(z / T) (the Gumbel-max trick) and needs no softmax denominator: the
deferred-Softmax case of the seed paper. Argmax decomposes over column tiles, so a GEMM epilogue can
take each tile's maximum and the last tile of a row block to finish (an arrival counter, as split-K
does: kernels/split_k.py) reduces the partial maxima to the token — one launch, and the [M, V] fp32
logits are neither written nor read back. T = 0 is greedy: the plain argmax, no noise.

Why a counter-based generator (Philox 4x32-10, the generator Triton's tl.rand uses, with a uniform of
our own construction): the noise of (key, token) is a pure function, so the fused LM head
(kernels/norm_linear.py, SAMPLE) and the unfused sampler (`gumbel_argmax` below, on logits the LM head
wrote) draw the *same* token for the same key — fusion on and off sample identically, and a seeded
request's key is derived from (seed, choice, position) only (server/engine/sampler.py), so its text
does not depend on what shares its batch. Both paths call the same device helpers below; on CPU the
torch reference (kernels/reference.py: philox_uniform, gumbel_argmax) computes the same bits.

The uniform is (c0 >> 9 + 0.5) · 2⁻²³: strictly inside (0, 1), so g is always finite (Triton's
tl.rand can return 0 and, rounded to fp32, 1: an infinite g would win whatever its logit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.triton_env import arrival_counters, next_pow2

PHILOX_ROUNDS = 10
SAMPLE_OFF, SAMPLE_GREEDY, SAMPLE_GUMBEL = 0, 1, 2  # the SAMPLE constexpr of the kernels below


@triton.jit
def philox_uniform(key_lo, key_hi, counter, ROUNDS: tl.constexpr = PHILOX_ROUNDS):
    """Uniform fp32 in (0, 1) from Philox 4x32 of counter (c0; c1..c3 = 0) under the 64-bit key
    (key_lo, key_hi): all uint32 tensors, broadcast together."""
    c0 = counter + key_lo * 0  # broadcast every operand to one shape
    c1 = c0 * 0
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = key_lo + c1
    k1 = key_hi + c1
    for _ in tl.static_range(ROUNDS):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return ((c0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def gumbel_scores(logit, temp, key, offs_n, RANDOM: tl.constexpr):
    """What the argmax runs over for a [BLOCK_M, BLOCK_N] fp32 logit tile: z / T + g for rows with
    T > 0, z itself for greedy rows (T = 0). `temp` fp32 [BLOCK_M], `key` int64 [BLOCK_M], `offs_n` the
    tile's token ids."""
    if RANDOM:
        lo = (key & 0xFFFFFFFF).to(tl.uint32)
        hi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
        u = philox_uniform(lo[:, None], hi[:, None], offs_n.to(tl.uint32)[None, :])
        g = -tl.log(-tl.log(u))
        t = temp[:, None]
        logit = tl.where(t > 0, logit / tl.where(t > 0, t, 1.0) + g, logit)
    return logit


@triton.jit
def argmax_tiles(
    scores,
    offs_m,
    m_mask,
    offs_n,
    n_mask,
    pid_m,
    pid_n,
    n_tiles,
    pmax_ptr,
    pidx_ptr,
    cnt_ptr,
    ids_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Each program parks its tile's per-row (max, first argmax) in [M, n_tiles]; the last of a row
    block to arrive reduces them in tile order (first maximum wins, as torch.argmax), writes the int64
    token ids and re-arms its counter (CUDA-graph replays start from zero)."""
    s = tl.where(n_mask[None, :], scores, float("-inf"))
    best = tl.max(s, 1)
    at = tl.argmax(s, 1, tie_break_left=True)
    part = offs_m * n_tiles + pid_n
    tl.store(pmax_ptr + part, best, mask=m_mask)
    tl.store(pidx_ptr + part, (pid_n * BLOCK_N + at).to(tl.int32), mask=m_mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + pid_m, 1, sem="acq_rel")
    if arrived == n_tiles - 1:
        tl.debug_barrier()
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        pos = tl.zeros([BLOCK_M], dtype=tl.int32)
        for t0 in range(0, n_tiles, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tm = m_mask[:, None] & (offs_t[None, :] < n_tiles)
            v = tl.load(
                pmax_ptr + offs_m[:, None] * n_tiles + offs_t[None, :],
                mask=tm,
                other=float("-inf"),
                cache_modifier=".cg",
            )
            chunk_best = tl.max(v, 1)
            chunk_at = t0 + tl.argmax(v, 1, tie_break_left=True)
            better = chunk_best > top  # strictly: an earlier tile keeps a tie
            top = tl.where(better, chunk_best, top)
            pos = tl.where(better, chunk_at, pos)
        ids = tl.load(pidx_ptr + offs_m * n_tiles + pos, mask=m_mask, other=0, cache_modifier=".cg")
        tl.store(ids_ptr + offs_m, ids.to(tl.int64), mask=m_mask)
        tl.store(cnt_ptr + pid_m, 0)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr,
    temp_ptr,
    key_ptr,
    pmax_ptr,
    pidx_ptr,
    cnt_ptr,
    ids_ptr,
    M,
    V,
    stride_lm,
    RANDOM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < V
    mask = m_mask[:, None] & n_mask[None, :]
    z = tl.load(logits_ptr + offs_m[:, None] * stride_lm + offs_n[None, :], mask=mask, other=0.0)
    temp = tl.load(temp_ptr + offs_m, mask=m_mask, other=0.0)
    key = tl.load(key_ptr + offs_m, mask=m_mask, other=0)
    scores = gumbel_scores(z.to(tl.float32), temp, key, offs_n, RANDOM)
    argmax_tiles(
        scores, offs_m, m_mask, offs_n, n_mask, pid_m, pid_n, tl.num_programs(0),
        pmax_ptr, pidx_ptr, cnt_ptr, ids_ptr, BLOCK_M, BLOCK_N, BLOCK_T,
    )  # fmt: skip


class SampleBuffers:
    """The partial (max, argmax) buffers and ids of one sampling launch: [M, n_tiles] each."""

    def __init__(self, m: int, n_tiles: int, device: torch.device, m_tiles: int):
        self.n_tiles = n_tiles
        self.pmax = torch.empty((m, n_tiles), device=device, dtype=torch.float32)
        self.pidx = torch.empty((m, n_tiles), device=device, dtype=torch.int32)
        self.ids = torch.empty(m, device=device, dtype=torch.int64)
        self.counters = arrival_counters(device, m_tiles, "sample")
        self.block_t = min(256, next_pow2(n_tiles))


def sample_mode(temps: torch.Tensor, random: bool | None = None) -> int:
    """SAMPLE_GUMBEL when any row has T > 0 (the caller may know without a device read), else greedy."""
    if random is None:
        random = bool((temps > 0).any())
    return SAMPLE_GUMBEL if random else SAMPLE_GREEDY


def gumbel_argmax_triton(
    logits: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor, random: bool | None = None
) -> torch.Tensor:
    """reference.gumbel_argmax in one Triton launch over logits a GEMM already wrote (the unfused path,
    and large-M LM heads): the same device helpers as the fused LM head, so the same tokens."""
    m, v = logits.shape
    if m == 0:
        return torch.empty(0, device=logits.device, dtype=torch.int64)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block_m, block_n = 4, 1024
    grid = (triton.cdiv(v, block_n), triton.cdiv(m, block_m))
    buf = SampleBuffers(m, grid[0], logits.device, grid[1])
    _gumbel_argmax_kernel[grid](
        logits, temps.float().contiguous(), keys.contiguous(), buf.pmax, buf.pidx, buf.counters, buf.ids,
        m, v, logits.stride(0),
        RANDOM=sample_mode(temps, random) == SAMPLE_GUMBEL,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_T=buf.block_t, num_warps=4,
    )  # fmt: skip
    return buf.ids
