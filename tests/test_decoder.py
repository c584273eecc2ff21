"""Our decoder vs transformers on tiny random checkpoints, both norm paths."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels.batch import contiguous_batch
from fusionserve.models.decoder import Decoder
from tests.tiny_models import make_tiny_checkpoint, rel_err

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie=True),
    "llama-sharded": dict(arch="llama", max_shard_size="100KB"),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
    "llama-linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
}


def hf_logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    if request.param == "llama-sharded":
        assert (path / "model.safetensors.index.json").is_file()
    ids = torch.randint(3, 256, (150,), generator=torch.Generator().manual_seed(1))
    return path, ids, hf_logits(path, ids)


@pytest.mark.parametrize("fusion", [True, False], ids=["fused", "off"])
def test_prefill_logits_match_transformers(case, fusion):
    path, ids, ref = case
    model = Decoder.from_pretrained(path, progress=False)
    kv = model.allocate_kv_cache(num_blocks=16, block_size=16)
    batch = contiguous_batch([len(ids)], [len(ids)], 16)
    hidden = model.forward(ids, torch.arange(len(ids)), batch, kv, fusion=fusion)
    assert rel_err(model.logits(hidden), ref) <= 1e-4


@pytest.mark.parametrize("fusion", [True, False], ids=["fused", "off"])
def test_chunked_prefill_then_decode_match_transformers(case, fusion):
    """Prefill in two chunks, then decode token by token: every row equals the full-sequence reference."""
    path, ids, ref = case
    model = Decoder.from_pretrained(path, progress=False)
    kv = model.allocate_kv_cache(num_blocks=16, block_size=16)
    steps = [(0, 70), (70, 140)] + [(p, p + 1) for p in range(140, 150)]
    for a, b in steps:
        batch = contiguous_batch([b - a], [b], 16)
        hidden = model.forward(ids[a:b], torch.arange(a, b), batch, kv, fusion=fusion)
        assert rel_err(model.logits(hidden), ref[a:b]) <= 1e-4


def test_packed_batch_of_ragged_sequences(case):
    """Two sequences prefilled in one packed step, then decoded together, match their solo references."""
    path, ids, ref = case
    model = Decoder.from_pretrained(path, progress=False)
    kv = model.allocate_kv_cache(num_blocks=32, block_size=16)
    other = ids[:37].flip(0)
    ref_other = hf_logits(path, other)
    batch = contiguous_batch([100, 37], [100, 37], 16)
    both = torch.cat([ids[:100], other])
    pos = torch.cat([torch.arange(100), torch.arange(37)])
    logits = model.logits(model.forward(both, pos, batch, kv, fusion=True))
    assert rel_err(logits[:100], ref[:100]) <= 1e-4
    assert rel_err(logits[100:], ref_other) <= 1e-4
    # one decode step for both, sharing the block layout of the prefill
    batch2 = contiguous_batch([1, 1], [101, 38], 16)
    step_ids = torch.stack([ids[100], ids[0]])
    ref_other2 = hf_logits(path, torch.cat([other, ids[:1]]))
    logits = model.logits(model.forward(step_ids, torch.tensor([100, 37]), batch2, kv, fusion=True))
    assert rel_err(logits[0], ref[100]) <= 1e-4
    assert rel_err(logits[1], ref_other2[-1]) <= 1e-4


def test_unscaled_greedy_logits_keep_argmax(case):
    path, ids, _ = case
    model = Decoder.from_pretrained(path, progress=False)
    kv = model.allocate_kv_cache(num_blocks=16, block_size=16)
    hidden = model.forward(ids, torch.arange(len(ids)), contiguous_batch([150], [150], 16), kv, fusion=True)
    assert torch.equal(model.logits(hidden, scaled=False).argmax(-1), model.logits(hidden).argmax(-1))
