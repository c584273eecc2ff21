"""The engine on a tiny random model (no tokenizer): batching, preemption, aborts, seeds, n, chunks, prefixes."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from fusionserve.models.decoder import Decoder
from fusionserve.server.api.fusion import FusionTimings
from fusionserve.server.contract import EngineConfig, QueueFullError, RequestTooLongError, SamplingParams
from fusionserve.server.engine.llm_engine import LLMEngine
from fusionserve.server.engine.output_processor import StopMatcher
from fusionserve.server.engine.thread_client import ThreadEngineClient
from tests.tiny_models import make_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_engine"), arch="llama")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs would cost more than the math
    yield path, Decoder.from_pretrained(path, progress=False)
    torch.set_num_threads(threads)


def engine(tiny, **kw) -> LLMEngine:
    path, dec = tiny
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("layer_timing_every", 0)
    return LLMEngine(EngineConfig(model_dir=str(path), **kw), decoder=dec)


def prompts(n: int, lo: int = 1, hi: int = 60, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def ids(outs) -> list[list[int]]:
    return [o[0].token_ids for o in outs]


def test_kernel_path_names_what_runs(tiny):
    assert engine(tiny).kernel_path == "torch on cpu"  # no PDL or CUDA graphs off the GPU


def test_batch_invariance_16_greedy(tiny):
    ps = prompts(16)
    eng = engine(tiny, enable_prefix_caching=False)
    together = ids(eng.generate(ps, GREEDY))
    alone = [ids(eng.generate([p], GREEDY))[0] for p in ps]
    assert together == alone
    assert all(len(t) == GREEDY.max_tokens for t in together)
    assert eng.blocks.check_all_free()


def test_preemption_gives_roomy_outputs(tiny):
    ps = prompts(12, lo=10, hi=40, seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    roomy = ids(engine(tiny, enable_prefix_caching=False).generate(ps, params))
    tight = engine(tiny, num_kv_blocks=8, max_num_batched_tokens=64, enable_prefix_caching=False)
    assert ids(tight.generate(ps, params)) == roomy
    assert tight.stats().preemptions > 0
    assert tight.blocks.check_all_free()


def test_prompt_logprobs_survive_preemption(tiny):
    ps = prompts(6, lo=20, hi=40, seed=11)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, prompt_logprobs=1)
    roomy = engine(tiny).generate(ps, params)
    tight_engine = engine(tiny, num_kv_blocks=6, max_num_batched_tokens=16)
    tight = tight_engine.generate(ps, params)
    assert tight_engine.stats().preemptions > 0
    for (a,), (b,), p in zip(roomy, tight, ps):
        assert a.token_ids == b.token_ids
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(p)
        for x, y, tok in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], p[1:]):
            assert x.token_id == y.token_id == tok and abs(x.logprob - y.logprob) < 1e-4


def test_random_submit_abort_interleavings_free_everything(tiny):
    rng = random.Random(2)
    eng = engine(tiny, num_kv_blocks=16, max_num_seqs=8, max_num_batched_tokens=32)
    live: set[str] = set()
    finished: set[str] = set()
    added = 0

    def collect(outs):
        for o in outs:
            if o.request_id not in eng.requests:  # every choice finished, or aborted
                finished.add(o.request_id)
                live.discard(o.request_id)

    for _ in range(1000):
        r = rng.random()
        if r < 0.35:
            rid = f"r{added}"
            added += 1
            p = SamplingParams(
                max_tokens=rng.randint(1, 30),
                temperature=rng.choice([0, 1.0]),
                n=rng.choice([1, 1, 2]),
                ignore_eos=rng.random() < 0.5,
                seed=rng.choice([None, 3]),
            )
            eng.add_request(rid, prompts(1, 1, 90, seed=rng.randrange(10**6))[0], p)
            live.add(rid)
        elif r < 0.55 and live:
            rid = rng.choice(sorted(live))
            collect(eng.abort_request(rid))
        elif r < 0.6:
            assert eng.abort_request("nope") == []
        else:
            collect(eng.step())
    for _ in range(3000):
        if not eng.has_unfinished():
            break
        collect(eng.step())
    assert not eng.has_unfinished() and not live
    assert len(finished) == added
    assert eng.blocks.check_all_free()
    assert not eng.scheduler.running and not eng.scheduler.waiting


def test_seeds_equal_across_batch_compositions(tiny):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    target = prompts(1, 20, 20, seed=3)[0]
    eng = engine(tiny, enable_prefix_caching=False)
    alone = eng.generate([target], p)[0][0].token_ids
    others = prompts(5, seed=4)
    mixed = [SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)] * 3 + [GREEDY, p]
    crowd = eng.generate(others[:2] + [target] + others[2:], mixed[:2] + [p] + mixed[2:])
    assert crowd[2][0].token_ids == alone
    other_seed = eng.generate([target], SamplingParams(**{**p.__dict__, "seed": 99}))[0][0].token_ids
    assert other_seed != alone


def test_n3_shares_prompt_blocks(tiny):
    eng = engine(tiny)
    prompt = prompts(1, 40, 40, seed=5)[0]  # two full blocks + a partial one
    single = eng.generate([prompt], GREEDY)[0][0].token_ids
    eng.add_request("n3", prompt, SamplingParams(**{**GREEDY.__dict__, "n": 3}))
    outs = eng.step()  # prefill + fork + first token for all three
    req_seqs = [ch.seq for ch in eng.requests["n3"].choices]
    assert sorted(o.index for o in outs) == [0, 1, 2]
    first_block = req_seqs[0].table.blocks[0]
    assert all(s.table.blocks[:2] == req_seqs[0].table.blocks[:2] for s in req_seqs)
    assert eng.blocks.blocks[first_block].ref_count >= 3
    assert len({s.table.blocks[2] for s in req_seqs}) == 3  # partial block copied, not shared
    merged: dict[int, list[int]] = {o.index: list(o.token_ids) for o in outs}
    while eng.has_unfinished():
        for o in eng.step():
            merged[o.index] += o.token_ids
    assert merged[0] == merged[1] == merged[2] == single  # greedy: the copies hold the same K/V
    sampled = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=5))[0]
    assert [o.index for o in sampled] == [0, 1, 2] and len({tuple(o.token_ids) for o in sampled}) > 1
    assert eng.blocks.check_all_free()


def test_chunked_prefill_matches_unchunked(tiny):
    prompt = prompts(1, 80, 80, seed=6)[0]
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    whole = engine(tiny, max_num_batched_tokens=2048).generate([prompt], p)[0][0]
    chunked_engine = engine(tiny, max_num_batched_tokens=16)
    chunked = chunked_engine.generate([prompt], p)[0][0]
    assert chunked_engine.num_steps == 5 + 3  # five 16-token chunks, then three decodes
    assert chunked.token_ids == whole.token_ids
    assert len(whole.prompt_logprobs) == 80 and whole.prompt_logprobs[0] is None
    for a, b in zip(
        whole.prompt_logprobs[1:] + whole.logprobs, chunked.prompt_logprobs[1:] + chunked.logprobs
    ):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-4


def test_prefix_cache_hits_keep_outputs(tiny):
    shared = prompts(1, 48, 48, seed=7)[0]
    ps = [shared + tail for tail in prompts(6, 1, 10, seed=8)]
    reference = ids(engine(tiny, enable_prefix_caching=False).generate(ps, GREEDY))
    eng = engine(tiny)
    first = ids(eng.generate(ps[:1], GREEDY))
    rest = ids(eng.generate(ps[1:], GREEDY))
    assert eng.stats().prefix_hit_rate > 0
    assert first + rest == reference
    assert eng.blocks.check_all_free()


def test_fusion_switch_mid_generation_tiny(tiny):
    ps = prompts(4, seed=9)
    reference = ids(engine(tiny, fusion="on").generate(ps, GREEDY))
    eng = engine(tiny, fusion="ab", layer_timing_every=2)
    assert ids(eng.generate(ps, GREEDY)) == reference
    timings = FusionTimings()
    timings.record(eng.take_step_stats())  # what the core sends the client with each step
    summary = timings.summary(eng.fusion.mode)
    assert set(summary["steps"]) == {"on", "off"}
    assert set(summary["layers"]) == {"on", "off"}  # an even timing interval still samples both paths
    eng.fusion.set_mode("off")
    assert eng.fusion.step_mode() is False and eng.fusion.mode == "off"


def test_rejects_too_long_and_bad_input(tiny):
    eng = engine(tiny, max_model_len=64)
    assert eng.max_model_len == 64
    with pytest.raises(RequestTooLongError):
        eng.add_request("x", [5] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError):
        eng.add_request("y", [], SamplingParams())
    with pytest.raises(ValueError):
        eng.add_request("z", [999], SamplingParams())
    with pytest.raises(ValueError):  # no tokenizer for stop strings
        eng.add_request("s", [5], SamplingParams(stop=("a",)))
    assert not eng.has_unfinished()


def test_stop_matcher_holds_partial_stop_strings():
    m = StopMatcher(("STOP", "xyz"))
    pieces = ["Hello S", "T", "ill going ST", "O", "P never shown"]
    out = []
    hit = False
    for piece in pieces:
        text, hit = m.feed(piece)
        out.append(text)
        if hit:
            break
    assert hit and "".join(out) == "Hello STill going "
    assert out[0] == "Hello " and out[1] == ""  # "S", "ST" held back while they could start STOP
    m2 = StopMatcher(("STOP",))
    assert m2.feed("abcST") == ("abc", False)
    assert m2.feed("", final=True) == ("ST", False)


def test_async_engine_close_early_aborts_and_frees(tiny):
    eng = engine(tiny, max_queue=2)
    front = ThreadEngineClient(eng.config, engine=eng)
    front.start()

    async def main():
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        agen = front.generate("a", prompts(1, 30, 30)[0], long)
        got = [await agen.__anext__(), await agen.__anext__()]
        assert got[0].token_ids and not got[1].finished
        await agen.aclose()  # the consumer leaves: the request is aborted, its blocks freed
        assert await front.wait_idle(10)
        assert eng.blocks.check_all_free() and not eng.has_unfinished()

        outs = [
            o async for o in front.generate("b", [5, 6, 7], SamplingParams(max_tokens=5, n=2, temperature=0))
        ]
        assert sorted(o.index for o in outs if o.finished) == [0, 1]
        assert sum(len(o.token_ids) for o in outs) == 10

        with pytest.raises(RequestTooLongError):
            await front.generate("c", [5] * 10, SamplingParams(max_tokens=10**6)).__anext__()

        # a cancelled consumer task aborts too
        started = asyncio.Event()

        async def consume():
            async for _ in front.generate("d", [5, 6], long):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await front.wait_idle(10)
        assert eng.blocks.check_all_free()
        assert front.is_alive() and front.stats().running == 0

    asyncio.run(main())
    front.begin_drain()
    with pytest.raises(Exception, match="shutting down"):
        asyncio.run(front.generate("e", [5], GREEDY).__anext__())
    front.shutdown()
    assert not front.is_alive()


def test_queue_full(tiny):
    eng = engine(tiny, max_queue=0)
    front = ThreadEngineClient(eng.config, engine=eng)
    front.start()
    with pytest.raises(QueueFullError):
        asyncio.run(front.generate("q", [5], GREEDY).__anext__())
    front.shutdown()


def test_engine_metrics_are_updated(tiny):
    from fusionserve.server.api.metrics import ServerMetrics

    metrics = ServerMetrics(model_name="tiny", process_metrics=False)
    path, dec = tiny
    eng = LLMEngine(EngineConfig(model_dir=str(path), num_kv_blocks=64, layer_timing_every=1), decoder=dec)
    eng.generate(prompts(2), GREEDY)
    eng.add_request("ab", [5, 6], GREEDY)
    eng.step()
    eng.abort_request("ab")
    metrics.record_step_stats(eng.take_step_stats())  # the engine records none itself
    body = metrics.render()[0].decode()
    for needle in (
        'fusionserve_step_latency_seconds_count{fusion="on",phase="prefill"}',
        'fusionserve_layer_latency_seconds_count{fusion="on",layer="1",part="block",phase="decode"}',
        "fusionserve_aborts_total 1.0",
        'fusionserve_generation_tokens_total{model="tiny"} 25.0',
    ):
        assert needle in body, needle
    assert torch.is_tensor(eng.runner.kv.k[0])


def test_overlap_matches_non_overlapped(tiny):
    """Launching step n+1 before the output work of step n changes nothing a client sees."""
    ps = prompts(12, seed=7)
    plist = [
        GREEDY,
        SamplingParams(max_tokens=10, temperature=0.9, seed=3),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=4, n=2),
        SamplingParams(max_tokens=9, temperature=0, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(7, 9, 11, 13, 15, 17, 19)),
        SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3, ignore_eos=True),
    ] * 2
    runs = []
    for overlap in (False, True):
        eng = engine(tiny, overlap=overlap, max_num_seqs=8)
        runs.append(
            [[(o.token_ids, o.finish_reason, o.logprobs) for o in r] for r in eng.generate(ps, plist)]
        )
        assert eng.blocks.check_all_free() and not eng.has_unfinished()
    assert runs[0] == runs[1]


def test_abort_while_a_step_is_in_flight_frees_every_block(tiny):
    eng = engine(tiny)
    assert eng.config.overlap
    ps = prompts(6, seed=9)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(ps))}
    for _ in range(3):
        for o in eng.step():
            got[o.request_id] += o.token_ids
    assert eng._inflight is not None  # the next step is running while the caller holds these outputs
    aborted = eng.abort_request("r1") + eng.abort_request("r4")
    assert sorted(o.request_id for o in aborted) == ["r1", "r4"] and all(
        o.finish_reason == "abort" for o in aborted
    )
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id not in ("r1", "r4")  # their in-flight tokens are dropped
            got[o.request_id] += o.token_ids
    assert eng.blocks.check_all_free()
    alone = ids(
        engine(tiny, overlap=False).generate(
            [ps[0]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        )
    )
    assert got["r0"] == alone[0] and len(got["r1"]) == len(got["r4"]) == 3
    # everything aborted while in flight: the step is collected, nothing is emitted, nothing leaks
    for i, p in enumerate(ps):
        eng.add_request(f"x{i}", p, GREEDY)
    eng.step()
    for i in range(len(ps)):
        eng.abort_request(f"x{i}")
    assert eng.has_unfinished()  # the launched step is still to be collected
    assert eng.step() == [] and not eng.has_unfinished()
    assert eng.blocks.check_all_free()


def test_prepare_counts_the_leading_decodes(tiny):
    """A mixed step's PagedBatch says how many leading sequences bring one token (the decode kernel's share)."""
    from fusionserve.server.engine.model_runner import ModelRunner
    from fusionserve.server.engine.scheduler import SchedulerOutput

    runner = ModelRunner(tiny[1], num_blocks=16, block_size=16)

    def prepare(rows):
        """rows: (tokens, num_computed, new tokens, blocks) per sequence, as a scheduler plans them."""
        plan = SchedulerOutput(
            seq_ids=list(range(len(rows))),
            num_new_tokens=[n for _, _, n, _ in rows],
            num_computed=[c for _, c, _, _ in rows],
            seq_lens=[t for t, _, _, _ in rows],
            block_tables=[b for _, _, _, b in rows],
            preempted_ids=[],
        )
        tokens = [list(range(3, 3 + t)) for t, _, _, _ in rows]
        return runner.prepare(plan, tokens, [t - 1 if c else t for t, c, _, _ in rows], [False] * len(rows))

    decodes = [(20, 19, 1, [0, 1]), (5, 4, 1, [2])]
    chunk = [(30, 0, 30, [3, 4])]
    mixed = prepare(decodes + chunk)
    assert mixed.batch.num_decodes == 2 and mixed.batch.max_query_len == 30
    assert mixed.sample_index == [0, 1, 2] and mixed.ids.tolist()[:2] == [3 + 19, 3 + 4]
    assert prepare(chunk + decodes).batch.num_decodes == 0
    assert prepare(decodes).batch.num_decodes == 2
    runner._warm_step(3, 40, 8, fused=True)  # the start-up warm-up steps (mixed and decode) run anywhere
    runner._warm_step(1, 1, 20, fused=False)
    runner._warm_step(4, 30, 0, fused=True)
    before = [t.clone() for t in runner.kv.k + runner.kv.v]
    runner.warm_prefill_paths(40)  # both paths' large prefills at start-up: they write nothing
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv.k + runner.kv.v))


def test_launch_ahead_feeds_device_ids_and_hashes_generated_blocks(tiny, monkeypatch):
    """Steps launched before the previous one is collected read their input ids on the device; the
    generated tokens still land in the prefix cache with their real ids (a follow-up prompt that
    repeats prompt + answer hits the blocks holding the answer)."""
    eng = engine(tiny)
    launched_ahead = []
    real = LLMEngine._launch_ahead
    monkeypatch.setattr(
        LLMEngine, "_launch_ahead", lambda self: launched_ahead.append(real(self)) or launched_ahead[-1]
    )
    prompt = prompts(1, 20, 20, seed=11)[0]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    answer = ids(eng.generate([prompt], params))[0]
    assert sum(launched_ahead) >= 30  # nearly every step was launched ahead
    assert answer == ids(engine(tiny, overlap=False).generate([prompt], params))[0]
    hits_before = eng.blocks.prefix_hit_rate
    follow = prompt + answer[:36]  # 56 tokens: blocks 0-2 full, block 2 = tokens 32..47 (generated)
    table = eng.blocks.match_prefix(follow)
    assert len(table.blocks) == 3  # every full block the answer filled was hashed with real ids
    eng.blocks.free(table)
    again = ids(eng.generate([follow], GREEDY))
    assert eng.blocks.prefix_hit_rate > hits_before
    assert again == ids(engine(tiny, enable_prefix_caching=False).generate([follow], GREEDY))
    assert eng.blocks.check_all_free()


def test_priority_policy_serves_urgent_first_with_unchanged_tokens(tiny):
    """Under --scheduling-policy priority an urgent request jumps the waiting queue and preempts a
    running one (seats full), and every request's greedy tokens equal the fcfs run's."""
    ps = prompts(7, lo=10, hi=30, seed=4)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = ids(engine(tiny, enable_prefix_caching=False).generate(ps, params))
    eng = engine(tiny, scheduling_policy="priority", max_num_seqs=4, enable_prefix_caching=False)
    for i, p in enumerate(ps[:6]):  # four run, two wait
        eng.add_request(f"low{i}", p, params, priority=10)
    tokens: dict[str, list[int]] = {}
    done: list[str] = []

    def step() -> set[str]:
        outs = eng.step()
        for out in outs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                done.append(out.request_id)
        return {o.request_id for o in outs}

    for _ in range(3):
        step()
    eng.add_request("urgent", ps[6], params, priority=-1)
    stepped = set()
    for _ in range(3):  # launched ahead: its first token surfaces within a step or two
        stepped |= step()
    assert "urgent" in stepped and eng.stats().preemptions > 0
    while eng.has_unfinished():
        step()
    assert done.index("urgent") < done.index("low4") and done.index("urgent") < done.index("low5")
    assert [tokens[f"low{i}"] for i in range(6)] + [tokens["urgent"]] == want
    assert eng.blocks.check_all_free()


def test_fcfs_refuses_a_priority(tiny):
    front = ThreadEngineClient(EngineConfig(model_dir=str(tiny[0]), num_kv_blocks=32), engine=engine(tiny))

    async def first():
        return await front.generate("p", [5, 6], GREEDY, priority=3).__anext__()

    with pytest.raises(ValueError, match="scheduling-policy priority"):
        asyncio.run(first())


def test_max_model_len_defaults_to_the_full_context_or_what_the_cache_holds(tiny, tmp_path):
    from fusionserve.server.contract import EngineStartError

    eng = engine(tiny)  # 128 blocks × 16 = 2048 cache tokens > the model's 512 positions
    assert (eng.max_model_len, eng.max_model_len_why) == (512, "the model's full context")
    small = engine(tiny, num_kv_blocks=10)
    assert small.max_model_len == 160 and "the model supports 512" in small.max_model_len_why
    assert engine(tiny, max_model_len=300).max_model_len == 300
    for bad, words in ((600, "exceeds the model's context"), (2000, "exceeds the model's context")):
        with pytest.raises(EngineStartError, match=words):
            engine(tiny, max_model_len=bad)
    with pytest.raises(EngineStartError, match="does not fit the KV cache"):
        engine(tiny, max_model_len=400, num_kv_blocks=10)
    windowed = make_tiny_checkpoint(tmp_path / "swa", arch="mistral")
    cfg = windowed / "config.json"
    import json

    raw = json.loads(cfg.read_text())
    raw["sliding_window"] = 128
    cfg.write_text(json.dumps(raw))
    dec = Decoder.from_pretrained(windowed, progress=False)
    swa = LLMEngine(
        EngineConfig(model_dir=str(windowed), num_kv_blocks=64, layer_timing_every=0), decoder=dec
    )
    assert swa.max_model_len == 128 and "sliding window" in swa.max_model_len_why
    with pytest.raises(EngineStartError, match="sliding window"):
        LLMEngine(EngineConfig(model_dir=str(windowed), num_kv_blocks=64, max_model_len=256), decoder=dec)
