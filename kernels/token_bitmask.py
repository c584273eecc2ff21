"""A grammar's allowed-token bitmask applied to a step's logits on the device, in one launch.

Structured output (server/engine/structured.py) fills one int32 word per 32 vocabulary entries on
the host, bit i of word j set when token 32·j + i may follow, for each constrained row; this kernel
sets every other logit of those rows to -inf before sampling. Rows not listed are untouched, so a
step with no constrained row launches nothing. Columns past the mask (a padded vocabulary) are
always masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusionserve.kernels.triton_env import INTERPRET, next_pow2


@triton.jit
def _token_bitmask_kernel(
    logits_ptr,
    mask_ptr,
    rows_ptr,
    V,
    WORDS,
    stride_l,
    stride_m,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < V
    word_idx = offs // 32
    words = tl.load(mask_ptr + i * stride_m + word_idx, mask=in_vocab & (word_idx < WORDS), other=0)
    allowed = ((words >> (offs % 32)) & 1) != 0
    ptrs = logits_ptr + row * stride_l + offs
    tl.store(ptrs, tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty), mask=in_vocab & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf unless bit t of bitmask[i] is set (reference.token_bitmask)."""
    n, v = rows.shape[0], logits.shape[1]
    if n == 0:
        return
    assert bitmask.dtype == torch.int32 and bitmask.shape[0] == n and logits.stride(1) == 1
    block = min(1024 if not INTERPRET else 256, next_pow2(v))
    _token_bitmask_kernel[(n, triton.cdiv(v, block))](
        logits,
        bitmask,
        rows,
        v,
        bitmask.shape[1],
        logits.stride(0),
        bitmask.stride(0),
        BLOCK=block,
        num_warps=4,
    )
