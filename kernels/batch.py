"""Where the tokens of one flattened engine step live in the paged KV cache.

Every attention implementation (the torch reference, the Triton kernels) reads
the same description, so the engine builds it once per step and the model passes
it through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class PagedBatch:
    """Layout of a step: B sequences, T new tokens packed back to back.

    query_start:  [B+1] int32, prefix sums of new tokens per sequence.
    context_lens: [B] int32, cached + new tokens of each sequence after this step.
    block_tables: [B, max_blocks] int32, physical block ids (-1 = unused).
    slot_mapping: [T] int64, flat cache slot (block * block_size + offset) of each
                  new token; a negative slot means "do not write" (padding).
    num_decodes:  how many leading sequences bring exactly one new token (known on the host). In a
                  mixed step (decodes + prompt chunks) their queries take the decode kernel: the
                  prefill kernel would spend a whole BLOCK_M-row tile on each of them.
    """

    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_context_len: int
    block_size: int
    num_decodes: int = 0

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @cached_property
    def host_layout(self) -> tuple[list[int], list[int]]:
        """(query_start, context_lens) as Python lists, read once per step instead of once per layer."""
        return self.query_start.tolist(), self.context_lens.tolist()

    @property
    def is_decode_only(self) -> bool:
        """True when every sequence brings exactly one new token (the decode step)."""
        return self.max_query_len == 1

    @classmethod
    def from_lists(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        tables: torch.Tensor,
        slots: list[int],
        block_size: int,
    ) -> PagedBatch:
        """A CPU batch from per-sequence new-token counts, context lengths, block tables and slots."""
        qs = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        qs[1:] = torch.cumsum(torch.tensor(query_lens, dtype=torch.int32), 0)
        return cls(
            query_start=qs,
            context_lens=torch.tensor(context_lens, dtype=torch.int32),
            block_tables=tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            block_size=block_size,
            num_decodes=leading_ones(query_lens),
        )

    def to(self, device: torch.device | str) -> PagedBatch:
        return PagedBatch(
            query_start=self.query_start.to(device, non_blocking=True),
            context_lens=self.context_lens.to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            max_query_len=self.max_query_len,
            max_context_len=self.max_context_len,
            block_size=self.block_size,
            num_decodes=self.num_decodes,
        )


def contiguous_batch(
    query_lens: list[int], context_lens: list[int], block_size: int, first_block: int = 0
) -> PagedBatch:
    """A batch whose sequences own consecutive blocks: handy for tests and one-off generation."""
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    width = max(blocks_per_seq) if blocks_per_seq else 1
    tables = torch.full((len(context_lens), max(width, 1)), -1, dtype=torch.int32)
    slots: list[int] = []
    start = first_block
    for i, (q, c) in enumerate(zip(query_lens, context_lens)):
        n = blocks_per_seq[i]
        tables[i, :n] = torch.arange(start, start + n, dtype=torch.int32)
        for pos in range(c - q, c):
            slots.append((start + pos // block_size) * block_size + pos % block_size)
        start += n
    return PagedBatch.from_lists(query_lens, context_lens, tables, slots, block_size)


def leading_ones(query_lens) -> int:
    """How many sequences at the front bring one new token each (PagedBatch.num_decodes)."""
    not_one = np.flatnonzero(np.asarray(query_lens) != 1)
    return int(not_one[0]) if len(not_one) else len(query_lens)


@dataclass(frozen=True)
class Geometry:
    """What a backend knows of the model once, bound when it is built: the attention's head layout,
    its softmax scale and the norms' epsilon."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float
    layer_norm: bool = False  # GPT-NeoX: LayerNorm (deferred mean and variance), GELU MLP
    gelu: str = "none"  # its GELU: exact ("none") or the tanh approximation
    fp8: bool = False  # FP8 GEMMs (kernels/fp8.py): producers also hand on max|h| for the quantization

    @classmethod
    def of(
        cls,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
        layer_norm: bool = False,
        gelu: str = "none",
        fp8: bool = False,
    ) -> Geometry:
        return cls(num_heads, num_kv_heads, head_dim, eps, head_dim**-0.5, layer_norm, gelu, fp8)


@dataclass(frozen=True)
class Rotary:
    """Each new token's position and the cos|sin table [max_pos, D] (fp32: cos in the first D/2
    columns, sin in the last)."""

    positions: torch.Tensor
    cos_sin: torch.Tensor


@dataclass(frozen=True)
class LayerKV:
    """One layer's paged caches [num_blocks, block_size, Hk, D] and where this step's new K/V go."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # [T] flat slot per new token; negative: do not write


_MASK64 = (1 << 64) - 1


def mix64(seed: int, position: int) -> int:
    """A 63-bit Philox key from a choice's noise seed and the position of the token drawn (SplitMix64's
    finalizer: neighbouring positions get unrelated keys)."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def choice_noise_seed(seed: int | None, index: int) -> int | None:
    """The noise seed of choice `index` of a request with `seed` (None: unseeded)."""
    return None if seed is None else (seed * 1_000_003 + index) % (1 << 63)


@dataclass(frozen=True)
class Draw:
    """Rows whose next token the LM head draws itself (FlashSampling, kernels/sampling.py).

    temps:  [M] fp32 temperature per row; 0 = greedy (argmax, no noise); < 0: a row the sampler
            takes from its logits (a mixed step), its drawn token meaningless.
    keys:   [M] int64 Philox key per row (the host derives it: mix64 above, server/engine/sampler.py).
    random: whether any row has T > 0, known on the host (greedy-only steps skip the noise).
    logits: [M, V] fp32, where the rows with T < 0 get their logits written (None: no such rows).
    """

    temps: torch.Tensor
    keys: torch.Tensor
    random: bool
    logits: torch.Tensor | None = None


@dataclass(frozen=True)
class RopeWrite:
    """The qkv GEMM's epilogue at decode sizes: RoPE (full-width, HF half-split) on q and k, q out, k
    and v into the paged cache (kernels/norm_linear.py PAIR_ROPE, kernels/rope_kv.py rope_kv_tile).
    half = D / 2 must be a multiple of BLOCK_N (a power of two ≥ 16; TritonBackend checks)."""

    rotary: Rotary
    kv: LayerKV
    num_heads: int
    num_kv_heads: int
    half: int

    @property
    def cos_sin(self) -> torch.Tensor:
        return self.rotary.cos_sin
