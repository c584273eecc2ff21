"""Shared helpers of the kernel tests (no tests here).

Kernels run on CUDA when there is a GPU, else on CPU under TRITON_INTERPRET=1, which must be set
before any kernel module is imported: importing this module first does that.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fusionserve.kernels.batch import PagedBatch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
M_VALUES = [1, 3, 17]
BS = 16  # KV-cache block size of the attention tests

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _nan_fill(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a kernel wrapper allocates starts as NaN, so an unwritten element fails the test."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_fill(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_fill(_real_empty_like(*a, **k)))


def rand(*shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, (out64.shape, ref64.shape)
    assert torch.isfinite(out64).all(), "non-finite output (unwritten or overflowed elements)"
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> None:
    err = rel_err(out, ref)
    assert err <= TOL[dtype] * factor, f"rel err {err:.3e} > {TOL[dtype] * factor:.1e} ({dtype})"


def random_batch(query_lens, context_lens, num_blocks, spare=0):
    """Sequences scattered over randomly permuted physical blocks (room for `spare` more tokens each)."""
    widths = [-(-(c + spare) // BS) for c in context_lens]
    perm = torch.randperm(num_blocks).tolist()
    assert sum(widths) <= num_blocks
    tables = torch.full((len(context_lens), max(widths) + 1), -1, dtype=torch.int32)
    slots, used = [], 0
    for i, (q, c) in enumerate(zip(query_lens, context_lens)):
        blocks = perm[used : used + widths[i]]
        used += widths[i]
        tables[i, : widths[i]] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[p // BS] * BS + p % BS for p in range(c - q, c)]
    return PagedBatch.from_lists(query_lens, context_lens, tables, slots, BS)


def caches(num_blocks, hk, d, dtype):
    return rand(num_blocks, BS, hk, d, dtype=dtype), rand(num_blocks, BS, hk, d, dtype=dtype)
