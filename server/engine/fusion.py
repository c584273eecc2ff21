"""The deferred-norm fusion switch (on | off | ab) and the timings each path earned.

The mode lives in the engine core, which reads it once per step (`FusionControl.step_mode`);
an operator flips it through a SET_FUSION op. Switching is safe mid-generation because both
paths compute the same function of the same weights and the same KV cache: only the order of a
few float ops differs. In `ab` mode consecutive steps alternate paths so both see the same
traffic. The per-path timings are kept on the client side (`FusionTimings`), fed by the
StepStats records the core sends, for `GET /admin/fusion`.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from fusionserve.server.contract import StepStats

MODES = ("on", "off", "ab")


def path_label(fused: bool) -> str:
    return "on" if fused else "off"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"fusion mode must be one of {MODES}, got {mode!r}")
    return mode


class FusionControl:
    """The mode as the engine core sees it: which path the next step takes."""

    def __init__(self, mode: str = "on"):
        self.mode = check_mode(mode)
        self._next_ab = True

    def set_mode(self, mode: str) -> None:
        self.mode = check_mode(mode)
        self._next_ab = True

    def step_mode(self) -> bool:
        """Whether the next step runs fused; in `ab` mode each call flips the answer."""
        if self.mode == "ab":
            fused, self._next_ab = self._next_ab, not self._next_ab
            return fused
        return self.mode == "on"


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


class FusionTimings:
    """Mean step and per-layer latency per path and phase (thread-safe: the pipe reader or the
    core thread records, the event loop reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: dict[tuple[str, str], _Mean] = defaultdict(_Mean)
        self._layers: dict[tuple[str, str, int, str], _Mean] = defaultdict(_Mean)

    def record(self, stats: StepStats) -> None:
        with self._lock:
            for phase, path, seconds in stats.steps:
                self._steps[(path, phase)].add(seconds)
            for phase, path, layer, part, seconds in stats.layers:
                self._layers[(path, phase, layer, part)].add(seconds)

    def summary(self, mode: str) -> dict:
        """For `GET /admin/fusion`: {"mode", "steps": {path: {phase}}, "layers": {path: {phase: {part}}}}."""
        with self._lock:
            steps: dict = {}
            for (path, phase), m in sorted(self._steps.items()):
                steps.setdefault(path, {})[phase] = m.as_dict()
            layers: dict = {}
            for (path, phase, layer, part), m in sorted(self._layers.items()):
                per_part = layers.setdefault(path, {}).setdefault(phase, {}).setdefault(part, [])
                per_part.append({"layer": layer, **m.as_dict()})
            return {"mode": mode, "steps": steps, "layers": layers}
