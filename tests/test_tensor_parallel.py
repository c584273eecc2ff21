"""Tensor parallelism on CPU over gloo (models/tensor_parallel.py): N ranks, each holding its shard,
give the logits and greedy tokens of one unsharded model, fused and off; sizes that do not divide
the heads are refused with a clear message."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
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
from fusionserve.models.tp_group import LeaderDecoder
from fusionserve.server.contract import EngineConfig, SamplingParams
from fusionserve.server.engine.llm_engine import LLMEngine
from fusionserve.server.engine.model_runner import load_decoder
from tests.tiny_models import make_tiny_checkpoint, rel_err

PROMPT = list(range(3, 43))  # 40 tokens: a prefill, then decode steps


def build(
    model_dir: Path, tp: TensorParallel | None, quantization: str = "auto", backend: str = "torch"
) -> Decoder:
    """A rank's decoder; backend "triton" runs the Triton kernels under the CPU interpreter."""
    cfg, weights = load_weights(model_dir, dtype=torch.float32, progress=False, quantization=quantization)
    if tp is not None:
        cfg, weights = shard(cfg, weights, tp.rank, tp.world_size)
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules load (a fresh rank process)
        from fusionserve.kernels.triton_backend import TritonBackend

        be = TritonBackend(geometry(cfg), pdl=False)
    else:
        be = TorchBackend(geometry(cfg))
    return Decoder(cfg, weights, be, max_model_len=128, tp=tp)


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


def _rank(
    rank: int, world: int, init: str, model_dir: str, out: str, quantization: str, backend: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        cfg_full = load_weights(Path(model_dir), progress=False)[0]
        model = build(
            Path(model_dir), TensorParallel(rank, world, cfg_full.vocab_size), quantization, backend
        )
        result = {f: step_logits(model, f) for f in (True, False)}
        result["greedy"] = greedy_continuations(model, [PROMPT[:12], PROMPT[5:30]], 8)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_tp(
    model_dir: Path, world: int, tmp_path: Path, quantization: str = "auto", backend: str = "torch"
) -> dict:
    out = tmp_path / f"tp{world}.pt"
    args = (world, str(tmp_path / "init"), str(model_dir), str(out), quantization, backend)
    mp.spawn(_rank, args=args, nprocs=world)
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


def test_two_ranks_on_the_triton_kernels_equal_one(tiny, tmp_path):
    """The same with the Triton backend (the GPU's kernels, interpreted): the decode GEMMs read the
    all-reduced rows of h as their deferred-norm statistic."""
    check_equal_to_one_rank(tiny, run_tp(tiny, 2, tmp_path, backend="triton"))


def test_fp8_shards(tiny, tmp_path):
    """FP8 weights shard with their per-channel scales; a row-parallel GEMM quantizes its rank's slice
    of x per token (as vLLM does), a finer scale than one rank's, so close rather than equal."""
    got = run_tp(tiny, 2, tmp_path, "fp8")
    one = build(tiny, None, "fp8")
    for fusion in (True, False):
        assert rel_err(got[fusion], step_logits(one, fusion)) <= 0.05, fusion


@pytest.mark.slow
def test_default_model_on_three_ranks(default_model_dir, tmp_path):
    """SmolLM2-135M: 9 heads, 3 KV heads, so 3 ranks (2 do not divide its KV heads)."""
    check_equal_to_one_rank(default_model_dir, run_tp(default_model_dir, 3, tmp_path))


def test_sizes_that_do_not_divide_the_kv_heads_are_refused(default_model_dir):
    cfg, weights = load_weights(default_model_dir, progress=False)
    with pytest.raises(CheckpointError, match="does not divide the model's 3 KV heads"):
        shard(cfg, weights, 0, 2)


def test_engine_leads_a_two_rank_group(tiny):
    """The engine process as rank 0 (models/tp_group.py) with one follower subprocess: the same
    greedy tokens as one rank, the follower replaying every forward and LM-head call."""
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [PROMPT[:7], PROMPT[3:40], PROMPT[10:12]]
    one = LLMEngine(EngineConfig(model_dir=str(tiny), num_kv_blocks=32, layer_timing_every=0))
    want = [o[0].token_ids for o in one.generate(prompts, params)]
    config = EngineConfig(model_dir=str(tiny), num_kv_blocks=32, layer_timing_every=0, tensor_parallel_size=2)
    decoder, _ = load_decoder(config)
    try:
        assert isinstance(decoder, LeaderDecoder) and decoder.config.num_kv_heads == 1
        eng = LLMEngine(config, decoder=decoder)
        for fusion in ("on", "off"):
            eng.fusion.set_mode(fusion)
            assert [o[0].token_ids for o in eng.generate(prompts, params)] == want
    finally:
        decoder.shutdown()
        dist.destroy_process_group()
    assert all(p.returncode == 0 for p in decoder.followers)


def follower_pids() -> list[int]:
    """Processes running a tensor-parallel follower rank (read from /proc: no pgrep needed)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"fusionserve.models.tp_group" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_serve_with_three_ranks_answers_like_one(default_model_dir, tmp_path):
    """`fusionserve serve --tensor-parallel-size 3` (the default model's 3 KV heads) answers the
    openai SDK, greedy, with the text one rank gives; a follower rank killed takes its engine down
    and the server's supervision brings the whole group back."""
    import openai

    from tests.test_api_server import start_server, stop_server

    def ask(server) -> str:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120)
        chat = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=24,
            temperature=0,
        )
        return chat.choices[0].message.content

    texts = {}
    server = start_server(default_model_dir, tmp_path / "tp3.log", "--tensor-parallel-size", "3")
    try:
        texts[3] = ask(server)
        pids = follower_pids()
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.time() + 240
        restarted = False
        while time.time() < deadline and not restarted:
            time.sleep(1)
            metrics = httpx.get(server.url + "/metrics", timeout=5).text
            restarted = "fusionserve_engine_restarts_total 1.0" in metrics and (
                httpx.get(server.url + "/health", timeout=5).status_code == 200
            )
        assert restarted, server.tail()
        assert ask(server) == texts[3]
    finally:
        stop_server(server)
    server = start_server(default_model_dir, tmp_path / "tp1.log")
    try:
        texts[1] = ask(server)
    finally:
        stop_server(server)
    assert texts[3] and texts[3] == texts[1]
