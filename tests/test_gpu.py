"""The decoder on CUDA through the Triton backend, against the CPU reference (runs on the GPU machine only)."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels.batch import contiguous_batch
from fusionserve.models.decoder import Decoder
from fusionserve.server.engine.cuda_graphs import DecodeGraphs
from tests.tiny_models import make_tiny_checkpoint, rel_err

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"
)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def ckpt(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch=request.param)


def cuda_config(ckpt, **kw):
    """The engine on the GPU in fp32 (comparable to the CPU reference), with a fixed cache."""
    from fusionserve.server.contract import EngineConfig

    return EngineConfig(model_dir=str(ckpt), device="cuda", dtype="float32", num_kv_blocks=256, **kw)


def run_steps(model: Decoder, ids: torch.Tensor, fusion: bool) -> torch.Tensor:
    """Prefill 40 tokens (large-M path), then 8 decode steps (small-M path); logits of every row."""
    dev = model.device
    kv = model.allocate_kv_cache(8, 16)
    outs = []
    steps = [(0, 40)] + [(p, p + 1) for p in range(40, 48)]
    for a, b in steps:
        batch = contiguous_batch([b - a], [b], 16).to(dev)
        hidden = model.forward(ids[a:b].to(dev), torch.arange(a, b, device=dev), batch, kv, fusion=fusion)
        outs.append(model.logits(hidden).float().cpu())
    return torch.cat(outs)


@pytest.mark.parametrize("fusion", [True, False], ids=["fused", "off"])
def test_triton_bf16_matches_cpu_reference(ckpt, fusion):
    ids = torch.randint(3, 256, (48,))
    ref = run_steps(Decoder.from_pretrained(ckpt, progress=False), ids, fusion=True)
    gpu = Decoder.from_pretrained(ckpt, device="cuda", dtype=torch.bfloat16, progress=False)
    assert gpu.backend.name == "triton"
    assert rel_err(run_steps(gpu, ids, fusion), ref) <= 1e-2


@pytest.mark.parametrize("fusion", [True, False], ids=["fused", "off"])
def test_bf16_model_writes_fp32_logits(ckpt, fusion):
    """The LM head's fp32 accumulator reaches the sampler on both GEMM paths (decode rows: Triton;
    the 40-row prefill: cuBLAS with fp32 output): values bf16 cannot hold, and within fp32 rounding
    of the same bf16 model computed in fp64 from the same hidden rows."""
    gpu = Decoder.from_pretrained(ckpt, device="cuda", dtype=torch.bfloat16, progress=False)
    ids = torch.randint(3, 256, (48,))
    logits = run_steps(gpu, ids, fusion)
    assert logits.dtype == torch.float32
    assert (logits.to(torch.bfloat16).float() != logits).float().mean() > 0.9
    kv = gpu.allocate_kv_cache(8, 16)
    for rows in (40, 1):
        batch = contiguous_batch([rows], [rows], 16).to("cuda")
        hidden = gpu.forward(ids[:rows].cuda(), torch.arange(rows, device="cuda"), batch, kv, fusion=fusion)
        got = gpu.logits(hidden).double().cpu()
        h = hidden.h.double().cpu()
        if fusion:
            x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + gpu.config.rms_norm_eps)
        else:
            x = gpu.backend.rmsnorm(hidden.h).double().cpu()
        want = x @ gpu.weights.lm_head.double().cpu().t()
        assert rel_err(got, want) <= 2e-5, rows


def test_triton_fp32_matches_cpu_reference(ckpt):
    ids = torch.randint(3, 256, (48,))
    ref = run_steps(Decoder.from_pretrained(ckpt, progress=False), ids, fusion=False)
    gpu = Decoder.from_pretrained(ckpt, device="cuda", dtype=torch.float32, progress=False)
    for fusion in (True, False):
        assert rel_err(run_steps(gpu, ids, fusion), ref) <= 1e-4


def test_graph_replay_equals_eager(ckpt):
    model = Decoder.from_pretrained(
        ckpt, device="cuda", dtype=torch.bfloat16, progress=False, max_model_len=256
    )
    kv = model.allocate_kv_cache(64, 16)
    for t in kv.k + kv.v:
        t.normal_()
    graphs = DecodeGraphs(model, kv, max_batch=8, batch_sizes=(1, 4, 8))
    graphs.capture()
    lens = [17, 100, 33]
    batch = contiguous_batch([1, 1, 1], lens, 16).to("cuda")
    ids = torch.randint(3, 256, (3,), device="cuda")
    pos = torch.tensor([n - 1 for n in lens], device="cuda")
    for fused in (True, False):
        replay = graphs.run(ids, pos, batch, fused).float().clone()
        eager = model.logits(model.forward(ids, pos, batch, kv, fusion=fused)).float()
        assert rel_err(replay, eager) <= 1e-3


def test_engine_on_cuda_with_graphs_and_overlap(ckpt):
    """The whole engine on the GPU (fp32 so batching cannot change greedy tokens): batched == alone,
    overlap on == off, CUDA-graph decode steps used, every block freed."""
    import random

    from fusionserve.server.contract import SamplingParams
    from fusionserve.server.engine.llm_engine import LLMEngine

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 60))] for _ in range(16)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    results = {}
    for overlap in (True, False):
        eng = LLMEngine(cuda_config(ckpt, max_num_seqs=16, layer_timing_every=0, overlap=overlap))
        assert eng.runner.graphs is not None
        together = [o[0].token_ids for o in eng.generate(prompts, greedy)]
        alone = [eng.generate([p], greedy)[0][0].token_ids for p in prompts]
        assert together == alone
        results[overlap] = (together, [o[0].token_ids for o in eng.generate(prompts[:4], seeded)])
        assert eng.blocks.check_all_free()
    assert results[True] == results[False]


def test_engine_process_on_cuda_equals_in_process(ckpt):
    """The engine core in its own (spawned) process on the GPU gives the in-process engine's tokens."""
    import asyncio
    import random

    from fusionserve.server.contract import SamplingParams
    from fusionserve.server.engine.llm_engine import LLMEngine
    from fusionserve.server.engine.process_client import ProcessEngineClient

    rng = random.Random(1)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 60))] for _ in range(8)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    cfg = cuda_config(ckpt, max_num_seqs=8, layer_timing_every=3)
    want = [o[0].token_ids for o in LLMEngine(cfg).generate(prompts, greedy)]
    front = ProcessEngineClient(cfg)
    front.start()

    async def one(i, p):
        return [t async for o in front.generate(f"g{i}", p, greedy) for t in o.token_ids]

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    try:
        assert "CUDA graphs" in front.kernel_path
        assert asyncio.run(main()) == want
    finally:
        front.shutdown()


