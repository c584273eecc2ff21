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


@pytest.mark.parametrize("config", [None, (16, 16, 16, 2, 1, 1), (16, 32, 16, 4, 1, 3)])  # split-K too
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_gemm_epilogue_rope_kv(dtype, m, config):
    """At decode sizes the qkv GEMM's epilogue rotates q and k from the fp32 accumulator and writes q, K
    and V itself (norm_linear PAIR_ROPE): against float64 and against the separate rope_kv pass, with
    the deferred scale, a qkv bias (Qwen2), GQA and a padding row that must write nothing."""
    from fusionserve.kernels.tile_configs import m_bucket
    from fusionserve.kernels.triton_backend import TritonBackend

    hq, hk, d, hidden = 4, 2, 32, 48
    geom = Geometry.of(hq, hk, d, EPS)
    width = (hq + 2 * hk) * d
    x = rand(m, hidden, dtype=dtype)
    w = rand(width, hidden, dtype=dtype, scale=hidden**-0.5)
    bias = rand(width, dtype=dtype)
    stats = (torch.rand(m, 3, dtype=torch.float64) * hidden).float().to(DEVICE)
    cos_sin = rope_cos_sin(64, d, 10000.0, device=DEVICE)
    positions = torch.randint(0, 64, (m,), device=DEVICE)
    slots = torch.randperm(NB * BS, device=DEVICE)[:m]
    if m > 1:
        slots[1] = -1
    caches = {}
    for fused in (True, False):
        be = TritonBackend(geom, rope_in_gemm=fused)
        if config is not None:
            be.tiles = {(width, hidden, m_bucket(m), False): config}
        k_cache, v_cache = (torch.zeros(NB, BS, hk, d, dtype=dtype, device=DEVICE) for _ in range(2))
        q = be.attn_input(x, stats, w, bias, Rotary(positions, cos_sin), LayerKV(k_cache, v_cache, slots))
        caches[fused] = (q, k_cache, v_cache)
    raw = x.double() @ w.double().t() * torch.rsqrt(stats.double().sum(-1, keepdim=True) / hidden + EPS)
    raw = raw + bias.double()
    q_want, k_new = ref.rope(
        raw[:, : hq * d].view(m, hq, d),
        raw[:, hq * d : (hq + hk) * d].view(m, hk, d),
        positions,
        cos_sin.double(),
    )
    k_want, v_want = (torch.zeros(NB, BS, hk, d, dtype=torch.float64, device=DEVICE) for _ in range(2))
    ref.write_kv(k_new, raw[:, (hq + hk) * d :].view(m, hk, d), k_want, v_want, slots)
    for q, k_cache, v_cache in caches.values():
        check(q, q_want, dtype)
        check(k_cache, k_want, dtype)
        check(v_cache, v_want, dtype)
    assert caches[True][0].shape == (m, hq, d)
    if m > 1:  # the padding row's slot holds nothing, fused or not
        assert int(caches[True][1].ne(0).flatten(2).any(-1).sum()) == m - 1
