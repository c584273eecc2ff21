"""One generated choice as the scheduler sees it: its tokens, its cache blocks, its progress.

The engine's own per-choice state (sampling generator, detokenizer, launch-ahead rows) lives in
the engine (`llm_engine.Choice`), keyed by `seq_id`; the scheduler needs none of it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fusionserve.server.engine.block_manager import BlockTable

#: A token whose id was sampled on the device but has not reached the host (launch-ahead): at
#: most one, always last. Its K/V may be computed, but its block is not hashed until it is known.
UNKNOWN_TOKEN = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    tokens: list[int]  # prompt followed by the generated ids
    num_prompt: int
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    table: BlockTable = field(default_factory=BlockTable)
    status: Status = Status.WAITING
    admitted: int = -1  # admission order; the largest is preempted first
    pending_forks: int = 0  # n>1: siblings forked off when the prompt is done (seats reserved)
    use_prefix_cache: bool = True  # off when every prompt row's logits are needed
    priority: int = 0  # --scheduling-policy priority: lower first
    arrival: float = 0.0  # the request's arrival: ties of priority go first come, first served

    @property
    def rank(self) -> tuple[int, float, int]:
        """Priority order: the smallest rank is served first and preempted last."""
        return (self.priority, self.arrival, self.seq_id)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_known(self) -> int:
        """Tokens whose ids the host knows (all but a trailing UNKNOWN_TOKEN)."""
        return len(self.tokens) - (self.tokens[-1] == UNKNOWN_TOKEN)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt
