"""The deferred-norm fusion switch (on | off | ab) and the timings each path earned.

The HTTP admin route flips the mode from the event-loop thread while the engine
thread reads it once per step, so every access holds a lock. Switching is safe
mid-generation because both paths compute the same function of the same
weights and the same KV cache: only the order of a few float ops differs.
In `ab` mode consecutive steps alternate paths so both see the same traffic.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

MODES = ("on", "off", "ab")


def path_label(fused: bool) -> str:
    return "on" if fused else "off"


class _Mean:
    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean_s": self.total / self.count if self.count else 0.0}


class FusionControl:
    """Thread-safe fusion mode plus per-path step and per-layer timing accumulators."""

    def __init__(self, mode: str = "on", on_change: Callable[[str], None] | None = None):
        self._lock = threading.Lock()
        self._mode = self._check(mode)
        self._next_ab = True
        self._on_change = on_change
        # keyed by (path, phase) and (path, phase, layer, part)
        self._steps: dict[tuple[str, str], _Mean] = defaultdict(_Mean)
        self._layers: dict[tuple[str, str, int, str], _Mean] = defaultdict(_Mean)

    @staticmethod
    def _check(mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"fusion mode must be one of {MODES}, got {mode!r}")
        return mode

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    def set_mode(self, mode: str) -> None:
        with self._lock:
            self._mode = self._check(mode)
            self._next_ab = True
        if self._on_change is not None:
            self._on_change(mode)

    def step_mode(self) -> bool:
        """Whether the next step runs fused; in `ab` mode each call flips the answer."""
        with self._lock:
            if self._mode == "ab":
                fused, self._next_ab = self._next_ab, not self._next_ab
                return fused
            return self._mode == "on"

    def record_step(self, fused: bool, phase: str, seconds: float) -> None:
        with self._lock:
            self._steps[(path_label(fused), phase)].add(seconds)

    def record_layer(self, fused: bool, phase: str, layer: int, part: str, seconds: float) -> None:
        with self._lock:
            self._layers[(path_label(fused), phase, layer, part)].add(seconds)

    def summary(self) -> dict:
        """Mean step latency and per-layer latency per path and phase, for `GET /admin/fusion`."""
        with self._lock:
            steps: dict = {}
            for (path, phase), m in sorted(self._steps.items()):
                steps.setdefault(path, {})[phase] = m.as_dict()
            layers: dict = {}
            for (path, phase, layer, part), m in sorted(self._layers.items()):
                per_part = layers.setdefault(path, {}).setdefault(phase, {}).setdefault(part, [])
                per_part.append({"layer": layer, **m.as_dict()})
            return {"mode": self._mode, "steps": steps, "layers": layers}