def test_pdl_replays_equal_plain_launches(ckpt):
    """Programmatic dependent launch changes when kernels start, never what they compute: graph replays
    with PDL (repeated, to give a missing wait a chance to race) equal the same graphs without it, bit
    for bit, for batch sizes on the single-program and the split-K / split-context paths."""
    from fusionserve.kernels.pdl import pdl_available

    model = Decoder.from_pretrained(
        ckpt, device="cuda", dtype=torch.bfloat16, progress=False, max_model_len=512
    )
    if not pdl_available("cuda"):
        pytest.skip("PDL needs sm90+ and a Triton with griddepcontrol")
    assert model.backend.pdl, "PDL is on by default where it is available"
    kv = model.allocate_kv_cache(256, 16)
    for t in kv.k + kv.v:
        t.normal_()
    lens = [17, 500, 333, 64, 5, 480, 128, 300]
    batch = contiguous_batch([1] * len(lens), lens, 16).to("cuda")
    ids = torch.randint(3, 256, (len(lens),), device="cuda")
    pos = torch.tensor([n - 1 for n in lens], device="cuda")
    outs = {}
    for pdl in (False, True):
        model.backend.pdl = pdl
        graphs = DecodeGraphs(model, kv, max_batch=8, batch_sizes=(1, 8))
        graphs.capture()
        for fused in (True, False):
            for n in (1, 8):
                sub = contiguous_batch([1] * n, lens[:n], 16).to("cuda") if n < 8 else batch
                got = [graphs.run(ids[:n], pos[:n], sub, fused).float().clone() for _ in range(20)]
                for g in got[1:]:
                    assert torch.equal(g, got[0])
                outs[(pdl, fused, n)] = got[0]
    for key in [(f, n) for f in (True, False) for n in (1, 8)]:
        assert torch.equal(outs[(True, *key)], outs[(False, *key)]), key
