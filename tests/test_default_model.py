"""The embedded SmolLM2-135M-Instruct through our decoder: vs transformers, fused vs off, a sane answer."""

from __future__ import annotations

import pytest
import torch

from fusionserve.kernels.batch import contiguous_batch
from fusionserve.models.decoder import Decoder
from fusionserve.models.generate import GenerateOptions, generate_ids
from fusionserve.models.tokenizer import Tokenizer
from tests.tiny_models import rel_err

TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# Paris 🚀 東京 café"


@pytest.fixture(scope="module")
def model(default_model_dir):
    return Decoder.from_pretrained(default_model_dir, progress=False)


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer(default_model_dir)


def full_logits(model: Decoder, ids: list[int], fusion: bool) -> torch.Tensor:
    kv = model.allocate_kv_cache(-(-len(ids) // 16), 16)
    t = torch.tensor(ids)
    return model.logits(
        model.forward(t, torch.arange(len(ids)), contiguous_batch([len(ids)], [len(ids)], 16), kv, fusion)
    )


def test_logits_match_transformers_on_the_gguf(model, tok, default_gguf_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32
    ).eval()
    ids = tok.encode(TEXT)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    for fusion in (True, False):
        assert rel_err(full_logits(model, ids, fusion), ref) <= 1e-4


def test_fused_and_off_agree(model, tok):
    ids = tok.encode(TEXT)
    fused, off = full_logits(model, ids, True), full_logits(model, ids, False)
    assert rel_err(fused, off) <= 1e-5
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "Write a haiku about GPUs."}]),
        add_special_tokens=False,
    )
    outs = [
        list(generate_ids(model, prompt, GenerateOptions(max_new_tokens=64, fusion=fusion)))
        for fusion in (True, False)
    ]
    assert len(outs[0]) == 64
    assert outs[0] == outs[1]


def test_greedy_chat_answer_knows_paris(model, tok):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
    )
    out = list(generate_ids(model, prompt, GenerateOptions(max_new_tokens=24, stop_ids=tok.eos_token_ids)))
    assert "Paris" in tok.decode(out)


def test_seeded_sampling_is_reproducible(model, tok):
    prompt = tok.encode("Once upon a time")
    opts = GenerateOptions(max_new_tokens=12, temperature=0.8, seed=1234)
    assert list(generate_ids(model, prompt, opts)) == list(generate_ids(model, prompt, opts))
