"""The deferred-norm fusion switch (on | off | ab) as the engine core reads it, once per step.

An operator flips it through a SET_FUSION op (api/fusion.py). Switching is safe mid-generation:
both paths compute the same function of the same weights and KV cache, only the order of a few
float ops differs. In `ab` mode consecutive steps alternate paths so both see the same traffic.
"""

from __future__ import annotations

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
