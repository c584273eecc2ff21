"""Scheduler without a model: token budget, decodes first, chunking, preemption order, progress."""

from __future__ import annotations

import random

from fusionserve.server.engine.block_manager import BlockManager
from fusionserve.server.engine.scheduler import Scheduler, SchedulerConfig, Sequence, Status


def seq(i: int, prompt_len: int) -> Sequence:
    return Sequence(seq_id=i, tokens=list(range(100 * i, 100 * i + prompt_len)), num_prompt=prompt_len)


def run_step(s: Scheduler, new_token: int = 7):
    """Plan a step, pretend the model ran, append a token to every sequence whose chunk ended."""
    plan = s.schedule()
    s.advance(plan)
    for q, _ in plan.items:
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
    assert plan.items[0] == (a, 1) and plan.items[1] == (b, 9)
    assert plan.num_tokens == 10
    plan = run_step(s)  # b continues its prompt from the running set, still after a's decode
    assert [q for q, _ in plan.items] == [a, b] and plan.items[1][1] == 9
    plan = run_step(s)
    assert plan.items[1] == (b, 7)
    assert plan.is_decode is False
    assert run_step(s).is_decode


def test_max_num_seqs_limits_admission():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), BlockManager(64, 4))
    for i in range(4):
        s.add(seq(i, 5))
    plan = run_step(s)
    assert len(plan.items) == 2 and len(s.waiting) == 2


def test_preempts_most_recently_admitted():
    bm = BlockManager(7, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm)
    seqs = [seq(i, 8) for i in range(3)]  # 2 blocks each, one block left as admission headroom
    for q in seqs:
        s.add(q)
    run_step(s)
    assert bm.num_free == 1 and all(q.status is Status.RUNNING for q in seqs)
    plan = run_step(s)  # every decode needs a third block: the first takes the last free one
    assert plan.preempted[0] is seqs[2]
    assert seqs[0] in [q for q, _ in plan.items]
    assert seqs[2].status is Status.WAITING and seqs[2].num_computed == 0 and s.waiting[0] is seqs[2]


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
        assert plan.items, "a step with work must schedule something"
        assert plan.num_tokens <= 16 and len(s.running) <= 6
        for q, _ in plan.items:
            if q.status is Status.RUNNING and q.num_output >= limits[q]:
                s.finish(q)
                finished += 1
    assert finished == 40 and not s.has_work()
    assert bm.check_all_free()
    assert s.num_preemptions > 0
