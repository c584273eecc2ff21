"""`/admin/fusion`'s side of the fusion switch: the mode an operator set (sent to the engine core,
which picks each step's path) and the mean step / per-layer latency each path earned, fed by the
StepStats records the core sends with every step."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from fusionserve.server.contract import EngineCoreOutputs, StepStats
from fusionserve.server.engine.fusion import check_mode


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

    def record_outputs(self, outs: EngineCoreOutputs) -> None:
        self.record(outs.step_stats)


class FusionSwitch:
    """The app's handle on the switch: `mode`, `set_mode` (the engine core applies it to its next
    step) and `summary()` of the timings both paths earned."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._mode = check_mode(engine.fusion_mode)
        self.timings = FusionTimings()
        engine.listeners.append(self.timings.record_outputs)

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        self._mode = check_mode(mode)
        self._engine.set_fusion_mode(mode)

    def summary(self) -> dict:
        return self.timings.summary(self._mode)
