"""The decoder's `timer` hook as the engine uses it: per-layer wall time of a sampled step.

perf_counter on CPU; CUDA events on the GPU, resolved after the step, so timing one step adds
no synchronization inside it (the step runs eagerly, outside CUDA graphs).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
            if self._records:  # this step's last event, not the device: a step launched ahead may run
                self._records[-1][3].synchronize()
            timed = [(la, p, s.elapsed_time(e) / 1e3) for la, p, s, e in self._records]
        else:
            timed = [(la, p, e - s) for la, p, s, e in self._records]
        blocks: dict[int, float] = {}
        for layer, _, secs in timed:
            blocks[layer] = blocks.get(layer, 0.0) + secs
        return timed + [(layer, "block", secs) for layer, secs in sorted(blocks.items())]
