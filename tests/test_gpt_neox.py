"""GPT-NeoX (Pythia) end to end on the CPU: config spellings, weight layout and LayerNorm folding,
the deferred LayerNorm (mean and variance from the producer) against transformers in fp32, fused ≡
off through the engine (chunked prefill, preemption), and the numerics of large-mean rows."""

from __future__ import annotations

import json

import pytest
import torch

from fusionserve.kernels import reference
from fusionserve.kernels.backend import TorchBackend, select_backend
from fusionserve.kernels.batch import contiguous_batch
from fusionserve.models.config import load_config, parse_config
from fusionserve.models.decoder import Decoder, geometry
from fusionserve.server.contract import EngineConfig, SamplingParams
from fusionserve.server.engine.llm_engine import LLMEngine
from tests.tiny_models import make_tiny_neox, rel_err

CASES = {
    "parallel-rot0.25": dict(parallel=True, rotary_pct=0.25),
    "parallel-rot1.0": dict(parallel=True, rotary_pct=1.0),
    "sequential-rot0.25": dict(parallel=False, rotary_pct=0.25),
    "sequential-rot1.0": dict(parallel=False, rotary_pct=1.0),
}


@pytest.fixture(scope="module", params=list(CASES))
def neox(request, tmp_path_factory):
    path = make_tiny_neox(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 256, (150,), generator=torch.Generator().manual_seed(2))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    return path, ids, ref


@pytest.mark.parametrize("fusion", [True, False], ids=["fused", "off"])
def test_logits_match_transformers_prefill_chunks_and_decode(neox, fusion):
    path, ids, ref = neox
    model = Decoder.from_pretrained(path, progress=False)
    assert model.config.layer_norm and isinstance(model.backend, TorchBackend)
    kv = model.allocate_kv_cache(num_blocks=16, block_size=16)
    out = []
    for a, b in [(0, 100), (100, 137)] + [(p, p + 1) for p in range(137, 150)]:
        batch = contiguous_batch([b - a], [b], 16)
        hidden = model.forward(ids[a:b], torch.arange(a, b), batch, kv, fusion=fusion)
        out.append(model.logits(hidden))
    assert rel_err(torch.cat(out), ref) <= 1e-4


def test_both_config_spellings_read_the_same(tmp_path):
    path = make_tiny_neox(tmp_path / "m", parallel=False, rotary_pct=0.25)
    new = load_config(path)
    raw = json.loads((path / "config.json").read_text())
    old = {k: v for k, v in raw.items() if k != "rope_parameters"}
    old.update(rotary_pct=0.25, rotary_emb_base=10000)  # as the published Pythia configs say it
    assert parse_config(old) == new
    assert (new.rotary_dims, new.parallel_residual, new.gelu, new.head_dim) == (4, False, "none", 16)
    with pytest.raises(Exception, match="activation"):
        parse_config({**old, "hidden_act": "relu"})


def engine(path, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("layer_timing_every", 0)
    return LLMEngine(EngineConfig(model_dir=str(path), **kw), tokenizer=None)


def test_engine_fused_equals_off_with_chunks_and_preemption(tmp_path):
    path = make_tiny_neox(tmp_path / "m", parallel=True, rotary_pct=0.25)
    rng = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (int(n),), generator=rng).tolist() for n in (5, 40, 90, 17, 63, 30)]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    roomy = [o[0].token_ids for o in engine(path, fusion="on").generate(prompts, greedy)]
    assert [o[0].token_ids for o in engine(path, fusion="off").generate(prompts, greedy)] == roomy
    tight = engine(
        path, fusion="on", num_kv_blocks=10, max_num_batched_tokens=32, enable_prefix_caching=False
    )
    assert [o[0].token_ids for o in tight.generate(prompts, greedy)] == roomy
    assert tight.stats().preemptions > 0 and tight.blocks.check_all_free()


