"""fusionserve.server.api.metrics: names, types, labels and helpers, read back through a real exposition parse."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fusionserve.server.api import metrics as m
from fusionserve.server.api.metrics import METRIC_NAMES, ServerMetrics

MODEL = "test-model"

# docs/DESIGN.md, "Metrics": base name -> (type, label names)
EXPECTED = {
    "fusionserve_layer_latency_seconds": ("histogram", {"layer", "part", "phase", "fusion"}),
    "fusionserve_step_latency_seconds": ("histogram", {"phase", "fusion"}),
    "fusionserve_time_to_first_token_seconds": ("histogram", {"model"}),
    "fusionserve_inter_token_latency_seconds": ("histogram", {"model"}),
    "fusionserve_e2e_request_latency_seconds": ("histogram", {"model", "finish_reason"}),
    "fusionserve_prompt_tokens_total": ("counter", {"model"}),
    "fusionserve_generation_tokens_total": ("counter", {"model"}),
    "fusionserve_requests_total": ("counter", {"endpoint", "status"}),
    "fusionserve_requests_running": ("gauge", set()),
    "fusionserve_requests_waiting": ("gauge", set()),
    "fusionserve_kv_cache_usage_ratio": ("gauge", set()),
    "fusionserve_preemptions_total": ("counter", set()),
    "fusionserve_aborts_total": ("counter", set()),
    "fusionserve_fusion_mode": ("gauge", {"mode"}),
    # the engine process's CPU, as the core reports it (server/engine/process_client.py)
    "fusionserve_engine_process_cpu_seconds_total": ("counter", set()),
    # engine processes the supervisor respawned (server/engine/supervisor.py)
    "fusionserve_engine_restarts_total": ("counter", set()),
}


def exercise(sm: ServerMetrics) -> None:
    sm.observe_layer(0, "attn", "decode", "on", 6.7e-6)
    sm.observe_layer(0, "mlp", "decode", "off", 9.0e-6)
    sm.observe_layer(29, "block", "prefill", "on", 2.5e-3)
    sm.observe_step("decode", "on", 0.004)
    sm.observe_step("decode", "off", 0.0045)
    sm.observe_step("prefill", "on", 0.05)
    sm.observe_ttft(0.12)
    sm.observe_itl(0.004)
    sm.observe_itl(0.005)
    sm.observe_request_done("stop", 1.5, prompt_tokens=12, generation_tokens=30)
    sm.observe_request_done("length", 2.0, prompt_tokens=8, generation_tokens=16)
    sm.count_request("/v1/chat/completions", 200)
    sm.count_request("/v1/chat/completions", "429")
    sm.set_queue(running=3, waiting=5)
    sm.set_kv_usage(0.42)
    sm.inc_preemptions()
    sm.inc_preemptions(2)
    sm.inc_aborts()
    sm.set_fusion_mode("ab")


def scrape(sm: ServerMetrics) -> dict[str, object]:
    body, ctype = sm.render()
    assert isinstance(body, bytes)
    assert ctype.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def family(fams, name):
    # the parser names counter families without their "_total" suffix
    return fams[name.removesuffix("_total")]


def samples(fams, name, suffix=""):
    return [s for s in family(fams, name).samples if s.name == name.removesuffix("_total") + suffix]


def value(fams, name, suffix="", **labels):
    hits = [
        s.value for s in samples(fams, name, suffix) if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(hits) == 1, (name, suffix, labels, hits)
    return hits[0]


def test_metric_names_match_design():
    assert set(METRIC_NAMES) == set(EXPECTED)
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES))
    assert all(n.startswith("fusionserve_") for n in METRIC_NAMES)


def test_every_metric_exported_with_design_types_and_labels():
    sm = ServerMetrics(
        CollectorRegistry(), model_name=MODEL, engine_cpu_seconds=lambda: 1.5, engine_restarts=lambda: 2
    )
    exercise(sm)
    fams = scrape(sm)
    for name, (mtype, labels) in EXPECTED.items():
        fam = family(fams, name)
        assert fam.type == mtype, name
        main = {"histogram": "_count", "counter": "_total", "gauge": ""}[mtype]
        got = samples(fams, name.removesuffix("_total"), main)
        assert got, f"no samples for {name}"
        for s in got:
            assert set(s.labels) == labels, (name, s.labels)
    assert value(fams, "fusionserve_engine_restarts_total", "_total") == 2


def test_helper_values():
    sm = ServerMetrics(CollectorRegistry(), model_name=MODEL)
    exercise(sm)
    f = scrape(sm)
    L = "fusionserve_layer_latency_seconds"
    assert value(f, L, "_count", layer="0", part="attn", phase="decode", fusion="on") == 1
    assert value(f, L, "_sum", layer="29", part="block", phase="prefill", fusion="on") == pytest.approx(
        2.5e-3
    )
    # 6.7 µs lands in the first (10 µs) bucket
    assert value(f, L, "_bucket", layer="0", part="attn", phase="decode", fusion="on", le="1e-05") == 1
    S = "fusionserve_step_latency_seconds"
    assert value(f, S, "_sum", phase="decode", fusion="off") == pytest.approx(0.0045)
    assert value(f, S, "_count", phase="prefill", fusion="on") == 1
    assert value(f, "fusionserve_time_to_first_token_seconds", "_count", model=MODEL) == 1
    assert value(f, "fusionserve_inter_token_latency_seconds", "_count", model=MODEL) == 2
    E = "fusionserve_e2e_request_latency_seconds"
    assert value(f, E, "_count", model=MODEL, finish_reason="stop") == 1
    assert value(f, E, "_sum", model=MODEL, finish_reason="length") == pytest.approx(2.0)
    assert value(f, "fusionserve_prompt_tokens_total", "_total", model=MODEL) == 20
    assert value(f, "fusionserve_generation_tokens_total", "_total", model=MODEL) == 46
    R = "fusionserve_requests_total"
    assert value(f, R, "_total", endpoint="/v1/chat/completions", status="200") == 1
    assert value(f, R, "_total", endpoint="/v1/chat/completions", status="429") == 1
    assert value(f, "fusionserve_requests_running") == 3
    assert value(f, "fusionserve_requests_waiting") == 5
    assert value(f, "fusionserve_kv_cache_usage_ratio") == pytest.approx(0.42)
    assert value(f, "fusionserve_preemptions_total", "_total") == 3
    assert value(f, "fusionserve_aborts_total", "_total") == 1
    assert value(f, "fusionserve_fusion_mode", mode="ab") == 1
    assert value(f, "fusionserve_fusion_mode", mode="on") == 0
    assert value(f, "fusionserve_fusion_mode", mode="off") == 0


def test_fusion_mode_gauge_flips_and_defaults_to_on():
    sm = ServerMetrics(CollectorRegistry())
    f = scrape(sm)
    assert [value(f, "fusionserve_fusion_mode", mode=x) for x in ("on", "off", "ab")] == [1, 0, 0]
    sm.set_fusion_mode("off")
    f = scrape(sm)
    assert [value(f, "fusionserve_fusion_mode", mode=x) for x in ("on", "off", "ab")] == [0, 1, 0]
    with pytest.raises(ValueError):
        sm.set_fusion_mode("maybe")
    f = scrape(sm)
    assert value(f, "fusionserve_fusion_mode", mode="off") == 1


def test_bad_labels_refused():
    sm = ServerMetrics(CollectorRegistry())
    with pytest.raises(ValueError):
        sm.observe_layer(0, "norm", "decode", "on", 1e-6)
    with pytest.raises(ValueError):
        sm.observe_layer(0, "attn", "both", "on", 1e-6)
    with pytest.raises(ValueError):
        sm.observe_step("decode", "ab", 1e-3)  # a timed step ran one path, never "ab"


def test_model_series_exist_before_first_request():
    sm = ServerMetrics(CollectorRegistry(), model_name=MODEL)
    f = scrape(sm)
    assert value(f, "fusionserve_time_to_first_token_seconds", "_count", model=MODEL) == 0
    assert value(f, "fusionserve_generation_tokens_total", "_total", model=MODEL) == 0


def test_kv_usage_clamped_and_zero_increments():
    sm = ServerMetrics(CollectorRegistry())
    sm.set_kv_usage(1.3)
    sm.inc_aborts(0)
    sm.observe_request_done("abort", 0.5, prompt_tokens=0, generation_tokens=0)
    f = scrape(sm)
    assert value(f, "fusionserve_kv_cache_usage_ratio") == 1.0
    assert value(f, "fusionserve_aborts_total", "_total") == 0
    assert value(f, "fusionserve_e2e_request_latency_seconds", "_count", finish_reason="abort") == 1


def test_instances_are_independent():
    a = ServerMetrics()
    b = ServerMetrics()
    assert a.registry is not b.registry
    a.inc_aborts(5)
    fb = scrape(b)
    assert value(fb, "fusionserve_aborts_total", "_total") == 0
    # own registry carries process metrics; a given registry gets none unless asked
    assert any(n.startswith("process_") for n in scrape(a))
    c = ServerMetrics(CollectorRegistry())
    assert not any(n.startswith("process_") for n in scrape(c))


def test_buckets_cover_design_ranges():
    assert m.LAYER_BUCKETS[0] == pytest.approx(10e-6) and m.LAYER_BUCKETS[-1] == pytest.approx(0.1)
    assert m.STEP_BUCKETS[0] == pytest.approx(100e-6) and m.STEP_BUCKETS[-1] == pytest.approx(10.0)
    assert m.REQUEST_BUCKETS[0] == pytest.approx(1e-3) and m.REQUEST_BUCKETS[-1] == pytest.approx(120.0)
    assert m.ITL_BUCKETS[0] == pytest.approx(1e-3) and m.ITL_BUCKETS[-1] == pytest.approx(10.0)
    for b in (m.LAYER_BUCKETS, m.STEP_BUCKETS, m.REQUEST_BUCKETS, m.ITL_BUCKETS):
        assert list(b) == sorted(set(b))


def test_engine_core_records_become_series_in_the_http_process():
    """The engine core sends plain records (EngineCoreOutputs); this process's registry turns them
    into series, beside its own requests_total, process metrics and the engine process's CPU."""
    from fusionserve.server.contract import EngineCoreOutputs, EngineStats, FinishedRequest, StepStats

    http = ServerMetrics(model_name=MODEL, engine_cpu_seconds=lambda: 2.5)
    http.count_request("/v1/completions", 200)
    step = StepStats(
        steps=[("decode", "on", 0.01), ("prefill", "off", 0.2)],
        layers=[("decode", "on", 0, "attn", 1e-4)],
        ttfts=[0.05],
        itls=[0.01, 0.02],
        finished=[FinishedRequest("stop", 1.0, 7, 3)],
        preemptions=2,
        aborts=1,
    )
    stats = EngineStats(running=3, waiting=1, kv_usage=0.25, preemptions=2, prefix_hit_rate=0.0, steps=2)
    http.record(EngineCoreOutputs([], step, stats, adds_seen=1, cpu_seconds=2.5))
    text = http.render()[0].decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert value(fams, "fusionserve_step_latency_seconds", "_count", phase="decode", fusion="on") == 1
    assert value(fams, "fusionserve_step_latency_seconds", "_count", phase="prefill", fusion="off") == 1
    assert (
        value(
            fams,
            "fusionserve_layer_latency_seconds",
            "_count",
            layer="0",
            part="attn",
            phase="decode",
            fusion="on",
        )
        == 1
    )
    assert value(fams, "fusionserve_inter_token_latency_seconds", "_count", model=MODEL) == 2
    assert (
        value(fams, "fusionserve_e2e_request_latency_seconds", "_count", model=MODEL, finish_reason="stop")
        == 1
    )
    assert value(fams, "fusionserve_generation_tokens", "_total", model=MODEL) == 3
    assert (
        value(fams, "fusionserve_preemptions", "_total") == 2
        and value(fams, "fusionserve_aborts", "_total") == 1
    )
    assert (
        value(fams, "fusionserve_requests_running") == 3
        and value(fams, "fusionserve_kv_cache_usage_ratio") == 0.25
    )
    assert value(fams, "fusionserve_requests", "_total", endpoint="/v1/completions", status="200") == 1
    assert value(fams, "fusionserve_engine_process_cpu_seconds", "_total") == 2.5
    assert "process_cpu_seconds" in fams
