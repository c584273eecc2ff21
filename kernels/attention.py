"""Paged attention for a step: the decode kernel (kernels/decode_attention.py) for one-token rows,
the varlen causal prefill kernel (kernels/prefill_attention.py) for the rest.

Both read K/V from the paged cache [num_blocks, block_size, Hk, D] through the block tables, keep
an online softmax (running max and denominator in fp32, exp2 with log2(e) folded into the scale)
and divide once at the end. Semantics are reference.paged_attention's: query j of a sequence with
n new tokens and context length L sits at position L - n + j and sees keys 0 .. L - n + j.
"""

from __future__ import annotations

import torch

from fusionserve.kernels.batch import PagedBatch
from fusionserve.kernels.decode_attention import DEFAULT_SPLIT, DecodeSplitPolicy, decode_attention
from fusionserve.kernels.pdl import PdlPolicy
from fusionserve.kernels.prefill_attention import prefill_attention


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    pdl: PdlPolicy | None = None,
    split: DecodeSplitPolicy = DEFAULT_SPLIT,
    amax_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """reference.paged_attention: the decode kernel for all-decode steps, the prefill kernel otherwise.
    `amax_out` [T, Hq] (all-decode steps only): each head's max|o| from the kernel's own epilogue.

    A mixed step's leading one-token sequences (batch.num_decodes) take the decode kernel too: in
    the prefill kernel each would occupy a BLOCK_M-row tile for one row (measured on the 8B shape: a
    ~240-decode + 7k-prompt-token serving step spent tens of ms there).
    """
    if batch.is_decode_only and q.shape[0] == batch.num_seqs:
        return decode_attention(
            q,
            k_cache,
            v_cache,
            batch.block_tables,
            batch.context_lens,
            batch.max_context_len,
            scale,
            policy=split,
            pdl=pdl,
            amax_out=amax_out,
        )
    assert amax_out is None, "max|o| comes from the decode kernel: all-decode steps only"
    nd = min(batch.num_decodes, batch.num_seqs)
    if nd == 0:
        return prefill_attention(q, k_cache, v_cache, batch, scale)
    o = torch.empty_like(q)
    decode_attention(
        q[:nd],
        k_cache,
        v_cache,
        batch.block_tables[:nd],
        batch.context_lens[:nd],
        batch.max_context_len,
        scale,
        out=o[:nd],
        policy=split,
        pdl=pdl,
    )
    return prefill_attention(q, k_cache, v_cache, batch, scale, out=o, first_seq=nd)
