"""Tensor parallelism on CPU over gloo (models/tensor_parallel.py): N ranks, each holding its shard,
give the logits and greedy tokens of one unsharded model, fused and off; sizes that do not divide
the heads are refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.fp8_quality import greedy_continuations
from fusionserve.kernels.backend import TorchBackend
from fusionserve.kernels.batch import contiguous_batch
from fusionserve.models.decoder import Decoder, geometry
from fusionserve.models.errors import CheckpointError
from fusionserve.models.loader import load_weights
from fusionserve.models.tensor_parallel import TensorParallel, shard
from tests.tiny_models import make_tiny_checkpoint, rel_err

PROMPT = list(range(3, 43))  # 40 tokens: a prefill, then decode steps


def build(model_dir: Path, tp: TensorParallel | None) -> Decoder:
    cfg, weights = load_weights(model_dir, dtype=torch.float32, progress=False)
    if tp is not None:
        cfg, weights = shard(cfg, weights, tp.rank, tp.world_size)
    return Decoder(cfg, weights, TorchBackend(geometry(cfg)), max_model_len=128, tp=tp)


def step_logits(model: Decoder, fusion: bool) -> torch.Tensor:
    """Every row's logits: the 40-token prefill, then 4 decode steps of fixed tokens."""
    kv = model.allocate_kv_cache(8, 16)
    out, ids = [], torch.tensor(PROMPT + [7, 8, 9, 10])
    for a, b in [(0, 40), (40, 41), (41, 42), (42, 43), (43, 44)]:
        hidden = model.forward(
            ids[a:b], torch.arange(a, b), contiguous_batch([b - a], [b], 16), kv, fusion=fusion
        )
        out.append(model.logits(hidden))
    return torch.cat(out)


def _rank(rank: int, world: int, init: str, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        cfg_full = load_weights(Path(model_dir), progress=False)[0]
        model = build(Path(model_dir), TensorParallel(rank, world, cfg_full.vocab_size))
        result = {f: step_logits(model, f) for f in (True, False)}
        result["greedy"] = greedy_continuations(model, [PROMPT[:12], PROMPT[5:30]], 8)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_tp(model_dir: Path, world: int, tmp_path: Path) -> dict:
    out = tmp_path / f"tp{world}.pt"
    mp.spawn(_rank, args=(world, str(tmp_path / "init"), str(model_dir), str(out)), nprocs=world)
    return torch.load(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "m")  # 4 heads, 2 KV heads, I = 112


def check_equal_to_one_rank(model_dir: Path, got: dict) -> None:
    one = build(model_dir, None)
    for fusion in (True, False):
        assert rel_err(got[fusion], step_logits(one, fusion)) <= 1e-5, fusion
    assert got["greedy"] == greedy_continuations(one, [PROMPT[:12], PROMPT[5:30]], 8)


def test_two_ranks_equal_one(tiny, tmp_path):
    check_equal_to_one_rank(tiny, run_tp(tiny, 2, tmp_path))


@pytest.mark.slow
def test_default_model_on_three_ranks(default_model_dir, tmp_path):
    """SmolLM2-135M: 9 heads, 3 KV heads, so 3 ranks (2 do not divide its KV heads)."""
    check_equal_to_one_rank(default_model_dir, run_tp(default_model_dir, 3, tmp_path))


def test_sizes_that_do_not_divide_the_kv_heads_are_refused(default_model_dir):
    cfg, weights = load_weights(default_model_dir, progress=False)
    with pytest.raises(CheckpointError, match="does not divide the model's 3 KV heads"):
        shard(cfg, weights, 0, 2)
