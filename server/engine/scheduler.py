"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step: running decodes first (one token each), then the rest of
partly prefilled running prompts, then new prompts from the waiting queue, all
within `max_num_batched_tokens` and `max_num_seqs`. Long prompts are cut into
chunks. When the cache runs out, the most recently admitted running sequence
loses its blocks and goes back to the head of the waiting queue (recompute),
so the oldest sequence always makes progress: no deadlock, no crash. A single
sequence always fits (max_model_len is capped to the cache size by the engine).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fusionserve.server.engine.block_manager import BlockManager, BlockTable


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generated choice: its tokens, its cache blocks and how much of it the cache holds."""

    seq_id: int
    tokens: list[int]  # prompt followed by the generated ids
    num_prompt: int
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    table: BlockTable = field(default_factory=BlockTable)
    status: Status = Status.WAITING
    admitted: int = -1  # admission order; the largest is preempted first
    pending_forks: int = 0  # n>1: siblings to fork off when the prompt is done
    use_prefix_cache: bool = True  # off when every prompt row's logits are needed
    data: Any = None  # the engine's per-sequence state (sampling, detokenizer, ...)
    # Launch-ahead: tokens[pending_at] is a placeholder for an id sampled on the device that the host
    # has not read yet (row `pending_row` of the in-flight step); -1: none. `hold`: known to finish
    # when that id arrives (length), so not scheduled meanwhile.
    pending_at: int = -1
    pending_row: int = -1
    hold: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048


@dataclass
class StepPlan:
    """The sequences of one step, decodes first, with their number of new tokens."""

    items: list[tuple[Sequence, int]]
    preempted: list[Sequence]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 and s.num_computed >= s.num_prompt for s, n in self.items)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self._admissions = itertools.count()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------

    def schedule(self) -> StepPlan:
        bs, blocks = self.blocks.block_size, self.blocks
        budget = self.config.max_num_batched_tokens
        planned: dict[Sequence, int] = {}
        preempted: list[Sequence] = []

        def make_room(seq: Sequence, total: int) -> bool:
            """Preempt newest unplanned sequences until `seq` can hold `total` tokens."""
            while not blocks.can_hold(seq.table, total):
                victim = next(s for s in reversed(self.running) if s not in planned)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    return False
            return True

        for decodes in (True, False):
            for seq in list(self.running):
                if budget == 0:
                    break
                remaining = seq.num_tokens - seq.num_computed
                if (
                    seq.status is not Status.RUNNING
                    or seq in planned
                    or (remaining == 1) != decodes
                    or seq.hold
                ):
                    continue
                if decodes and seq.num_computed < len(seq.table.blocks) * bs:
                    planned[seq] = 1  # room left in its last block: nothing to allocate or preempt
                    budget -= 1
                    continue
                n = min(remaining, budget)
                fit = (len(seq.table.blocks) + blocks.num_free) * bs - seq.num_computed
                if fit >= 1:  # a chunk shrinks to the free space before anyone is preempted
                    n = min(n, fit)
                if not make_room(seq, seq.num_computed + n):
                    continue
                blocks.grow(seq.table, seq.num_computed + n)
                planned[seq] = n
                budget -= n

        if not preempted:
            budget = self._admit(planned, budget)
        return StepPlan(list(planned.items()), preempted)

    def _admit(self, planned: dict[Sequence, int], budget: int) -> int:
        """Start prompts from the waiting queue in FIFO order while budget, seats and blocks last."""
        bs, blocks = self.blocks.block_size, self.blocks
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.pending_at >= 0:  # preempted with an id still on the device: after it arrives
                break
            if self.running and len(self.running) + 1 + seq.pending_forks > self.config.max_num_seqs:
                break
            table = blocks.match_prefix(seq.tokens) if seq.use_prefix_cache else BlockTable()
            cached = len(table.blocks) * bs
            # Keep a little headroom for the running decodes, unless nothing else runs.
            reserve = max(1, blocks.num_blocks // 100) if self.running else 0
            fit = (len(table.blocks) + blocks.num_free - reserve) * bs - cached
            n = min(seq.num_tokens - cached, budget, fit)
            if n <= 0:
                blocks.free(table)
                break
            self.waiting.popleft()
            seq.table, seq.num_computed = table, cached
            blocks.grow(table, cached + n)
            seq.status, seq.admitted = Status.RUNNING, next(self._admissions)
            self.running.append(seq)
            planned[seq] = n
            budget -= n
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the step ------------------------------------------------------------

    def advance(self, plan: StepPlan) -> None:
        """The step wrote K/V for the planned tokens: count them and cache the full blocks."""
        bs, caching = self.blocks.block_size, self.blocks.enable_prefix_caching
        for seq, n in plan.items:
            seq.num_computed += n
            # A block holding a launch-ahead placeholder is hashed later, once its id is known.
            known = seq.num_computed if seq.pending_at < 0 else min(seq.num_computed, seq.pending_at)
            if caching and known // bs > seq.table.num_hashed:  # a block was completed
                self.blocks.commit(seq.table, seq.tokens, known)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling that already holds its blocks joins the running set as the newest."""
        seq.status, seq.admitted = Status.RUNNING, next(self._admissions)
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free all its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.blocks.free(seq.table)
        seq.status = Status.FINISHED
