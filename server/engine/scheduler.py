"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step: running decodes first (one token each), then the rest of partly prefilled running
prompts, then new prompts from the waiting queue, all within `max_num_batched_tokens` and
`max_num_seqs`. Long prompts are cut into chunks. When the cache runs out, the most recently
admitted running sequence loses its blocks and goes back to the head of the waiting queue
(recompute), so the oldest sequence always makes progress: no deadlock, no crash. A single
sequence always fits (max_model_len is capped to the cache size by the engine).

`policy="priority"` (vLLM's meaning): the waiting queue is ordered by (priority, arrival), lower
first; the victim of a full cache is the running sequence of the largest (priority, arrival); and
a waiting sequence that finds no seat or no block preempts running sequences of a strictly lower
priority (larger value) until it fits.

The plan is plain data (`SchedulerOutput`: ids, token counts, block tables), so the model
runner and the tests read it without touching scheduler state.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from fusionserve.server.engine.block_manager import BlockManager, BlockTable
from fusionserve.server.engine.sequence import UNKNOWN_TOKEN, Sequence, Status

POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    policy: str = "fcfs"  # fcfs | priority

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {POLICIES}, got {self.policy!r}")


@dataclass
class SchedulerOutput:
    """One step, decodes first. Row i: sequence `seq_ids[i]` computes `num_new_tokens[i]` tokens
    from position `num_computed[i]` of its `seq_lens[i]` tokens, into `block_tables[i]`."""

    seq_ids: list[int]
    num_new_tokens: list[int]
    num_computed: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    preempted_ids: list[int]

    @property
    def is_decode(self) -> bool:
        return all(
            n == 1 and s + 1 == t for n, s, t in zip(self.num_new_tokens, self.num_computed, self.seq_lens)
        )

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.seqs: dict[int, Sequence] = {}  # every sequence not finished
        self.held: set[int] = set()  # running, but not scheduled until released (known to finish)
        self._admissions = itertools.count()
        self.num_preemptions = 0
        self.by_priority = config.policy == "priority"

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.seqs[seq.seq_id] = seq
        if self.by_priority:
            self._enqueue_by_rank(seq)
        else:
            self.waiting.append(seq)

    def _enqueue_by_rank(self, seq: Sequence) -> None:
        """Insert into the waiting queue, kept sorted by rank (a linear scan: the queue is short
        next to a step, and the common case, the largest rank so far, stops at once)."""
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].rank > seq.rank:
            i -= 1
        self.waiting.insert(i, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget, bs, held = self.config.max_num_batched_tokens, self.blocks.block_size, self.held
        planned: dict[Sequence, int] = {}
        preempted: list[Sequence] = []
        # Priority mode plans the best ranks first, so a full cache preempts the worst, not the newest.
        order = sorted(self.running, key=lambda s: s.rank) if self.by_priority else list(self.running)
        for decodes in (True, False):
            for seq in order:
                if budget == 0:
                    break
                remaining = seq.num_tokens - seq.num_computed
                if seq.status is not Status.RUNNING or seq in planned or (remaining == 1) != decodes:
                    continue
                if seq.seq_id in held:
                    continue
                if decodes and seq.num_computed < len(seq.table.blocks) * bs:
                    n = 1  # room left in its last block: nothing to allocate or preempt (the hot case)
                else:
                    n = self._plan_running(seq, min(remaining, budget), planned, preempted)
                if n:
                    planned[seq] = n
                    budget -= n
        if not preempted:
            self._admit(planned, budget, preempted)
        seqs = list(planned)
        return SchedulerOutput(
            seq_ids=[s.seq_id for s in seqs],
            num_new_tokens=list(planned.values()),
            num_computed=[s.num_computed for s in seqs],
            seq_lens=[s.num_tokens for s in seqs],
            block_tables=[s.table.blocks for s in seqs],
            preempted_ids=[s.seq_id for s in preempted],
        )

    def _plan_running(
        self, seq: Sequence, n: int, planned: dict[Sequence, int], preempted: list[Sequence]
    ) -> int:
        """Tokens a running sequence that needs blocks computes this step (0: it was preempted itself)."""
        bs, blocks = self.blocks.block_size, self.blocks
        fit = (len(seq.table.blocks) + blocks.num_free) * bs - seq.num_computed
        if fit >= 1:  # a chunk shrinks to the free space before anyone is preempted
            n = min(n, fit)
        while not blocks.can_hold(seq.table, seq.num_computed + n):
            if self.by_priority:
                victim = max((s for s in self.running if s not in planned), key=lambda s: s.rank)
            else:
                victim = next(s for s in reversed(self.running) if s not in planned)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return 0
        blocks.grow(seq.table, seq.num_computed + n)
        return n

    def _admit(self, planned: dict[Sequence, int], budget: int, preempted: list[Sequence]) -> None:
        """Start prompts from the head of the waiting queue while budget, seats and blocks last."""
        bs, blocks = self.blocks.block_size, self.blocks
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.tokens[-1] == UNKNOWN_TOKEN:  # preempted with an id still on the device
                break
            if self.running and len(self.running) + 1 + seq.pending_forks > self.config.max_num_seqs:
                refund = self._preempt_lower(seq, planned, preempted)
                if refund is None:
                    break
                budget += refund
                continue
            table = blocks.match_prefix(seq.tokens) if seq.use_prefix_cache else BlockTable()
            cached = len(table.blocks) * bs
            # Keep a little headroom for the running decodes, unless nothing else runs.
            reserve = max(1, blocks.num_blocks // 100) if self.running else 0
            fit = (len(table.blocks) + blocks.num_free - reserve) * bs - cached
            n = min(seq.num_tokens - cached, budget, fit)
            if n <= 0:
                blocks.free(table)
                refund = self._preempt_lower(seq, planned, preempted)
                if refund is None:
                    break
                budget += refund
                continue
            self.waiting.popleft()
            seq.table, seq.num_computed = table, cached
            blocks.grow(table, cached + n)
            seq.status, seq.admitted = Status.RUNNING, next(self._admissions)
            self.running.append(seq)
            planned[seq] = n
            budget -= n

    def _preempt_lower(
        self, seq: Sequence, planned: dict[Sequence, int], preempted: list[Sequence]
    ) -> int | None:
        """Priority mode: preempt the running sequence of the largest rank whose priority is strictly
        lower than `seq`'s (a larger value), taking it out of this step's plan. Returns the tokens it
        gives back to the step's budget, or None when there is none (or the policy is fcfs)."""
        if not self.by_priority:
            return None
        lower = [s for s in self.running if s.priority > seq.priority and s.seq_id not in self.held]
        if not lower:
            return None
        victim = max(lower, key=lambda s: s.rank)
        self._preempt(victim)
        preempted.append(victim)
        return planned.pop(victim, 0)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        if self.by_priority:
            self._enqueue_by_rank(seq)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the step ------------------------------------------------------------

    def advance(self, out: SchedulerOutput) -> None:
        """The step wrote K/V for the planned tokens: count them and cache the full blocks."""
        bs, caching = self.blocks.block_size, self.blocks.enable_prefix_caching
        for seq_id, n in zip(out.seq_ids, out.num_new_tokens):
            seq = self.seqs[seq_id]
            seq.num_computed += n
            known = min(seq.num_computed, seq.num_known)  # an unknown id's block is hashed later
            if caching and known // bs > seq.table.num_hashed:  # a block was completed
                self.blocks.commit(seq.table, seq.tokens, known)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling that already holds its blocks joins the running set as the newest."""
        seq.status, seq.admitted = Status.RUNNING, next(self._admissions)
        self.seqs[seq.seq_id] = seq
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
        self.held.discard(seq.seq_id)
        self.seqs.pop(seq.seq_id, None)
        seq.status = Status.FINISHED
