"""When a dead engine process is respawned, and when the server gives up instead.

A respawned engine heals a one-off death (the OOM killer, a CUDA error that poisons the context, a
wedged kernel) without anyone restarting the container: vLLM and TGI just exit. A model that dies
again and again is not healed by respawning it, though: after `max_deaths` deaths within `window_s`
the server exits non-zero so Docker, Kubernetes or systemd restart it (and alert on it).
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

#: The server's exit status when it gives up on its engine (1: cannot bind; 2: bad configuration).
EXIT_ENGINE_FAILED = 3


@dataclass(frozen=True)
class RestartPolicy:
    """Respawn after `backoff_s`, doubling per recent death up to `backoff_max_s`; the
    `max_deaths`-th death within `window_s` seconds is final."""

    max_deaths: int = 3
    window_s: float = 600.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0


class DeathLog:
    """The recent deaths of one engine, and what each new one means."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.recent: deque[float] = deque()

    def record(self) -> float | None:
        """Count a death now: the seconds to wait before respawning, or None to give up."""
        now = self.clock()
        self.recent.append(now)
        while self.recent and now - self.recent[0] > self.policy.window_s:
            self.recent.popleft()
        if len(self.recent) >= self.policy.max_deaths:
            return None
        return min(self.policy.backoff_s * 2 ** (len(self.recent) - 1), self.policy.backoff_max_s)


def describe_exit(exitcode: int | None) -> str:
    """multiprocessing's exit code in words: 'exit status 1', 'killed by SIGKILL (9)'."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "an unknown signal"
        return f"killed by {name} ({-exitcode})"
    return f"exit status {exitcode}"
