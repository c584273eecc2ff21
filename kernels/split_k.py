"""Split-K for the decode GEMM (kernels/norm_linear.py) without a second launch."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def split_k_reduce(
    acc,
    acc_u,
    ws_ptr,
    cnt_ptr,
    pid_m,
    pid_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GATE_UP: tl.constexpr,
):
    """Split-K without a second launch: every split parks its fp32 tile in the workspace and bumps the
    tile's counter; the last to arrive sums the tiles in split order (deterministic), re-arms the counter
    (so CUDA-graph replays start from zero) and runs the epilogue: (acc, acc_u, whether it is last)."""
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
    last = arrived == SPLIT_K - 1
    if last:
        tl.debug_barrier()
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(SPLIT_K):
            acc += tl.load(base + s * TILE + idx, cache_modifier=".cg")
            if GATE_UP:
                acc_u += tl.load(base + s * TILE + BLOCK_M * BLOCK_N + idx, cache_modifier=".cg")
        tl.store(cnt_ptr + tile, 0)
    return acc, acc_u, last
