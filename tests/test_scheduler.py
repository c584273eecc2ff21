"""Scheduler without a model: token budget, decodes first, chunking, preemption order, progress,
held sequences and launch-ahead's unknown tokens; the plan is plain data."""

from __future__ import annotations

import random

from fusionserve.server.engine.block_manager import BlockManager
from fusionserve.server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from fusionserve.server.engine.sequence import UNKNOWN_TOKEN, Sequence, Status


def seq(i: int, prompt_len: int) -> Sequence:
    return Sequence(seq_id=i, tokens=list(range(100 * i, 100 * i + prompt_len)), num_prompt=prompt_len)


def items(s: Scheduler, plan: SchedulerOutput) -> list[tuple[Sequence, int]]:
    return [(s.seqs[i], n) for i, n in zip(plan.seq_ids, plan.num_new_tokens)]


def run_step(s: Scheduler, new_token: int = 7) -> SchedulerOutput:
    """Plan a step, pretend the model ran, append a token to every sequence whose chunk ended."""
    plan = s.schedule()
    s.advance(plan)
    for q, _ in items(s, plan):
        if q.num_computed == q.num_tokens:
            q.tokens.append(new_token)
    return plan


def test_decodes_first_then_chunked_prefill_within_budget():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), BlockManager(64, 4))
    a = seq(1, 3)
    s.add(a)
    run_step(s)  # a prefilled, now decoding
    b = seq(2, 25)
    s.add(b)
    plan = run_step(s)
    assert plan.seq_ids == [1, 2] and plan.num_new_tokens == [1, 9]
    assert plan.num_tokens == 10
    plan = run_step(s)  # b continues its prompt from the running set, still after a's decode
    assert plan.seq_ids == [1, 2] and plan.num_new_tokens[1] == 9
    plan = run_step(s)
    assert plan.num_new_tokens == [1, 7]
    assert plan.is_decode is False
    assert run_step(s).is_decode


def test_plan_is_plain_data_of_ids_counts_and_tables():
    bm = BlockManager(64, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm)
    a, b = seq(1, 6), seq(2, 3)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert plan.seq_ids == [1, 2] and plan.num_new_tokens == [6, 3]
    assert plan.num_computed == [0, 0] and plan.seq_lens == [6, 3]
    assert [len(t) for t in plan.block_tables] == [2, 1] and plan.preempted_ids == []
    assert all(isinstance(x, int) for t in plan.block_tables for x in t)
    assert not set(plan.block_tables[0]) & set(plan.block_tables[1])


def test_max_num_seqs_limits_admission():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), BlockManager(64, 4))
    for i in range(4):
        s.add(seq(i, 5))
    plan = run_step(s)
    assert len(plan.seq_ids) == 2 and len(s.waiting) == 2


def test_forks_reserve_their_seats():
    s = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=100), BlockManager(64, 4))
    a, b = seq(1, 5), seq(2, 5)
    b.pending_forks = 2  # n=3: needs three seats once its prompt is done
    s.add(a)
    s.add(b)
    assert run_step(s).seq_ids == [1]  # b waits: 1 + 3 seats > 3
    assert s.waiting[0] is b


def test_preempts_most_recently_admitted():
    bm = BlockManager(7, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm)
    seqs = [seq(i, 8) for i in range(3)]  # 2 blocks each, one block left as admission headroom
    for q in seqs:
        s.add(q)
    run_step(s)
    assert bm.num_free == 1 and all(q.status is Status.RUNNING for q in seqs)
    plan = run_step(s)  # every decode needs a third block: the first takes the last free one
    assert plan.preempted_ids[0] == seqs[2].seq_id
    assert seqs[0].seq_id in plan.seq_ids
    assert seqs[2].status is Status.WAITING and seqs[2].num_computed == 0 and s.waiting[0] is seqs[2]


def test_held_sequences_are_skipped_until_released():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), BlockManager(64, 4))
    a, b = seq(1, 3), seq(2, 3)
    s.add(a)
    s.add(b)
    run_step(s)
    s.held.add(1)
    assert run_step(s).seq_ids == [2]
    s.held.discard(1)
    assert run_step(s).seq_ids == [1, 2]
    s.finish(a)
    assert 1 not in s.seqs and a.status is Status.FINISHED


def test_unknown_token_blocks_hashing_and_admission():
    """Launch-ahead: a block that ends in an unknown id is hashed only once the id is known, and a
    preempted sequence waiting for one is not admitted until it arrives."""
    bm = BlockManager(64, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm)
    a = seq(1, 3)
    s.add(a)
    run_step(s, new_token=UNKNOWN_TOKEN)  # 3 prompt ids + an id still on the device
    assert a.num_known == 3
    s.advance(s.schedule())  # the unknown id's K/V is computed: block 0 is full but not hashed
    assert a.table.num_hashed == 0
    a.tokens[-1] = 42
    s.advance(SchedulerOutput([1], [0], [4], [4], [a.table.blocks], []))
    assert a.table.num_hashed == 1
    b = seq(2, 3)
    b.tokens.append(UNKNOWN_TOKEN)
    s.add(b)
    assert 2 not in s.schedule().seq_ids


