"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step: running decodes first (one token each), then the rest of partly prefilled running
prompts, then new prompts from the waiting queue, all within `max_num_batched_tokens` and
`max_num_seqs`. Long prompts are cut into chunks. When the cache runs out, the most recently
admitted running sequence loses its blocks and goes back to the head of the waiting queue
(recompute), so the oldest sequence always makes progress: no deadlock, no crash. A single
sequence always fits (max_model_len is capped to the cache size by the engine).

The plan is plain data (`SchedulerOutput`: ids, token counts, block tables), so the model
runner and the tests read it without touching scheduler state.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from fusionserve.server.engine.block_manager import BlockManager, BlockTable
from fusionserve.server.engine.sequence import UNKNOWN_TOKEN, Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048


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

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget, bs, held = self.config.max_num_batched_tokens, self.blocks.block_size, self.held
        planned: dict[Sequence, int] = {}
        preempted: list[Sequence] = []
        for decodes in (True, False):
            for seq in list(self.running):
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
            self._admit(planned, budget)
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
            victim = next(s for s in reversed(self.running) if s not in planned)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return 0
        blocks.grow(seq.table, seq.num_computed + n)
        return n

    def _admit(self, planned: dict[Sequence, int], budget: int) -> None:
        """Start prompts from the waiting queue in FIFO order while budget, seats and blocks last."""
        bs, blocks = self.blocks.block_size, self.blocks
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.tokens[-1] == UNKNOWN_TOKEN:  # preempted with an id still on the device
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

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
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
