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