def test_large_mean_rows_keep_their_variance():
    """Rows with mean 1e4 and spread 1: the shifted statistics give the variance to fp32 precision;
    the naive Σx² − Kμ² in fp32 loses it entirely (the test would catch that formula)."""
    torch.manual_seed(0)
    x = (torch.randn(8, 512, dtype=torch.float64) + 1e4).float()
    want = x.double().var(-1, unbiased=False, keepdim=True)
    mean, rstd = reference.ln_scale(reference.ln_stats(x), 512, 0.0)
    assert torch.isfinite(rstd).all()
    assert rel_err(1 / rstd.double() ** 2, want) <= 1e-4
    assert rel_err(mean.double(), x.double().mean(-1, keepdim=True)) <= 1e-6
    xf = x.float()
    naive = xf.pow(2).sum(-1, keepdim=True) / 512 - (xf.sum(-1, keepdim=True) / 512) ** 2
    assert (naive.double() - want).abs().max() > 0.5  # what the shift avoids
    # The normalized rows: fp32 rounds x − μ at |μ|/σ = 1e4 to ~3e-4 (an ulp of 1e4 is 1e-3); at
    # |μ|/σ = 1e2 the result is within 1e-4.
    for shift, tol in ((1e4, 1e-3), (1e2, 1e-4)):
        xs = (torch.randn(8, 512, dtype=torch.float64) + shift).float()
        want_y = torch.nn.functional.layer_norm(xs.double(), (512,), eps=1e-5)
        assert rel_err(reference.layernorm(xs, 1e-5), want_y) <= tol


def test_layernorm_models_pick_the_triton_backend_on_cuda(tmp_path):
    from fusionserve.kernels.triton_backend import TritonBackend

    cfg = load_config(make_tiny_neox(tmp_path / "m"))
    assert geometry(cfg).layer_norm and geometry(cfg).gelu == "none"
    assert isinstance(select_backend("cuda", geometry(cfg)), TritonBackend)
    assert isinstance(select_backend("cpu", geometry(cfg)), TorchBackend)


def test_engine_ab_layer_timings_and_prefix_caching(tmp_path):
    """What Llama has, on GPT-NeoX: --fusion ab alternates the paths with the same tokens, per-layer
    timings are sampled for both, and a shared prompt prefix is served from cached blocks."""
    path = make_tiny_neox(tmp_path / "m", parallel=False, rotary_pct=1.0)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    shared = list(range(3, 51))  # three full 16-token blocks
    prompts = [shared + [60, 61], shared + [70, 71, 72]]
    want = [
        o[0].token_ids
        for o in engine(path, fusion="on", enable_prefix_caching=False).generate(prompts, greedy)
    ]
    eng = engine(path, fusion="ab", layer_timing_every=1)
    got = [eng.generate([p], greedy)[0][0].token_ids for p in prompts]  # one after the other: a cache hit
    assert got == want
    assert eng.stats().prefix_hit_rate > 0
    stats = eng.take_step_stats()
    assert {path_ for _, path_, _ in stats.steps} == {"on", "off"}
    assert {path_ for _, path_, *_ in stats.layers} == {"on", "off"}
    assert {layer for *_, layer, _, _ in stats.layers} == {0, 1}


@pytest.mark.slow
def test_openai_api_serves_a_gpt_neox_model(default_model_dir, tmp_path):
    """A tiny random GPT-NeoX with the default model's tokenizer behind `fusionserve serve --fusion
    ab`: completions, chat and streaming through the openai SDK."""
    import shutil

    import openai

    from tests.test_api_server import start_server, stop_server

    path = make_tiny_neox(tmp_path / "neox", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_model_dir / name).is_file():
            shutil.copy(default_model_dir / name, path / name)
    server = start_server(path, tmp_path / "neox.log", "--fusion", "ab")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60)
        model = client.models.list().data[0].id
        done = client.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0)
        assert done.usage.completion_tokens == 6 and done.choices[0].finish_reason == "length"
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
        )
        assert chat.usage.completion_tokens == 5
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=5,
                temperature=0,
                stream=True,
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == chat.choices[0].message.content  # the same greedy text, either path of ab
    finally:
        stop_server(server)
