"""One-sequence generation straight on the decoder: the CLI's `generate` and the tests' oracle.

The server goes through the batching engine instead; this loop exists so the
model can be exercised (and compared with transformers) with nothing else
running.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fusionserve.kernels.batch import contiguous_batch
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
    """Yield new token ids one at a time (prefill once, then decode), stopping at a stop id (not yielded)."""
    if not prompt_ids:
        raise ValueError("prompt must hold at least one token")
    total = len(prompt_ids) + opts.max_new_tokens
    if total > model.max_model_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_model_len {model.max_model_len}")
    kv = model.allocate_kv_cache(-(-total // opts.block_size), opts.block_size)
    gen = torch.Generator(device=model.device)
    if opts.seed is not None:
        gen.manual_seed(opts.seed)
    else:
        gen.seed()
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
            logits = model.logits(hidden).float() / opts.temperature
            # Gumbel-max: a sample from softmax(logits) without computing its denominator.
            gumbel = -torch.empty_like(logits).exponential_(generator=gen).log()
            token = int((logits + gumbel).argmax(-1))
        if token in opts.stop_ids:
            return
        yield token
        start = end
        ids = torch.tensor([token], dtype=torch.long, device=model.device)
