"""kernels/backend.py: whole decoder blocks through the Backend seam, Triton fused vs Triton off vs the torch
reference, for a prefill step (ragged prompts, one after a cached prefix) then a decode step, on the decode
(Triton GEMM) and prefill (cuBLAS + consumer kernels) paths alike."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels.backend import TorchBackend
from fusionserve.kernels.batch import Geometry, LayerKV, Rotary
from fusionserve.kernels.rope_kv import rope_cos_sin
from fusionserve.kernels.triton_backend import TritonBackend
from tests.kernels.common import DEVICE, DTYPES, check, poison_outputs, rand, random_batch, rel_err  # noqa: F401

HQ, HK, D, HIDDEN, INTER, VOCAB, LAYERS, EPS = 4, 2, 12, 48, 72, 50, 1, 1e-5
BS, NB = 16, 24
GEOM = Geometry.of(HQ, HK, D, EPS)


def make_weights(dtype):
    def w(n, k):
        return rand(n, k, dtype=dtype, scale=k**-0.5)

    layers = [
        dict(
            qkv=w((HQ + 2 * HK) * D, HIDDEN),
            b_qkv=rand((HQ + 2 * HK) * D, dtype=dtype, scale=0.1),
            o=w(HIDDEN, HQ * D),
            gate_up=w(2 * INTER, HIDDEN),
            down=w(HIDDEN, INTER),
        )
        for _ in range(LAYERS)
    ]
    return dict(embed=rand(VOCAB, HIDDEN, dtype=dtype), layers=layers, lm_head=w(VOCAB, HIDDEN))


def forward(be, weights, ids, positions, batch, caches, cos_sin, fused):
    """models/decoder.py's block structure, written out against the Backend protocol."""
    h, stats = be.embedding(ids, weights["embed"], fused)
    for i, layer in enumerate(weights["layers"]):
        kv = LayerKV(*caches[i], batch.slot_mapping)
        x, st = (h, stats) if fused else (be.rmsnorm(h), None)
        q = be.attn_input(x, st, layer["qkv"], layer["b_qkv"], Rotary(positions, cos_sin), kv)
        o = be.attention(q, kv, batch)
        h, stats = be.linear(o.reshape(o.shape[0], -1), layer["o"], residual=h, want_stats=fused)
        x, st = (h, stats) if fused else (be.rmsnorm(h), None)
        act, act_st = be.mlp_input(x, st, layer["gate_up"])
        h, stats = be.linear(act, layer["down"], residual=h, want_stats=fused, x_stats=act_st)
    if fused:
        return be.lm_head(h, weights["lm_head"], stats)
    return be.lm_head(be.rmsnorm(h), weights["lm_head"])


def steps(seed_lens):
    """A prefill step (prompts of given lengths; the last one after 7 cached tokens) then a decode step."""
    q_lens = list(seed_lens)
    ctx = list(seed_lens)
    ctx[-1] += 7
    prefill = random_batch(q_lens, ctx, NB, spare=1)
    decode = _next_decode(prefill)
    return prefill, decode


