"""kernels/rope_kv.py: RoPE + paged KV write (with the deferred scale and bias of the large-M path) and the cos/sin tables."""

from __future__ import annotations

import math

import pytest
import torch

from fusionserve.kernels import reference as ref
from fusionserve.kernels.batch import Geometry, LayerKV, Rotary
from fusionserve.kernels.rope_kv import rope_cos_sin, rope_kv_write
from tests.kernels.common import DEVICE, DTYPES, M_VALUES, check, poison_outputs, rand  # noqa: F401

HQ, HK, D, BS, NB = 6, 2, 16, 16, 9
EPS = 1e-5
HIDDEN = 40
GEOM = Geometry.of(HQ, HK, D, EPS)


@pytest.mark.parametrize("rot", [D, D // 4])
@pytest.mark.parametrize("scaled", [False, True, "rows"])
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kv_write(dtype, m, scaled, rot):
    """`scaled`: partial sums of squares, or ("rows") the GEMM input rows themselves as the statistic.
    `rot` < D: partial rotary (GPT-NeoX), the table as wide as the rotating dims, the rest passed on."""
    width = (HQ + 2 * HK) * D
    qkv = rand(m, width, dtype=dtype)
    cos_sin = rope_cos_sin(
        64,
        rot,
        500000.0,
        {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16},
        device=DEVICE,
    )
    positions = torch.randint(0, 64, (m,), device=DEVICE)
    slots = torch.randperm(NB * BS, device=DEVICE)[:m]
    if m > 1:
        slots[1] = -1  # padding row: must not be written
    k_cache = rand(NB, BS, HK, D, dtype=dtype)
    v_cache = rand(NB, BS, HK, D, dtype=dtype)
    k_want, v_want = k_cache.clone().double(), v_cache.clone().double()
    stats = bias = None
    raw = qkv.double()
    if scaled:
        bias = rand(width, dtype=dtype)
        if scaled == "rows":
            stats = rand(m, HIDDEN, dtype=dtype)
            sumsq = (stats.double() ** 2).sum(-1, keepdim=True)
        else:
            stats = (torch.rand(m, 2, dtype=torch.float64) * HIDDEN).float().to(DEVICE)
            sumsq = stats.double().sum(-1, keepdim=True)
        raw = raw * torch.rsqrt(sumsq / HIDDEN + EPS) + bias.double()
    q = rope_kv_write(
        qkv, Rotary(positions, cos_sin), LayerKV(k_cache, v_cache, slots), GEOM, stats, HIDDEN, bias
    )
    q_want, k_new = ref.rope(
        raw[:, : HQ * D].view(m, HQ, D),
        raw[:, HQ * D : (HQ + HK) * D].view(m, HK, D),
        positions,
        cos_sin.double(),
    )
    ref.write_kv(k_new, raw[:, (HQ + HK) * D :].view(m, HK, D), k_want, v_want, slots)
    check(q, q_want, dtype)
    check(k_cache, k_want, dtype)
    check(v_cache, v_want, dtype)


def test_cos_sin_tables():
    plain = rope_cos_sin(32, 8, 10000.0)
    pos = torch.arange(32, dtype=torch.float64)[:, None]
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    assert torch.allclose(plain.double(), torch.cat(((pos * inv).cos(), (pos * inv).sin()), -1), atol=1e-6)
    # llama3: high frequencies untouched, the lowest divided by `factor`, the band in between smoothed
    cfg = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    scaled = rope_cos_sin(4, 64, 500000.0, cfg)
    inv = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    got = torch.atan2(scaled[1, 32:].double(), scaled[1, :32].double())  # position 1: angle = inv_freq
    wavelen = 2 * math.pi / inv
    assert torch.allclose(got[wavelen < 16], inv[wavelen < 16], rtol=1e-5)
    assert torch.allclose(got[wavelen > 64], inv[wavelen > 64] / 8, rtol=1e-5)
    band = (wavelen >= 16) & (wavelen <= 64)
    assert band.any() and ((got[band] <= inv[band]) & (got[band] >= inv[band] / 8)).all()
    lin = rope_cos_sin(8, 8, 10000.0, {"type": "linear", "factor": 2.0})
    assert torch.allclose(lin[2], plain[1], atol=1e-6)
