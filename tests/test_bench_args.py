"""Benchmarks refuse a shape they cannot run with a clear message before touching a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_bench_refuses_a_context_at_the_models_maximum():
    run = subprocess.run(
        [sys.executable, "-m", "bench.decode", "--models", "135m", "--contexts", "512,8192"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 2
    assert "135m holds at most 8192 tokens" in run.stderr and "below 8192" in run.stderr


def test_decode_configs_takes_only_the_models_own_changed_tiles(tmp_path):
    """--from-sweep proposes, per M bucket, the swept entries of the model's own GEMMs that differ from
    the shipped table; a "-fp8" shape tunes the FP8 table."""
    import argparse

    sys.path.insert(0, str(ROOT))
    from bench.decode import config_of
    from bench.decode_configs import gemm_shapes, sweep_candidates, weights_of
    from fusionserve.kernels import tile_configs

    shipped = tile_configs.SHIPPED["H200"]
    lm_head = (128256, 4096, 16, False)
    swept = {
        lm_head: (16, 16, 256, 2, 4, 1),  # differs from the shipped entry
        (4096, 14336, 16, False): shipped[(4096, 14336, 16, False)],  # the same: nothing to try
        (4096, 14336, 32, False): (32, 16, 128, 2, 4, 2),  # another M bucket
        (49152, 576, 16, False): (16, 16, 64, 4, 6, 1),  # the 135M's LM head, not the 8B's
    }
    tile_configs.save_tiles(tmp_path / "sweep.json", swept)
    shapes = gemm_shapes(config_of("8b"))
    assert {(6144, 4096), (4096, 4096), (14336, 4096), (28672, 4096), (4096, 14336)} < shapes
    found = sweep_candidates(tmp_path / "sweep.json", shipped, 16, shapes)
    assert found == {lm_head: [tile_configs.norm_cfg(swept[lm_head])]}
    assert weights_of(argparse.Namespace(model="8b-fp8")) == "fp8"
    assert weights_of(argparse.Namespace(model="8b")) == "bf16"
