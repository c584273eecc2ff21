"""CUDA graphs of the decode step, one per padded batch size and fusion mode (and, fused, per LM-head
output: logits, or tokens drawn in its epilogue, greedy only or with noise: FlashSampling).

A decode step of a small model is a chain of ~10 tiny kernels per layer; launched
one by one from Python it is launch-bound (the 135M model would spend most of
its step in the CPU). Replaying a captured graph removes that. Static input
buffers are sized for the largest batch; a step of n sequences replays the
smallest captured size ≥ n with padded rows that write nowhere (slot -1) and
read one valid block.
"""

from __future__ import annotations

import torch

from fusionserve.kernels.batch import Draw, PagedBatch
from fusionserve.models.decoder import Decoder, KVCache

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# (fused, LM-head output): None = fp32 logits; False / True = drawn tokens without / with noise.
VARIANTS = ((True, None), (True, False), (True, True), (False, None))


class DecodeGraphs:
    def __init__(self, decoder: Decoder, kv: KVCache, max_batch: int, batch_sizes=DEFAULT_BATCH_SIZES):
        self.decoder, self.kv = decoder, kv
        self.sizes = sorted({b for b in batch_sizes if b <= max_batch} | {max_batch})
        dev = decoder.device
        n, width = self.sizes[-1], -(-decoder.max_model_len // kv.block_size)
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.temps = torch.zeros(n, dtype=torch.float32, device=dev)  # a Draw's, padded rows greedy
        self.keys = torch.zeros(n, dtype=torch.int64, device=dev)
        # a mixed step's rows with T < 0 get their logits here (masked stores: none in a plain step)
        self.flagged = torch.empty((n, decoder.config.vocab_size), dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, bool, bool | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _batch(self, bs: int) -> PagedBatch:
        return PagedBatch(
            query_start=self.query_start[: bs + 1],
            context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slots[:bs],
            max_query_len=1,
            max_context_len=self.decoder.max_model_len,
            block_size=self.kv.block_size,
        )

    def _step(self, bs: int, fused: bool, noise: bool | None) -> torch.Tensor:
        d = self.decoder
        hidden = d.forward(self.ids[:bs], self.positions[:bs], self._batch(bs), self.kv, fusion=fused)
        draw = Draw(self.temps[:bs], self.keys[:bs], noise, self.flagged[:bs]) if noise is not None else None
        return d.logits(hidden, draw=draw)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every (size, mode), largest first so smaller graphs reuse the shared memory pool."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for fused, noise in VARIANTS:
                for bs in reversed(self.sizes):
                    self._step(bs, fused, noise)  # warm-up: Triton compiles outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for fused, noise in VARIANTS:
            for bs in reversed(self.sizes):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._step(bs, fused, noise)
                self.graphs[(bs, fused, noise)] = (graph, out)
        torch.cuda.synchronize()

    def fits(self, num_seqs: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.sizes[-1]

    @torch.inference_mode()
    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        batch: PagedBatch,
        fused: bool,
        draw: Draw | None = None,
    ) -> torch.Tensor:
        """Replay for a decode-only batch of n ≤ max sequences; returns logits [n, V] or, with a fused
        `draw` of n rows, the drawn ids [n] (a view: copy to keep)."""
        n = ids.shape[0]
        bs = next(b for b in self.sizes if b >= n)
        width = batch.block_tables.shape[1]
        self.ids[:n].copy_(ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.context_lens[:n].copy_(batch.context_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        self.slots[:n].copy_(batch.slot_mapping, non_blocking=True)
        if bs > n:  # padding rows: read one token of block 0, write nothing
            self.context_lens[n:bs].fill_(1)
            self.block_tables[n:bs, 0].fill_(0)
            self.slots[n:bs].fill_(-1)
        noise = None
        if draw is not None and fused:
            self.temps[:n].copy_(draw.temps, non_blocking=True)
            self.keys[:n].copy_(draw.keys, non_blocking=True)
            self.temps[n:bs].fill_(0.0)
            noise = draw.random
        graph, out = self.graphs[(bs, fused, noise)]
        graph.replay()
        if noise is not None and draw.logits is not None:  # a mixed step: the sampler's rows' logits
            draw.logits[:n].copy_(self.flagged[:n], non_blocking=True)
        return out[:n]
