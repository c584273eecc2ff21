"""Tensor parallelism for the decoder (Megatron-style): what each rank holds and the collectives it runs.

Each of N ranks (one process per device, torch.distributed: NCCL on CUDA, gloo on CPU) holds:
- qkv and gate/up column-parallel: its Hq/N query heads, Hk/N KV heads, I/N intermediate columns
  (so attention, RoPE, the KV cache and silu·mul stay rank-local: the cache is sharded by KV heads);
- o_proj and down_proj row-parallel: the matching input columns. Their partial products are summed
  over ranks (one all-reduce each), then the residual is added once;
- the embedding and the LM head vocab-parallel: ⌈V/N⌉ rows each (zero-padded); the embedding's
  partial rows are all-reduced, the LM head's logits all-gathered.

The deferred norm across ranks: after each all-reduce every rank holds the full h, so the statistic
its consumers need is h itself (the "rows" form of kernels/reference.stats_are_rows): the next
qkv or gate/up GEMM (or the LM head) squares and sums the row it reads anyway; fusion off runs the
explicit RMSNorm on the same h. Folding the statistics into the all-reduce kernel itself is the GPU
side's work (issue #24).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fusionserve.kernels.backend import Backend
from fusionserve.kernels.fp8 import Fp8Weight
from fusionserve.models.config import ModelConfig
from fusionserve.models.errors import CheckpointError
from fusionserve.models.loader import ModelWeights


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the group, and the collectives the decoder calls."""

    rank: int
    world_size: int
    vocab_size: int  # the full vocabulary (each rank holds ⌈V/N⌉ rows of the embedding and head)
    group: dist.ProcessGroup | None = None  # None: the default group

    @property
    def vocab_shard(self) -> int:
        return -(-self.vocab_size // self.world_size)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def embedding(self, ids: torch.Tensor, shard: torch.Tensor, want_stats: bool):
        """Vocab-parallel gather: each rank looks up the ids it holds, the rest stay zero, one sum."""
        local = ids - self.rank * self.vocab_shard
        mine = (local >= 0) & (local < shard.shape[0])
        h = torch.nn.functional.embedding(torch.where(mine, local, 0), shard)
        h = self.all_reduce(h * mine.unsqueeze(-1).to(h.dtype))
        return h, (h if want_stats else None)

    def row_parallel(
        self, be: Backend, x: torch.Tensor, weight, residual: torch.Tensor, want_stats: bool, x_stats=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """residual + Σ_ranks x_r W_rᵀ: o_proj / down_proj. Statistics: the rows of the result."""
        partial, _ = be.linear(x, weight, x_stats=x_stats)
        h = residual + self.all_reduce(partial)
        return h, (h if want_stats else None)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """[T, V/N] per rank → [T, V] on every rank (the padding rows dropped)."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


def _rows(w, start: int, stop: int):
    if isinstance(w, Fp8Weight):  # per-output-channel scales follow their rows
        return Fp8Weight(w.data[start:stop].contiguous(), w.scale[start:stop].contiguous())
    return w[start:stop].contiguous()


def _cols(w, start: int, stop: int):
    if isinstance(w, Fp8Weight):
        return Fp8Weight(w.data[:, start:stop].contiguous(), w.scale)
    return w[:, start:stop].contiguous()


def _cat_rows(parts: list):
    if isinstance(parts[0], Fp8Weight):
        return Fp8Weight(torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]))
    return torch.cat(parts)


def _vocab_rows(t: torch.Tensor, rank: int, shard: int) -> torch.Tensor:
    rows = t[rank * shard : (rank + 1) * shard]
    if rows.shape[0] < shard:  # the last rank's zero padding
        rows = torch.cat([rows, rows.new_zeros(shard - rows.shape[0], *rows.shape[1:])])
    return rows.contiguous()


def check_divisible(cfg: ModelConfig, world_size: int) -> None:
    """N must split the query heads, the KV heads (the cache is sharded by them) and the MLP."""
    if world_size < 1:
        raise ValueError(f"tensor parallel size must be at least 1, got {world_size}")
    if cfg.layer_norm:
        raise CheckpointError("tensor parallelism is implemented for RMSNorm (Llama-family) models only")
    for what, n in (
        ("KV heads", cfg.num_kv_heads),
        ("attention heads", cfg.num_heads),
        ("intermediate size", cfg.intermediate_size),
    ):
        if n % world_size:
            raise CheckpointError(
                f"tensor parallel size {world_size} does not divide the model's {n} {what}; "
                f"pick a size that divides {cfg.num_kv_heads} (its KV heads)"
            )


def shard(
    cfg: ModelConfig, weights: ModelWeights, rank: int, world_size: int
) -> tuple[ModelConfig, ModelWeights]:
    """This rank's config (local heads and intermediate size; the full vocabulary) and weights."""
    check_divisible(cfg, world_size)
    d, hq, hk, inter = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    q_n, kv_n, i_n = hq // world_size * d, hk // world_size * d, inter // world_size
    q0, k0, v0 = rank * q_n, hq * d + rank * kv_n, (hq + hk) * d + rank * kv_n

    def qkv(t):  # [Q | K | V] rows → this rank's heads of each
        return _cat_rows([_rows(t, q0, q0 + q_n), _rows(t, k0, k0 + kv_n), _rows(t, v0, v0 + kv_n)])

    layers = [
        dataclasses.replace(
            layer,
            w_qkv=qkv(layer.w_qkv),
            b_qkv=qkv(layer.b_qkv) if layer.b_qkv is not None else None,
            w_o=_cols(layer.w_o, q0, q0 + q_n),
            w_gate_up=_cat_rows(
                [
                    _rows(layer.w_gate_up, rank * i_n, (rank + 1) * i_n),
                    _rows(layer.w_gate_up, inter + rank * i_n, inter + (rank + 1) * i_n),
                ]
            ),  # fmt: skip
            w_down=_cols(layer.w_down, rank * i_n, (rank + 1) * i_n),
        )
        for layer in weights.layers
    ]
    vs = -(-cfg.vocab_size // world_size)
    local = ModelWeights(
        embed=_vocab_rows(weights.embed, rank, vs),
        layers=layers,
        lm_head=_vocab_rows(weights.lm_head, rank, vs),
    )
    return local_config(cfg, world_size), local


def local_config(cfg: ModelConfig, world_size: int) -> ModelConfig:
    """A rank's view of the model: Hq/N query heads, Hk/N KV heads, I/N intermediate columns (the
    vocabulary stays the full one: the collectives assemble it)."""
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // world_size,
        num_kv_heads=cfg.num_kv_heads // world_size,
        intermediate_size=cfg.intermediate_size // world_size,
    )
