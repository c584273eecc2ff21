"""kernels/sampling.py (FlashSampling): the LM head's epilogue draws exactly what the sampler draws from
written logits, and both exactly what the torch reference draws (Philox bits, Gumbel-max, first-max ties)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fusionserve.kernels import reference as ref
from fusionserve.kernels import sampling
from fusionserve.kernels.batch import Draw
from fusionserve.kernels.layernorm_linear import linear_layernorm
from fusionserve.kernels.norm_linear import linear
from tests.kernels.common import DEVICE, poison_outputs, rand  # noqa: F401

K, V = 64, 1000  # V: not a multiple of any BLOCK_N


def draw_rows(m: int, seed: int, greedy_rows=(0,)) -> Draw:
    g = torch.Generator().manual_seed(seed)
    temps = 0.3 + 1.5 * torch.rand(m, generator=g)
    temps[list(r for r in greedy_rows if r < m)] = 0.0
    keys = torch.randint(0, 2**63 - 1, (m,), generator=g, dtype=torch.int64)
    return Draw(temps.to(DEVICE), keys.to(DEVICE), True)


@triton.jit
def _uniform_kernel(keys_ptr, out_ptr, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    key = tl.load(keys_ptr + offs_m, mask=offs_m < M, other=0)
    lo = (key & 0xFFFFFFFF).to(tl.uint32)
    hi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    u = sampling.philox_uniform(lo[:, None], hi[:, None], offs_n.to(tl.uint32)[None, :])
    tl.store(out_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], u, mask=(offs_m < M)[:, None])


@triton.jit
def _randint_kernel(out_ptr, seed, BLOCK_N: tl.constexpr):
    offs = tl.arange(0, BLOCK_N)
    tl.store(out_ptr + offs, tl.randint(seed, offs))


def test_philox_bits_match_the_reference_and_tritons_own():
    keys = torch.tensor([0, 1, 12345, 2**40 + 7, 2**63 - 1], dtype=torch.int64, device=DEVICE)
    out = torch.empty(5, 256, device=DEVICE)
    _uniform_kernel[(1,)](keys, out, 5, BLOCK_M=8, BLOCK_N=256)
    want = ref.philox_uniform(keys.cpu(), 256)
    assert torch.equal(out.cpu(), want)
    assert 0.0 < float(want.min()) and float(want.max()) < 1.0  # g is always finite
    raw = torch.empty(256, dtype=torch.int32, device=DEVICE)
    _randint_kernel[(1,)](raw, 12345, BLOCK_N=256)  # the same Philox 4x32-10 as tl.randint
    u = (((raw.cpu().to(torch.int64) & 0xFFFFFFFF) >> 9).float() + 0.5) * 2.0**-23
    assert torch.equal(u, want[2])


def test_gumbel_max_draws_from_the_softmax():
    """Reference draws over 20k keys: frequencies within 0.02 of softmax(z / T)."""
    z = torch.tensor([[1.0, 0.0, -1.0, 0.5, -3.0, 2.0, -30.0, 0.2]])
    n, t = 20000, 0.8
    keys = torch.randint(0, 2**63 - 1, (n,), generator=torch.Generator().manual_seed(0))
    ids = ref.gumbel_argmax(z.expand(n, -1), torch.full((n,), t), keys)
    freq = torch.bincount(ids, minlength=8).float() / n
    assert torch.allclose(freq, torch.softmax(z[0] / t, -1), atol=0.02)


@pytest.mark.parametrize("m", [1, 5, 17])
def test_unfused_draw_matches_reference(m):
    logits = (rand(m, V) * 4).float()
    d = draw_rows(m, m, greedy_rows=(0, 3))
    got = sampling.gumbel_argmax_triton(logits, d.temps, d.keys)
    assert torch.equal(got.cpu(), ref.gumbel_argmax(logits.cpu(), d.temps.cpu(), d.keys.cpu()))
    # greedy only: the plain argmax, first maximum on ties (also across tiles)
    logits[:, 5] = 50.0
    logits[:, 1010 % V] = 50.0
    greedy = sampling.gumbel_argmax_triton(logits, torch.zeros(m, device=DEVICE), d.keys, random=False)
    assert greedy.tolist() == [5] * m


@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("config", [(16, 32, 32, 2, 1, 1), (16, 64, 32, 4, 1, 2)])  # split-K too
def test_lm_head_epilogue_draws_what_the_sampler_draws(m, config):
    """The fused LM head (RMSNorm scale deferred, fp32 accumulator) draws, for the same keys, exactly
    the tokens the unfused draw takes from the logits the same GEMM writes: seeded and greedy rows."""
    x = rand(m, K, dtype=torch.bfloat16)
    w = rand(V, K, dtype=torch.bfloat16, scale=K**-0.5)
    stats = (torch.rand(m, 4) * 10 + 1).to(DEVICE)
    d = draw_rows(m, 100 + m)
    logits = torch.empty(m, V, device=DEVICE, dtype=torch.float32)
    linear(x, w, row_stats=stats, config=config, out=logits)
    fused, _ = linear(x, w, row_stats=stats, config=config, draw=d)
    assert fused.dtype == torch.int64 and fused.shape == (m,)
    assert torch.equal(fused, sampling.gumbel_argmax_triton(logits, d.temps, d.keys))
    assert torch.equal(fused.cpu(), ref.gumbel_argmax(logits.cpu(), d.temps.cpu(), d.keys.cpu()))
    greedy, _ = linear(x, w, row_stats=stats, config=config, draw=Draw(d.temps * 0, d.keys, False))
    assert torch.equal(greedy, logits.argmax(-1))
    again, _ = linear(x, w, row_stats=stats, config=config, draw=d)  # counters were re-armed
    assert torch.equal(again, fused)
    # A mixed step: rows with T < 0 get their logits written (the sampler's), the others are drawn.
    flagged = torch.arange(m, device=DEVICE) % 2 == 1
    buf = torch.full((m, V), float("nan"), device=DEVICE)
    mixed_draw = Draw(torch.where(flagged, -1.0, d.temps), d.keys, True, logits=buf)
    mixed, _ = linear(x, w, row_stats=stats, config=config, draw=mixed_draw)
    assert torch.equal(mixed[~flagged], fused[~flagged])
    assert torch.equal(buf[flagged], logits[flagged]) and buf[~flagged].isnan().all()


def test_layernorm_lm_head_epilogue_draws_what_the_sampler_draws():
    m = 3
    x = rand(m, K, dtype=torch.float32) + 3.0  # a large mean: the deferred mean correction matters
    w = rand(V, K, dtype=torch.float32, scale=K**-0.5)
    col_sums, bias = w.sum(1), rand(V, dtype=torch.float32)
    stats = ref.ln_stats(x)
    d = draw_rows(m, 7)
    logits = torch.empty(m, V, device=DEVICE, dtype=torch.float32)
    linear_layernorm(x, w, col_sums, bias, stats, out=logits, config=(16, 32, 32, 2, 1, 1))
    fused, _ = linear_layernorm(x, w, col_sums, bias, stats, draw=d, config=(16, 32, 32, 2, 1, 1))
    assert torch.equal(fused.cpu(), ref.gumbel_argmax(logits.cpu(), d.temps.cpu(), d.keys.cpu()))


def test_engine_on_the_triton_backend_draws_in_the_lm_head(tmp_path):
    """The engine over the Triton backend (interpreter on CPU), head size 32 so the qkv epilogue
    applies RoPE and writes the paged cache too: seeded, greedy and top-p rows in the same steps give
    the same tokens with FlashSampling on (plain rows drawn in the LM head, the top-p row's logits
    written in the same pass), off (all rows from written logits), and on the torch backend."""
    from fusionserve.kernels.triton_backend import TritonBackend
    from fusionserve.models.decoder import Decoder
    from fusionserve.server.contract import EngineConfig, SamplingParams
    from fusionserve.server.engine.llm_engine import LLMEngine
    from tests.tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "m", head_dim=32, num_layers=1)
    torch_model = Decoder.from_pretrained(path, DEVICE, torch.float32, backend="torch", progress=False)
    triton_model = Decoder(
        torch_model.config, torch_model.weights, TritonBackend(torch_model.backend.geometry, pdl=False)
    )
    prompts = [[5, 9, 23, 7], [11, 3], [40, 41, 42, 43, 44, 45]]
    params = [
        SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=6, top_p=0.9, seed=4, ignore_eos=True),
    ]
    texts = {}
    for name, model, flash in (
        ("triton", triton_model, True),
        ("triton-off", triton_model, False),
        ("torch", torch_model, True),
    ):
        cfg = EngineConfig(
            model_dir=str(path),
            device=DEVICE.type,
            dtype="float32",
            num_kv_blocks=16,
            layer_timing_every=0,
            flash_sampling=flash,
        )
        eng = LLMEngine(cfg, decoder=model)
        plan, drawn = eng.sampler.lm_head_draw, []
        eng.sampler.lm_head_draw = lambda *a, plan=plan, seen=drawn: seen.append(plan(*a)) or seen[-1]
        texts[name] = [o[0].token_ids for o in eng.generate(prompts, params)]
        assert sum(d is not None and d.rest != [] for d in drawn) >= (5 if flash else 0), name
    assert texts["triton"] == texts["triton-off"], texts  # the same kernels' logits: exactly
    assert texts["triton"][1] == texts["torch"][1]  # greedy on the other backend


def test_an_lm_head_with_too_many_tiles_draws_from_its_written_logits():
    """Past TritonBackend.flash_max_tiles column tiles the LM head writes its logits and one pass
    draws from them (FlashSampling's per-tile epilogue costs more than it saves there): the same
    tokens, and a mixed step's flagged rows still find their logits (here: every row's)."""
    from fusionserve.kernels.batch import Geometry
    from fusionserve.kernels.triton_backend import TritonBackend

    m = 3
    be = TritonBackend(Geometry.of(2, 1, 16, 1e-5), pdl=False)
    x = rand(m, K, dtype=torch.float32)
    w = rand(V, K, dtype=torch.float32, scale=K**-0.5)
    stats = (torch.rand(m, 1) * 10 + 1).to(DEVICE)
    d = draw_rows(m, 21)
    flagged = torch.tensor([False, True, False], device=DEVICE)
    col_sums, bias, ln_stats = w.sum(1), rand(V, dtype=torch.float32), ref.ln_stats(x + 2.0)
    results = {}
    for max_tiles in (be.flash_max_tiles, 0):
        be.flash_max_tiles = max_tiles
        buf = torch.full((m, V), float("nan"), device=DEVICE)
        mixed = Draw(torch.where(flagged, -1.0, d.temps), d.keys, True, logits=buf)
        results[max_tiles] = (
            be.lm_head(x, w, stats, draw=d),
            be.lm_head(x, w, stats, draw=mixed)[~flagged],
            buf[flagged].clone(),
            be.ln_lm_head(x + 2.0, ln_stats, w, col_sums, bias, draw=d),
        )
    fused, unfused = results.values()
    for a, b in zip(fused, unfused):
        assert torch.equal(a, b)
    logits = be.lm_head(x, w, stats)
    assert torch.equal(fused[0].cpu(), ref.gumbel_argmax(logits.cpu(), d.temps.cpu(), d.keys.cpu()))
    assert torch.equal(fused[2], logits[flagged])
