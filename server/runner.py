"""One model step: the scheduler's plan → packed tensors → decoder → logits of the rows that matter.

The runner owns the KV-cache tensors and knows nothing about requests. Logits
are computed only for rows that will be sampled (the last new token of a
sequence whose chunk reaches its end) and, for prompt logprobs, the prompt rows.
Sampled steps time each layer half through the decoder's `timer` hook.

CUDA graphs (server/cuda_graphs.py): on CUDA, decode-only steps replay a graph
captured for the smallest batch size >= theirs, unless the step is timed
(per-layer timing needs the eager path). Everything else runs eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.batch import PagedBatch
from models.decoder import Decoder, KVCache

if TYPE_CHECKING:
    from server.cuda_graphs import DecodeGraphs
    from server.scheduler import Sequence


@dataclass
class StepInputs:
    ids: torch.Tensor
    positions: torch.Tensor
    batch: PagedBatch
    logit_rows: torch.Tensor  # rows of the packed tokens whose logits are computed
    sample_index: list[int | None]  # per planned sequence: its sampled row within logit_rows, or None
    prompt_index: list[tuple[int, int] | None]  # per sequence: (first, count) of its prompt-logprob rows


class LayerTimer:
    """The decoder's `timer` hook: perf_counter on CPU, CUDA events on GPU (resolved after the step)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._records: list[tuple[int, str, object, object]] = []

    @contextmanager
    def __call__(self, layer: int, part: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._records.append((layer, part, start, end))

    def results(self) -> list[tuple[int, str, float]]:
        """(layer, part, seconds) for every timed part, plus part="block" = attn + mlp."""
        if self.cuda:
            torch.cuda.synchronize()
            timed = [(la, p, s.elapsed_time(e) / 1e3) for la, p, s, e in self._records]
        else:
            timed = [(la, p, e - s) for la, p, s, e in self._records]
        blocks: dict[int, float] = {}
        for layer, _, secs in timed:
            blocks[layer] = blocks.get(layer, 0.0) + secs
        return timed + [(layer, "block", secs) for layer, secs in sorted(blocks.items())]


class ModelRunner:
    def __init__(self, decoder: Decoder, num_blocks: int, block_size: int):
        self.decoder = decoder
        self.device = decoder.device
        self.block_size = block_size
        self.kv: KVCache = decoder.allocate_kv_cache(num_blocks, block_size)
        self.graphs: DecodeGraphs | None = None  # captured decode steps (CUDA only)

    # -- inputs --------------------------------------------------------------------

    def prepare(self, items: list[tuple[Sequence, int]], prompt_rows: list[bool]) -> StepInputs:
        """Pack the planned chunks. `items` are (sequence, new tokens). `prompt_rows[i]` asks for the logits
        of every prompt position of sequence i in this chunk (prompt logprobs)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        logit_rows: list[int] = []
        sample_index: list[int | None] = []
        prompt_index: list[tuple[int, int] | None] = []
        width = max(len(seq.table.blocks) for seq, _ in items)
        tables = torch.full((len(items), width), -1, dtype=torch.int32)
        for i, (seq, n) in enumerate(items):
            start, end = seq.num_computed, seq.num_computed + n
            blocks = seq.table.blocks
            row0 = len(ids)
            ids.extend(seq.tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            query_start.append(len(ids))
            context_lens.append(end)
            if prompt_rows[i] and start < seq.num_prompt - 1:
                # rows start..num_prompt-2 predict prompt tokens start+1..num_prompt-1
                count = min(end, seq.num_prompt - 1) - start
                prompt_index.append((len(logit_rows), count))
                logit_rows.extend(range(row0, row0 + count))
            else:
                prompt_index.append(None)
            if end == seq.num_tokens:
                sample_index.append(len(logit_rows))
                logit_rows.append(row0 + n - 1)
            else:
                sample_index.append(None)
        dev = self.device
        batch = PagedBatch(
            query_start=torch.tensor(query_start, dtype=torch.int32),
            context_lens=torch.tensor(context_lens, dtype=torch.int32),
            block_tables=tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(n for _, n in items),
            max_context_len=max(context_lens),
            block_size=bs,
        )
        return StepInputs(
            ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            batch=batch.to(dev) if dev.type != "cpu" else batch,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            sample_index=sample_index,
            prompt_index=prompt_index,
        )

    # -- execution -----------------------------------------------------------------

    def execute(
        self, inputs: StepInputs, fused: bool, timer: LayerTimer | None = None, scaled: bool = True
    ) -> torch.Tensor | None:
        """Run the step (K/V written to the cache); logits of `logit_rows`, or None when there are none.

        `scaled=False` lets a fused all-greedy step skip the final-norm row scale.
        """
        if timer is None and inputs.batch.is_decode_only and self.graphs is not None:
            if self.graphs.fits(inputs.ids.shape[0]):
                logits = self.graphs.run(inputs.ids, inputs.positions, inputs.batch, fused)
                return logits[inputs.logit_rows]
        hidden = self.decoder.forward(inputs.ids, inputs.positions, inputs.batch, self.kv, fused, timer)
        if not inputs.logit_rows.numel():
            return None
        return self.decoder.logits(hidden.rows(inputs.logit_rows), scaled=scaled)

    def make_timer(self) -> LayerTimer:
        return LayerTimer(self.device.type == "cuda")

    def copy_block(self, src: int, dst: int) -> None:
        """Duplicate one block's K/V in every layer (a forked sequence's partly filled block)."""
        for k, v in zip(self.kv.k, self.kv.v):
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- CUDA graphs ---------------------------------------------------------------------

    def capture_decode_graphs(self, batch_sizes: list[int]) -> None:
        """Capture decode steps (both fusion paths) for these padded batch sizes; CUDA only."""
        if self.device.type != "cuda":
            return
        from server.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.decoder, self.kv, max(batch_sizes), tuple(batch_sizes))
        self.graphs.capture()
