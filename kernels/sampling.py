"""FlashSampling: Gumbel-max drawn where the logits are made, so a plain row's logits never reach HBM.

    token = argmax_v (z_v / T + g_v),   g_v = -log(-log u_v),   u_v = philox(key, v) ∈ (0, 1)

draws exactly from softmax(z / T) (the Gumbel-max trick) and needs no softmax denominator: the
deferred-Softmax case of the seed paper. Argmax decomposes over column tiles, so a GEMM epilogue can
take each tile's maximum, fold it into a few per-row slots by a 64-bit atomic max of a packed
(value, index) key, and the last tile of a row block to finish (an arrival counter, as split-K does:
kernels/split_k.py) reduces the slots to the token — one launch, and the [M, V] fp32 logits are
neither written nor read back. T = 0 is greedy: the plain argmax, no noise.

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
def argmax_key(value, index):
    """A row's (value, index) as one int64 whose order is argmax's: the value's IEEE bits made
    monotone in the high 32 bits, 2³¹ − 1 − index in the low 31 (a larger value wins, then the
    smaller index, as torch.argmax). Never negative, so 0 is below every key (the slots' identity)."""
    bits = (value + 0.0).to(tl.uint32, bitcast=True)  # + 0.0: −0.0 ties with +0.0, as torch compares
    ordered = tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)
    return (ordered.to(tl.int64) << 31) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def argmax_tiles(
    scores,
    offs_m,
    m_mask,
    n_mask,
    pid_m,
    pid_n,
    n_tiles,
    slot_ptr,
    cnt_ptr,
    ids_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLOTS: tl.constexpr,
):
    """Each program folds its tile's per-row (max, first argmax) into one of SLOTS per row with an
    atomic max of argmax_key (tiles spread over the slots, so no address takes more than
    n_tiles / SLOTS atomics); the last program of a row block to arrive takes the max of its rows'
    SLOTS keys, writes the int64 token ids and re-zeroes the slots and its counters (CUDA-graph
    replays start from zero). The reduction is a fixed-size read, however many tiles there are.

    Arrival is counted in two levels, per slot group (the tiles with pid_n ≡ g mod SLOTS), then per
    row block by each group's last tile: same-address atomics serialize in L2, and one counter taken
    by every tile of the 8B LM head at M = 1 (8,016 tiles of 16 columns) cost about 40 µs a step on
    the H200. Two levels take at most n_tiles / SLOTS + SLOTS atomics on any one address.
    Counters: SLOTS + 1 per row block (cnt_ptr + pid_m · (SLOTS + 1)), the last the row block's."""
    s = tl.where(n_mask[None, :], scores, float("-inf"))
    best = tl.max(s, 1)
    at = tl.argmax(s, 1, tie_break_left=True)
    group = pid_n % SLOTS
    tl.atomic_max(slot_ptr + offs_m * SLOTS + group, argmax_key(best, pid_n * BLOCK_N + at), mask=m_mask)
    tl.debug_barrier()
    counters = cnt_ptr + pid_m * (SLOTS + 1)
    members = (n_tiles - 1 - group) // SLOTS + 1  # tiles of this slot group
    if tl.atomic_add(counters + group, 1, sem="acq_rel") == members - 1:
        arrived = tl.atomic_add(counters + SLOTS, 1, sem="acq_rel")
        if arrived == tl.minimum(n_tiles, SLOTS) - 1:  # the last group of the row block
            tl.debug_barrier()
            slots = slot_ptr + offs_m[:, None] * SLOTS + tl.arange(0, SLOTS)[None, :]
            keys = tl.load(slots, mask=m_mask[:, None], other=0, cache_modifier=".cg")
            top = tl.max(keys, 1)
            tl.store(ids_ptr + offs_m, 0x7FFFFFFF - (top & 0x7FFFFFFF), mask=m_mask)
            tl.store(slots, tl.zeros([BLOCK_M, SLOTS], dtype=tl.int64), mask=m_mask[:, None])
            tl.store(counters + tl.arange(0, SLOTS), tl.zeros([SLOTS], dtype=tl.int32))
            tl.store(counters + SLOTS, 0)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr,
    temp_ptr,
    key_ptr,
    slot_ptr,
    cnt_ptr,
    ids_ptr,
    M,
    V,
    stride_lm,
    RANDOM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLOTS: tl.constexpr,
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
        scores, offs_m, m_mask, n_mask, pid_m, pid_n, tl.num_programs(0), slot_ptr, cnt_ptr, ids_ptr,
        BLOCK_M, BLOCK_N, SLOTS,
    )  # fmt: skip


class SampleBuffers:
    """One sampling launch's outputs (the [M] ids) and its persistent zeroed scratch: SLOTS argmax
    keys per row and SLOTS + 1 arrival counters per row block (argmax_tiles), all left at zero."""

    def __init__(self, m: int, n_tiles: int, device: torch.device, m_tiles: int):
        self.slots_per_row = min(64, next_pow2(n_tiles))
        self.ids = torch.empty(m, device=device, dtype=torch.int64)
        self.slots = arrival_counters(device, m * 64, "sample_slots", dtype=torch.int64)
        self.counters = arrival_counters(device, m_tiles * (self.slots_per_row + 1), "sample")


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
        logits, temps.float().contiguous(), keys.contiguous(), buf.slots, buf.counters, buf.ids,
        m, v, logits.stride(0),
        RANDOM=sample_mode(temps, random) == SAMPLE_GUMBEL,
        BLOCK_M=block_m, BLOCK_N=block_n, SLOTS=buf.slots_per_row, num_warps=4,
    )  # fmt: skip
    return buf.ids
