"""Generate deploy/grafana/fusionserve.json (the Grafana dashboard).

    python deploy/grafana/build_dashboard.py          # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is stale

The JSON is committed (Grafana provisions it as is); this script is its source,
and tests/test_deploy.py checks that the two agree. Every metric queried here
comes from server/api/metrics.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("fusionserve.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"

STEP = "fusionserve_step_latency_seconds"
LAYER = "fusionserve_layer_latency_seconds"
LAYER_SEL = 'phase="$phase",part="$part"'


class Layout:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def newline(self) -> None:
        self.y += self.row_h
        self.x = 0
        self.row_h = 0

    def id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i


def target(expr: str, legend: str = "", ref: str = "A", **extra) -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, "range": True}
    t.update(extra)
    return t


def targets(*pairs: tuple[str, str], **extra) -> list[dict]:
    return [target(e, leg, chr(ord("A") + i), **extra) for i, (e, leg) in enumerate(pairs)]


def mean(metric: str, sel: str, by: str, window: str = RI) -> str:
    return (
        f"sum by ({by}) (rate({metric}_sum{{{sel}}}[{window}]))\n"
        f"  /\nsum by ({by}) (rate({metric}_count{{{sel}}}[{window}]))"
    )


def ratio(sel: str, by: str = "phase", window: str = "5m") -> str:
    """Mean step latency fused / off (``sel`` ends with a comma when not empty)."""
    on = mean(STEP, sel + 'fusion="on"', by, window)
    off = mean(STEP, sel + 'fusion="off"', by, window)
    return f"(\n{on}\n)\n/ on ({by})\n(\n{off}\n)"


def quantile(q: float, metric: str, sel: str = "", by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{sel}}}[{RI}])))"


def timeseries(lay, title, tgts, unit, w=12, h=8, desc="", overrides=None, **custom) -> dict:
    fc = {
        "drawStyle": "line",
        "lineWidth": 2,
        "fillOpacity": 8,
        "showPoints": "never",
        "spanNulls": True,
    }
    fc.update(custom)
    return {
        "id": lay.id(),
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": lay.place(w, h),
        "targets": tgts,
        "fieldConfig": {"defaults": {"unit": unit, "custom": fc}, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(lay, title, tgts, unit, w=4, h=4, desc="", thresholds=None, mappings=None, text_mode="auto") -> dict:
    return {
        "id": lay.id(),
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": lay.place(w, h),
        "targets": tgts,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "decimals": 3 if unit == "none" else None,
                "mappings": mappings or [],
                "thresholds": {"mode": "absolute", "steps": thresholds or [{"color": "blue", "value": None}]},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "textMode": text_mode,
            "justifyMode": "center",
        },
    }


def row(lay, title) -> dict:
    lay.newline()
    p = {
        "id": lay.id(),
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": lay.y},
        "panels": [],
    }
    lay.y += 1
    return p


def color(name_regex: str, c: str) -> dict:
    return {
        "matcher": {"id": "byRegexp", "options": name_regex},
        "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": c}}],
    }


FUSED, UNFUSED = "green", "orange"
AB_COLORS = [color(".*(on|fused).*", FUSED), color(".*(off|unfused).*", UNFUSED)]


def panels() -> list[dict]:
    lay = Layout()
    out: list[dict] = []

    # ------------------------------------------------------------------ A/B
    out.append(row(lay, "Deferred-norm fusion: A/B"))
    out.append(
        stat(
            lay,
            "Fusion mode",
            [target("fusionserve_fusion_mode == 1", "{{mode}}", instant=True, range=False)],
            "none",
            desc="The configured mode: on, off, or ab (alternates the two paths step by step). "
            "Flip it with POST /admin/fusion.",
            text_mode="name",
        )
    )
    ratio_thresholds = [
        {"color": "green", "value": None},
        {"color": "yellow", "value": 1.0},
        {"color": "red", "value": 1.02},
    ]
    for phase in ("decode", "prefill"):
        out.append(
            stat(
                lay,
                f"Fused / off, {phase} step",
                [target(ratio(f'phase="{phase}",'), phase)],
                "none",
                desc=f"Mean {phase} step latency with fusion on divided by the same with fusion off "
                "(5 min window; needs --fusion ab or both modes in the window). Below 1 = fused is faster.",
                thresholds=ratio_thresholds,
            )
        )
    out.append(
        stat(
            lay,
            "Decode step saving",
            [
                target(
                    "1 - ("
                    + mean(STEP, 'phase="decode",fusion="on"', "phase", "5m")
                    + ")\n/\n("
                    + mean(STEP, 'phase="decode",fusion="off"', "phase", "5m")
                    + ")",
                    "saving",
                )
            ],
            "percentunit",
            desc="Share of the unfused decode step time saved by the deferred norm.",
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 0}],
        )
    )
    out.append(
        stat(
            lay,
            "Decode steps/s by path",
            targets((f'sum by (fusion) (rate({STEP}_count{{phase="decode"}}[5m]))', "{{fusion}}")),
            "ops",
            w=8,
            desc="How many timed decode steps each path ran (both should be close under ab).",
        )
    )
    lay.newline()
    for phase in ("decode", "prefill"):
        out.append(
            timeseries(
                lay,
                f"{phase.capitalize()} step latency: fused vs off",
                targets(
                    (mean(STEP, f'phase="{phase}"', "fusion"), "mean fusion={{fusion}}"),
                    (quantile(0.5, STEP, f'phase="{phase}"', "le, fusion"), "p50 fusion={{fusion}}"),
                    (quantile(0.99, STEP, f'phase="{phase}"', "le, fusion"), "p99 fusion={{fusion}}"),
                ),
                "s",
                w=8,
                desc=f"Engine {phase} step wall time by the path that step ran. Same traffic under --fusion ab.",
                overrides=AB_COLORS,
            )
        )
    out.append(
        timeseries(
            lay,
            "Fused / off step latency ratio",
            targets((ratio("", "phase", RI), "{{phase}}")),
            "none",
            w=8,
            desc="Mean step latency fused / unfused per phase. 1.0 = no difference; below 1 = fused faster.",
            thresholdsStyle={"mode": "line"},
        )
    )
    out[-1]["fieldConfig"]["defaults"]["thresholds"] = {
        "mode": "absolute",
        "steps": [{"color": "transparent", "value": None}, {"color": "red", "value": 1.0}],
    }

    # ------------------------------------------------------------ per layer
    out.append(row(lay, "Per-layer latency (sampled every --layer-timing-every steps)"))
    heat_common = {
        "calculate": False,
        "cellGap": 1,
        "color": {"mode": "scheme", "scheme": "Spectral", "steps": 64, "reverse": True, "exponent": 0.5},
        "yAxis": {"axisPlacement": "left"},
        "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": True},
        "legend": {"show": True},
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
    }
    out.append(
        {
            "id": lay.id(),
            "type": "heatmap",
            "title": "Mean layer latency by layer ($part, $phase, fusion=$fusion)",
            "description": "One row per decoder layer; colour = mean latency of that layer's $part in the "
            "sampled steps. Set the fusion variable to on / off to compare.",
            "datasource": DS,
            "gridPos": lay.place(12, 10),
            "targets": [
                target(
                    mean(LAYER, LAYER_SEL + ',fusion=~"$fusion"', "layer"),
                    "{{layer}}",
                    format="time_series",
                )
            ],
            "fieldConfig": {"defaults": {"unit": "s"}, "overrides": []},
            "options": {
                **heat_common,
                "rowsFrame": {"layout": "unknown", "value": "layer"},
                "cellValues": {"unit": "s"},
                "yAxis": {"axisPlacement": "left", "axisLabel": "layer", "reverse": False},
            },
        }
    )
    out.append(
        {
            "id": lay.id(),
            "type": "heatmap",
            "title": "Layer latency distribution ($part, $phase, fusion=$fusion)",
            "description": "Histogram buckets of fusionserve_layer_latency_seconds over all layers.",
            "datasource": DS,
            "gridPos": lay.place(12, 10),
            "targets": [
                target(
                    f'sum by (le) (increase({LAYER}_bucket{{{LAYER_SEL},fusion=~"$fusion"}}[{RI}]))',
                    "{{le}}",
                    format="heatmap",
                )
            ],
            "fieldConfig": {"defaults": {"unit": "s"}, "overrides": []},
            "options": {
                **heat_common,
                "rowsFrame": {"layout": "le"},
                "yAxis": {"axisPlacement": "left", "unit": "s"},
            },
        }
    )
    out.append(
        {
            "id": lay.id(),
            "type": "barchart",
            "title": "Per-layer mean latency: fused vs off ($part, $phase, last 15 min)",
            "description": "Mean sampled latency of each layer's $part, by fusion path.",
            "datasource": DS,
            "gridPos": lay.place(16, 9),
            "targets": [
                target(
                    mean(LAYER, LAYER_SEL, "layer, fusion", "15m"),
                    "",
                    format="table",
                    instant=True,
                    range=False,
                )
            ],
            "transformations": [
                {
                    "id": "groupingToMatrix",
                    "options": {"columnField": "fusion", "rowField": "layer", "valueField": "Value"},
                },
                {
                    "id": "convertFieldType",
                    "options": {
                        "conversions": [{"targetField": "layer\\fusion", "destinationType": "number"}]
                    },
                },
                {"id": "sortBy", "options": {"sort": [{"field": "layer\\fusion"}]}},
                {"id": "organize", "options": {"renameByName": {"layer\\fusion": "layer"}}},
            ],
            "fieldConfig": {
                "defaults": {"unit": "s", "custom": {"fillOpacity": 80, "lineWidth": 0}},
                "overrides": [color("^on$", FUSED), color("^off$", UNFUSED)],
            },
            "options": {
                "xField": "layer",
                "orientation": "vertical",
                "groupWidth": 0.8,
                "barWidth": 0.9,
                "showValue": "never",
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi"},
            },
        }
    )
    out.append(
        timeseries(
            lay,
            "Mean layer latency by part and fusion ($phase)",
            targets((mean(LAYER, 'phase="$phase"', "part, fusion"), "{{part}} fusion={{fusion}}")),
            "s",
            w=8,
            h=9,
            desc="Averaged over all layers: where the deferred norm saves time (attn vs mlp halves).",
            overrides=AB_COLORS,
        )
    )

    # -------------------------------------------------------------- latency
    out.append(row(lay, "Request latency"))
    ttft = "fusionserve_time_to_first_token_seconds"
    itl = "fusionserve_inter_token_latency_seconds"
    e2e = "fusionserve_e2e_request_latency_seconds"
    q3 = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
    out.append(
        timeseries(
            lay,
            "Time to first token",
            targets(*[(quantile(q, ttft), name) for q, name in q3]),
            "s",
            w=8,
            desc="From request arrival to the first generated token (queueing + prefill).",
        )
    )
    out.append(
        timeseries(
            lay,
            "Inter-token latency",
            targets(*[(quantile(q, itl), name) for q, name in q3]),
            "s",
            w=8,
            desc="Time between consecutive tokens of one request.",
        )
    )
    out.append(
        timeseries(
            lay,
            "End-to-end request latency",
            targets(
                (quantile(0.5, e2e, "", "le, finish_reason"), "p50 {{finish_reason}}"),
                (quantile(0.99, e2e, "", "le, finish_reason"), "p99 {{finish_reason}}"),
            ),
            "s",
            w=8,
        )
    )

    # ----------------------------------------------------- throughput, load
    out.append(row(lay, "Throughput and load"))
    out.append(
        timeseries(
            lay,
            "Tokens / s",
            targets(
                (f"sum(rate(fusionserve_generation_tokens_total[{RI}]))", "generation"),
                (f"sum(rate(fusionserve_prompt_tokens_total[{RI}]))", "prompt"),
            ),
            "short",
            w=8,
            desc="Counted when requests finish.",
        )
    )
    out.append(
        timeseries(
            lay,
            "Requests / s by status",
            targets(
                (
                    f"sum by (endpoint, status) (rate(fusionserve_requests_total[{RI}]))",
                    "{{endpoint}} {{status}}",
                )
            ),
            "reqps",
            w=8,
        )
    )
    out.append(
        timeseries(
            lay,
            "Requests running / waiting",
            targets(
                ("sum(fusionserve_requests_running)", "running"),
                ("sum(fusionserve_requests_waiting)", "waiting"),
            ),
            "short",
            w=8,
        )
    )
    lay.newline()
    out.append(
        timeseries(
            lay,
            "KV cache usage",
            targets(("max(fusionserve_kv_cache_usage_ratio)", "used")),
            "percentunit",
            w=8,
            thresholdsStyle={"mode": "line"},
        )
    )
    out[-1]["fieldConfig"]["defaults"].update(
        {
            "min": 0,
            "max": 1,
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "transparent", "value": None}, {"color": "red", "value": 0.95}],
            },
        }
    )
    out.append(
        timeseries(
            lay,
            "Preemptions and aborts / s",
            targets(
                (f"sum(rate(fusionserve_preemptions_total[{RI}]))", "preemptions"),
                (f"sum(rate(fusionserve_aborts_total[{RI}]))", "aborts"),
            ),
            "ops",
            w=8,
        )
    )
    out.append(
        timeseries(
            lay,
            "Engine process CPU",
            targets((f"sum(rate(fusionserve_engine_process_cpu_seconds_total[{RI}]))", "cores")),
            "short",
            w=8,
            desc="CPU cores the engine process uses. Its loop is one thread: near 1.0 the host, not the "
            "GPU, sets the pace. (No series with --engine-core thread: see process_cpu_seconds_total.)",
            thresholdsStyle={"mode": "line"},
        )
    )
    out[-1]["fieldConfig"]["defaults"].update(
        {
            "min": 0,
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "transparent", "value": None}, {"color": "orange", "value": 0.9}],
            },
        }
    )
    out.append(
        timeseries(
            lay,
            "Fusion mode over time",
            targets(("max by (mode) (fusionserve_fusion_mode)", "{{mode}}")),
            "none",
            w=8,
            drawStyle="line",
            lineInterpolation="stepAfter",
            fillOpacity=30,
        )
    )
    return out


def variable_custom(name: str, label: str, values: list[str], default: str, multi=False) -> dict:
    return {
        "type": "custom",
        "name": name,
        "label": label,
        "query": ",".join(values),
        "current": {"selected": True, "text": default, "value": default},
        "options": [{"selected": v == default, "text": v, "value": v} for v in values],
        "multi": multi,
        "includeAll": False,
        "hide": 0,
    }


def dashboard() -> dict:
    return {
        "uid": "fusionserve",
        "title": "fusionserve",
        "description": "fusionserve: deferred-norm fusion A/B, per-layer latency, request latency, throughput.",
        "tags": ["fusionserve", "llm", "inference"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                {
                    "datasource": DS,
                    "enable": True,
                    "expr": "changes(fusionserve_fusion_mode[1m]) > 0 and fusionserve_fusion_mode == 1",
                    "iconColor": "purple",
                    "name": "Fusion mode switched",
                    "step": "15s",
                    "titleFormat": "fusion mode → {{mode}}",
                    "useValueForTime": False,
                },
            ]
        },
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Data source",
                    "query": "prometheus",
                    "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                },
                variable_custom("phase", "Phase", ["decode", "prefill"], "decode"),
                variable_custom("part", "Layer part", ["block", "attn", "mlp"], "block"),
                variable_custom("fusion", "Fusion path (heatmaps)", ["on", "off"], "on"),
            ]
        },
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
