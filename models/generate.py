"""One-sequence generation straight on the decoder: the CLI's `generate` and the tests' oracle.

The server goes through the batching engine instead; this loop exists so the
model can be exercised (and compared with transformers) with nothing else
running.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fusionserve.kernels.backend import draw_tokens
from fusionserve.kernels.batch import Draw, choice_noise_seed, contiguous_batch, mix64
from fusionserve.models.decoder import Decoder


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 → greedy
    seed: int | None = None
    fusion: bool = True
    stop_ids: frozenset[int] = frozenset()
    block_size: int = 16


def generate_ids(model: Decoder, prompt_ids: list[int], opts: GenerateOptions) -> Iterator[int]:
    """Yield new token ids one at a time (prefill once, then decode), stopping at a stop id (not yielded).

    Temperature draws are the server's: Gumbel-max over Philox noise keyed by (seed, position) as the
    engine keys choice 0 of a seeded request (kernels/batch.mix64), so `generate --seed S` writes
    what the server answers for the same prompt, seed and temperature."""
    if not prompt_ids:
        raise ValueError("prompt must hold at least one token")
    total = len(prompt_ids) + opts.max_new_tokens
    if total > model.max_model_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_model_len {model.max_model_len}")
    kv = model.allocate_kv_cache(-(-total // opts.block_size), opts.block_size)
    noise_seed = choice_noise_seed(opts.seed, 0)
    fresh = random.Random()  # unseeded: a new key per token
    temps = torch.tensor([opts.temperature], dtype=torch.float32, device=model.device)
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=model.device)
    start = 0
    for _ in range(opts.max_new_tokens):
        end = start + len(ids)
        batch = contiguous_batch([len(ids)], [end], opts.block_size).to(model.device)
        positions = torch.arange(start, end, device=model.device)
        hidden = model.forward(ids, positions, batch, kv, fusion=opts.fusion).rows(
            torch.tensor([len(ids) - 1], device=model.device)
        )
        if opts.temperature <= 0:
            token = int(model.logits(hidden, scaled=False).argmax(-1))
        else:
            key = mix64(noise_seed, end) if noise_seed is not None else fresh.getrandbits(63)
            keys = torch.tensor([key], dtype=torch.int64, device=model.device)
            token = int(draw_tokens(model.logits(hidden).float(), Draw(temps, keys, True))[0])
        if token in opts.stop_ids:
            return
        yield token
        start = end
        ids = torch.tensor([token], dtype=torch.long, device=model.device)