def _next_decode(prev):
    """The step after `prev`: one new token per sequence, same blocks (prefixes fit the tables)."""
    from fusionserve.kernels.batch import PagedBatch

    ctx = prev.context_lens + 1
    slots = []
    for i, c in enumerate(ctx.tolist()):
        pos = c - 1
        slots.append(int(prev.block_tables[i, pos // BS]) * BS + pos % BS)
    n = len(slots)
    return PagedBatch(
        query_start=torch.arange(n + 1, dtype=torch.int32),
        context_lens=ctx.to(torch.int32),
        block_tables=prev.block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=1,
        max_context_len=int(ctx.max()),
        block_size=BS,
    )


def positions_of(batch):
    out = []
    qs, ctx = batch.query_start.tolist(), batch.context_lens.tolist()
    for i, c in enumerate(ctx):
        n = qs[i + 1] - qs[i]
        out += list(range(c - n, c))
    return torch.tensor(out, dtype=torch.int64)


def run(be, weights, dtype, fused, prefill, decode, prefix_cache, cos_sin, ids, dev):
    caches = [(k.clone(), v.clone()) for k, v in prefix_cache]
    outs = []
    for batch, tok in ((prefill, ids[0]), (decode, ids[1])):
        b = batch.to(dev)
        outs.append(forward(be, weights, tok.to(dev), positions_of(batch).to(dev), b, caches, cos_sin, fused))
    return torch.cat(outs)


@pytest.mark.parametrize("small_m_max", [64, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_fused_vs_off_vs_reference(dtype, small_m_max):
    prefill, decode = steps([5, 1, 9])
    ids = (torch.randint(0, VOCAB, (int(prefill.query_start[-1]),)), torch.randint(0, VOCAB, (3,)))
    weights = make_weights(dtype)
    cos_sin = rope_cos_sin(64, D, 10000.0, device=DEVICE)
    prefix_cache = [
        (rand(NB, BS, HK, D, dtype=dtype), rand(NB, BS, HK, D, dtype=dtype)) for _ in range(LAYERS)
    ]

    def cpu64(t):
        return t.detach().cpu().double()

    w64 = {
        "embed": cpu64(weights["embed"]),
        "lm_head": cpu64(weights["lm_head"]),
        "layers": [{k: cpu64(v) for k, v in layer.items()} for layer in weights["layers"]],
    }
    want = run(
        TorchBackend(GEOM),
        w64,
        torch.float64,
        False,
        prefill,
        decode,
        [(cpu64(k), cpu64(v)) for k, v in prefix_cache],
        cos_sin.cpu(),
        ids,
        "cpu",
    )
    be = TritonBackend(GEOM, small_m_max=small_m_max)
    fused = run(be, weights, dtype, True, prefill, decode, prefix_cache, cos_sin, ids, DEVICE)
    off = run(be, weights, dtype, False, prefill, decode, prefix_cache, cos_sin, ids, DEVICE)
    check(fused, want, dtype)
    check(off, want, dtype)
    check(fused, off, dtype)


@pytest.mark.parametrize("small_m_max", [64, 4])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "off"])
def test_lm_head_logits_are_fp32_from_the_accumulator(fused, small_m_max):
    """bf16 activations and weights, fp32 logits: within fp32 accumulation error of the exact product
    (1e-5), where rounding the logits to bf16 would cost ~2e-3, on the small-M Triton GEMM (M=3) and
    the cuBLAS path (M=9 > small_m_max=4) alike; the deferred final-norm scale applied in fp32."""
    torch.manual_seed(0)
    be = TritonBackend(GEOM, small_m_max=small_m_max)
    w = rand(VOCAB * 3, HIDDEN, dtype=torch.bfloat16, scale=HIDDEN**-0.5)
    for m in (3, 9):
        h = rand(m, HIDDEN, dtype=torch.bfloat16, scale=3.0)
        stats = h.float().pow(2).sum(-1, keepdim=True) if fused else None
        x = h if fused else be.rmsnorm(h)
        got = be.lm_head(x, w, stats)
        assert got.dtype == torch.float32 and got.shape == (m, VOCAB * 3) and torch.isfinite(got).all()
        want = x.double().cpu() @ w.double().cpu().t()
        if fused:
            want = want * torch.rsqrt(h.double().cpu().pow(2).mean(-1, keepdim=True) + EPS)
        assert rel_err(got.cpu(), want) <= 1e-5
        assert rel_err(want.to(torch.bfloat16), want) > 1e-4  # what bf16 logits would have lost
        ref = TorchBackend(GEOM).lm_head(x.cpu(), w.cpu(), None if stats is None else stats.cpu())
        assert ref.dtype == torch.float32 and rel_err(ref, want) <= 1e-5