def test_random_workload_always_progresses_and_frees_everything():
    rng = random.Random(0)
    bm = BlockManager(12, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16), bm)
    limits = {}
    for i in range(40):
        q = seq(i, rng.randint(1, 20))
        limits[q] = rng.randint(1, 20)  # tokens to generate; prompt + output ≤ 40 < 48 cache tokens
        s.add(q)
    finished = 0
    for _ in range(5000):
        if not s.has_work():
            break
        plan = run_step(s)
        assert plan.seq_ids, "a step with work must schedule something"
        assert plan.num_tokens <= 16 and len(s.running) <= 6
        for q, _ in items(s, plan):
            if q.status is Status.RUNNING and q.num_output >= limits[q]:
                s.finish(q)
                finished += 1
    assert finished == 40 and not s.has_work()
    assert bm.check_all_free()
    assert s.num_preemptions > 0


def pseq(i: int, prompt_len: int, priority: int, arrival: float | None = None) -> Sequence:
    q = seq(i, prompt_len)
    q.priority, q.arrival = priority, float(i if arrival is None else arrival)
    return q


def test_priority_orders_the_waiting_queue_lower_value_first_ties_by_arrival():
    s = Scheduler(
        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, policy="priority"), BlockManager(64, 4)
    )
    for q in (pseq(1, 3, 5), pseq(2, 3, 0), pseq(3, 3, 5), pseq(4, 3, -1), pseq(5, 3, 0)):
        s.add(q)
    assert [q.seq_id for q in s.waiting] == [4, 2, 5, 1, 3]
    assert run_step(s).seq_ids == [4, 2]  # two seats
    fcfs = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), BlockManager(64, 4))
    for q in (pseq(1, 3, 5), pseq(2, 3, 0)):
        fcfs.add(q)
    assert run_step(fcfs).seq_ids == [1, 2]  # fcfs ignores priority


def test_waiting_request_preempts_lower_priority_for_a_seat_but_not_equal_or_higher():
    s = Scheduler(
        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, policy="priority"), BlockManager(64, 4)
    )
    low, mid = pseq(1, 3, 9), pseq(2, 3, 5)
    s.add(low)
    s.add(mid)
    run_step(s)
    urgent = pseq(3, 4, 0)
    s.add(urgent)
    plan = run_step(s)
    assert plan.preempted_ids == [low.seq_id]  # the lowest priority goes, not the newest
    assert plan.seq_ids == [mid.seq_id, urgent.seq_id] and plan.num_new_tokens == [1, 4]
    assert low.status is Status.WAITING and low.num_computed == 0 and s.waiting[0] is low
    same = pseq(4, 3, 5)  # mid's priority, later arrival: no preemption, it waits
    s.add(same)
    plan = run_step(s)
    assert plan.preempted_ids == [] and set(plan.seq_ids) == {mid.seq_id, urgent.seq_id}
    assert [q.seq_id for q in s.waiting] == [same.seq_id, low.seq_id]


def test_waiting_request_preempts_lower_priority_for_blocks():
    bm = BlockManager(7, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100, policy="priority"), bm)
    a, b = pseq(1, 8, 3), pseq(2, 8, 1)
    s.add(a)
    s.add(b)
    run_step(s)
    c = pseq(3, 8, 2)
    s.add(c)
    plan = run_step(s)  # the decodes take 2 of 3 free blocks; c needs 2: a (priority 3) makes room
    assert plan.preempted_ids == [a.seq_id] and a.status is Status.WAITING
    assert plan.seq_ids == [b.seq_id, c.seq_id] and plan.num_new_tokens == [1, 8]
    d = pseq(4, 8, 2)  # c's priority: waits, preempts nobody
    s.add(d)
    plan = run_step(s)
    assert plan.preempted_ids == [] and [q.seq_id for q in s.waiting] == [d.seq_id, a.seq_id]


def test_full_cache_preempts_the_worst_rank_not_the_newest():
    bm = BlockManager(5, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100, policy="priority"), bm)
    y = pseq(1, 8, 5)
    s.add(y)
    run_step(s)
    x = pseq(2, 8, 0)  # admitted after y: fcfs would preempt x, the newest
    s.add(x)
    run_step(s)
    assert x.status is Status.RUNNING and y.status is Status.RUNNING
    plan = run_step(s)
    while not plan.preempted_ids:  # both decode until the cache is full
        plan = run_step(s)
    assert plan.preempted_ids == [y.seq_id] and plan.seq_ids == [x.seq_id]


def test_random_priority_workload_progresses_and_frees_everything():
    rng = random.Random(1)
    bm = BlockManager(12, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16, policy="priority"), bm)
    limits = {}
    for i in range(40):
        q = pseq(i, rng.randint(1, 20), rng.randint(-2, 2))
        limits[q] = rng.randint(1, 20)
        s.add(q)
    finished = []
    for _ in range(5000):
        if not s.has_work():
            break
        plan = run_step(s)
        assert plan.seq_ids and plan.num_tokens <= 16 and len(s.running) <= 6
        for q, _ in items(s, plan):
            if q.status is Status.RUNNING and q.num_output >= limits[q]:
                s.finish(q)
                finished.append(q)
    assert len(finished) == 40 and not s.has_work() and bm.check_all_free()
    first_ten = [q.priority for q in finished[:10]]
    assert sum(first_ten) < sum(q.priority for q in finished[-10:])  # high priority finishes first


def test_unknown_policy_is_refused():
    import pytest

    with pytest.raises(ValueError, match="scheduling policy"):
        SchedulerConfig(policy="lifo")
