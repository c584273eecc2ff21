"""kernels/pdl.py: programmatic dependent launch is off without Hopper, its prefetch budget, its PTX rules, and PDL variants compute what plain launches do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusionserve.kernels import norm_linear as nl
from fusionserve.kernels import pdl
from fusionserve.kernels.batch import Geometry
from fusionserve.kernels.triton_backend import TritonBackend

ROOT = Path(__file__).resolve().parents[2]
GEOM = Geometry.of(1, 1, 2, 1e-6)


def test_pdl_is_off_without_hopper():
    assert not pdl.pdl_available("cpu")
    assert pdl.pdl_args(None, 1, torch.device("cpu")) == {"PDL": False, "EARLY": False}
    on = pdl.pdl_args(pdl.PdlPolicy(), 1, torch.device("cpu"))
    assert on == {"PDL": True, "EARLY": True, "launch_pdl": True}
    assert not pdl.pdl_args(pdl.PdlPolicy(), 1000, torch.device("cpu"))["EARLY"]  # several waves


def test_pdl_env_switch(monkeypatch):
    monkeypatch.setattr(pdl, "INTERPRET", False)
    monkeypatch.setattr(pdl, "HAVE_GDC", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pdl.pdl_available("cuda")
    monkeypatch.setenv("FUSIONSERVE_PDL", "0")
    assert not pdl.pdl_available("cuda")
    monkeypatch.setenv("FUSIONSERVE_PDL", "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not pdl.pdl_available("cuda"), "griddepcontrol needs sm90"


def test_prefetch_budget():
    policy = pdl.PdlPolicy()
    # 135M: the whole K of every row fits (576 bf16 = 9 lines -> 16, clamped in the kernel).
    assert pdl.prefetch_lines(576, 2, 960, policy) == 16
    # 8B gate/up: 28672 rows of 4096; the 8 MB budget leaves 2 lines per row, not 32.
    assert pdl.prefetch_lines(4096, 2, 28672, policy) == 2
    assert pdl.prefetch_lines(4096, 2, 28672, policy) * 128 * 28672 <= policy.prefetch_budget
    # The 8B LM head (128256 rows) prefetches nothing.
    assert pdl.prefetch_lines(4096, 2, 128256, policy) == 0


def test_backend_uses_pdl_for_small_steps_only():
    be = TritonBackend(GEOM, small_m_max=32, pdl=True)
    assert be.pdl == pdl.PdlPolicy() and be._pdl(torch.zeros(32, 8)) == be.pdl
    assert be._pdl(torch.zeros(33, 8)) is None
    assert TritonBackend(GEOM, pdl=False)._pdl(torch.zeros(1, 8)) is None
    be.pdl = pdl.PdlPolicy(prefetch_budget=1 << 20)
    assert be._pdl(torch.zeros(1, 8)).prefetch_budget == 1 << 20
    auto = TritonBackend(GEOM).pdl  # auto: on exactly where the GPU and Triton support it (Hopper)
    assert (auto is not None) == pdl.pdl_available("cuda")


@pytest.mark.skipif(not pdl.HAVE_GDC, reason="this Triton has no griddepcontrol ops")
def test_pdl_kernels_compile_for_hopper_and_keep_the_rules(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "kernels" / "pdl_ptx.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(kernels) == 14
    for name, k in kernels.items():
        assert k["launch_pdl"] and k["wait"] == 1, name
        assert k["stores_before_wait"] == 0, f"{name} writes before griddepcontrol.wait"
        assert k["launch_dependents"] == (0 if name in ("rmsnorm",) else 1), name
    for name in (
        "linear one-wave",
        "gate_up one-wave",
        "linear split-K multi-wave",
        "linear fp8",
        "gate_up fp8",
        "lm head flash sampling",
        "qkv rope + kv write",
    ):
        assert kernels[name]["loads_before_wait"] == 0, f"{name} reads before griddepcontrol.wait"
        assert kernels[name]["prefetch_before_wait"] > 0, name
    assert kernels["gate_up one-wave"]["prefetch"] == 2 * kernels["linear one-wave"]["prefetch"]
    assert kernels["decode attention fused merge"]["prefetch_before_wait"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pdl_variants_compute_what_plain_launches_do(dtype):
    """Every kernel wrapper with a PDL policy (the one-wave early release, the multi-wave late trigger, the
    prefetch budget, the restructured split bounds of decode attention) gives the PDL-off result bit
    for bit. Under the interpreter the griddepcontrol / prefetch instructions themselves compile away."""
    from fusionserve.kernels import decode_attention, embedding, rmsnorm, rope_kv
    from fusionserve.kernels.batch import LayerKV, Rotary
    from fusionserve.kernels.decode_attention import DecodeSplitPolicy
    from tests.kernels.common import rand, random_batch

    def both(fn, *args, **kw):
        clones = [[a.clone() if isinstance(a, torch.Tensor) else a for a in args] for _ in range(2)]
        outs = [fn(*c, **kw, pdl=p) for c, p in zip(clones, (None, pdl.PdlPolicy()))]
        flat = [
            [t for t in (o if isinstance(o, tuple) else (o,)) if t is not None] + c
            for o, c in zip(outs, clones)
        ]
        for a, b in zip(*flat):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)

    m, k, n = 3, 45, 37
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype)
    stats = (torch.rand(m, 3) * k / 3 + 0.1).to(x.device)
    both(
        nl.linear, x, w, None, rand(m, n, dtype=dtype), stats, 1e-5, True
    )  # one wave on the interpreter's 4 SMs
    both(
        nl.linear, x, w, None, None, stats, 1e-5, False, config=(16, 16, 16, 1, 1, 2)
    )  # split-K: 3 x 2 programs
    both(nl.gate_up_silu, x, rand(2 * n, k, dtype=dtype), stats, 1e-5)
    both(embedding.embedding, torch.tensor([5, 0, 7], device=x.device), rand(11, k, dtype=dtype), True)
    both(rmsnorm.rmsnorm, x, 1e-5)
    hq, hk, d, bs, nb = 4, 2, 16, 16, 40
    cos_sin = rope_kv.rope_cos_sin(64, d, device=x.device)
    qkv = rand(m, (hq + 2 * hk) * d, dtype=dtype)
    caches = [rand(nb, bs, hk, d, dtype=dtype) for _ in range(2)]
    geom = Geometry.of(hq, hk, d, 1e-6)

    def rope_kv_write(qkv, positions, cos_sin, k_cache, v_cache, slots, pdl):
        return rope_kv.rope_kv_write(
            qkv, Rotary(positions, cos_sin), LayerKV(k_cache, v_cache, slots), geom, pdl=pdl
        )

    both(
        rope_kv_write,
        qkv,
        torch.tensor([3, 9, 60], device=x.device),
        cos_sin,
        *caches,
        torch.tensor([5, -1, 77], device=x.device),
    )
    ctx = [37, 1, 64, 20]
    batch = random_batch([1] * len(ctx), ctx, nb).to(x.device)
    q = rand(len(ctx), hq, d, dtype=dtype)
    for fused in (True, False):
        both(
            decode_attention.decode_attention,
            q,
            *caches,
            batch.block_tables,
            batch.context_lens,
            batch.max_context_len,
            d**-0.5,
            num_splits=3,
            policy=DecodeSplitPolicy(fused_merge=fused),
        )
