"""Host-side facts and buffers shared by the Triton kernel modules.

Whether Triton runs its CPU interpreter is decided in kernels/__init__.py,
before any kernel module imports triton.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_SM_COUNT: dict[int, int] = {}
_COUNTERS: dict[tuple[str, str, int | None], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers that captured CUDA graphs may still point at
_UNZEROED: set[tuple[str, str, int | None]] = set()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a small stand-in under the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def arrival_counters(
    device: torch.device, n: int, purpose: str, minimum: int = 4096, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Zeroed int32 arrival counters for "last program to finish does the merge" kernels (or, with
    `dtype`, any zeroed scratch such a kernel leaves at zero: FlashSampling's int64 argmax slots).

    Every such kernel leaves the counters it used at zero, so one persistent
    buffer per (purpose, device) serves all calls and CUDA-graph replays. A
    buffer first allocated while a graph is being captured has its zero fill
    recorded as a graph node, not run: it is zeroed at the next eager use.
    Outgrown buffers are kept alive because captured graphs may still use them.
    """
    key = (purpose, device.type, device.index)
    buf = _COUNTERS.get(key)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        size = max(n, minimum, 2 * buf.numel() if buf is not None else 0)
        buf = _COUNTERS[key] = torch.zeros(size, dtype=dtype, device=device)
        if capturing:
            _UNZEROED.add(key)
        else:
            _UNZEROED.discard(key)
    elif key in _UNZEROED and not capturing:
        buf.zero_()
        _UNZEROED.discard(key)
    return buf
