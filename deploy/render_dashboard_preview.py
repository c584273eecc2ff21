"""Render a static picture of the dashboard's main panels (docs/dashboard.png).

Two sources of data:

    # a running server: scrape /metrics every --interval seconds for --duration seconds
    python deploy/render_dashboard_preview.py --url http://127.0.0.1:8000/metrics --duration 300

    # no server: a ServerMetrics instance fed simulated A/B traffic (the committed preview)
    python deploy/render_dashboard_preview.py --simulate

Either way the plots are computed the way the Grafana dashboard computes them
(rates of _sum/_count between scrapes, histogram quantiles from bucket deltas),
from the Prometheus text exposition. Needs matplotlib (not a project dependency:
`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value


def parse(text: str) -> Snapshot:
    out: Snapshot = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape_server(url: str, duration: float, interval: float) -> list[tuple[float, Snapshot]]:
    snaps = []
    t0 = time.monotonic()
    while time.monotonic() - t0 <= duration:
        with urllib.request.urlopen(url, timeout=5) as r:
            snaps.append((time.monotonic() - t0, parse(r.read().decode())))
        time.sleep(interval)
    return snaps


def simulate(minutes: float = 30.0, interval: float = 15.0, seed: int = 0) -> list[tuple[float, Snapshot]]:
    """ServerMetrics fed plausible traffic for the 135M default model on one GPU.

    Fusion mode goes on -> off -> ab; the deferred norm saves ~8% of a decode step
    (docs/DESIGN.md, "The deferred-norm contract", puts the prize for the 135M model at about 10%).
    """
    from fusionserve.server.api.metrics import ServerMetrics

    rng = random.Random(seed)
    sm = ServerMetrics(model_name="SmolLM2-135M-Instruct")
    n_layers = 30
    layer_base = [62e-6 * (1.0 + 0.15 * math.sin(i / 4.0)) for i in range(n_layers)]
    snaps: list[tuple[float, Snapshot]] = []
    total = minutes * 60.0
    t = 0.0
    running = 0
    while t <= total:
        mode = "on" if t < total / 3 else ("off" if t < 2 * total / 3 else "ab")
        sm.set_fusion_mode(mode)
        load = 0.6 + 0.4 * math.sin(t / 300.0) ** 2  # slow traffic swell
        steps = int(interval / 0.0035 * load / 20)  # a twentieth of the steps: keeps this fast
        for k in range(steps):
            path = mode if mode != "ab" else ("on" if k % 2 == 0 else "off")
            slow = 1.0 if path == "off" else 0.92
            batch_factor = 1.0 + 0.25 * load
            sm.observe_step("decode", path, 3.2e-3 * slow * batch_factor * rng.lognormvariate(0, 0.06))
            if k % 8 == 0:
                sm.observe_step(
                    "prefill", path, 9e-3 * (0.97 if path == "on" else 1.0) * rng.lognormvariate(0, 0.25)
                )
            if k % 50 == 0:  # sampled per-layer timing
                for layer in range(n_layers):
                    base = layer_base[layer] * (0.9 if path == "on" else 1.0) * batch_factor
                    attn = base * 0.45 * rng.lognormvariate(0, 0.05)
                    mlp = base * 0.55 * rng.lognormvariate(0, 0.05)
                    sm.observe_layer(layer, "attn", "decode", path, attn)
                    sm.observe_layer(layer, "mlp", "decode", path, mlp)
                    sm.observe_layer(layer, "block", "decode", path, attn + mlp)
        requests = int(12 * load * interval / 15.0)
        for _ in range(requests):
            fused_share = {"on": 1.0, "off": 0.0, "ab": 0.5}[mode]
            itl = 3.4e-3 * (1.0 - 0.08 * fused_share) * (1.0 + 0.3 * load)
            gen = rng.randint(64, 384)
            prompt = rng.randint(40, 900)
            ttft = 0.004 + prompt * 1.1e-5 + rng.expovariate(1 / 0.01) * load
            sm.observe_ttft(ttft)
            for _ in range(gen // 16):
                sm.observe_itl(itl * rng.lognormvariate(0, 0.15))
            reason = "stop" if rng.random() < 0.8 else "length"
            sm.observe_request_done(reason, ttft + gen * itl, prompt, gen)
            sm.count_request("/v1/chat/completions", 200)
        if rng.random() < 0.2:
            sm.count_request("/v1/chat/completions", 400)
        if load > 0.95 and rng.random() < 0.3:
            sm.count_request("/v1/chat/completions", 503)
            sm.inc_preemptions(rng.randint(1, 3))
        if rng.random() < 0.1:
            sm.inc_aborts()
        running = max(0, min(64, int(24 * load + rng.gauss(0, 3))))
        sm.set_queue(running=running, waiting=max(0, int(rng.gauss(4 * (load - 0.8), 2))))
        sm.set_kv_usage(min(1.0, 0.25 + 0.6 * load * rng.uniform(0.9, 1.05)))
        body, _ = sm.render()
        snaps.append((t, parse(body.decode())))
        t += interval
    return snaps


# ------------------------------------------------------------------ PromQL-ish


def series(snap: Snapshot, name: str, **match: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        lab: v
        for (n, lab), v in snap.items()
        if n == name and all(dict(lab).get(k) == val for k, val in match.items())
    }


def total(snap: Snapshot, name: str, **match: str) -> float:
    return sum(series(snap, name, **match).values())


def delta(a: Snapshot, b: Snapshot, name: str, **match: str) -> float:
    return total(b, name, **match) - total(a, name, **match)


def mean_between(a: Snapshot, b: Snapshot, metric: str, **match: str) -> float:
    c = delta(a, b, metric + "_count", **match)
    return delta(a, b, metric + "_sum", **match) / c if c > 0 else float("nan")


def quantile_between(a: Snapshot, b: Snapshot, q: float, metric: str, **match: str) -> float:
    """histogram_quantile(q, sum by (le) (increase(metric_bucket[...]))) as Prometheus computes it."""
    acc: dict[float, float] = defaultdict(float)
    for lab, v in series(b, metric + "_bucket", **match).items():
        acc[float(dict(lab)["le"])] += v - series(a, metric + "_bucket", **match).get(lab, 0.0)
    les = sorted(acc)
    if not les or acc[les[-1]] <= 0:
        return float("nan")
    rank = q * acc[les[-1]]
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        if acc[le] >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(acc[le] - prev_c, 1e-12)
        prev_le, prev_c = le, acc[le]
    return les[-2] if len(les) > 1 else float("nan")


# --------------------------------------------------------------------- drawing


def render(snaps: list[tuple[float, Snapshot]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [t / 60.0 for t, _ in snaps[1:]]
    pairs = list(zip(snaps[:-1], snaps[1:], strict=False))
    STEP, LAYER = "fusionserve_step_latency_seconds", "fusionserve_layer_latency_seconds"
    fused, unfused = "#2ca02c", "#ff7f0e"

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.6), dpi=72)
    fig.suptitle(title, fontsize=12, fontweight="bold")

    ax = axes[0][0]
    for path, c in (("on", fused), ("off", unfused)):
        y = [mean_between(a, b, STEP, phase="decode", fusion=path) * 1e3 for (_, a), (_, b) in pairs]
        ax.plot(ts, y, color=c, lw=2, label=f"fusion={path}")
    ax.set_title("Decode step latency: fused vs off (mean)")
    ax.set_ylabel("ms")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[0][1]
    ratio = []
    for (_, a), (_, b) in pairs:
        on = mean_between(a, b, STEP, phase="decode", fusion="on")
        off = mean_between(a, b, STEP, phase="decode", fusion="off")
        ratio.append(on / off)
    # both paths in one window only under ab (or right at a switch): show the 5-window mean like the stat
    ax.plot(ts, ratio, color="#1f77b4", lw=2, marker="o", ms=3, label="decode")
    ax.axhline(1.0, color="red", lw=1, ls="--")
    ax.set_title("Fused / off step latency ratio (needs --fusion ab)")
    ax.set_ylim(0.8, 1.1)
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[0][2]
    first, last = snaps[0][1], snaps[-1][1]
    layers = sorted({int(dict(lab)["layer"]) for (n, lab) in last if n == LAYER + "_count"})
    width = 0.4
    for off_x, path, c in ((-width / 2, "on", fused), (width / 2, "off", unfused)):
        y = [
            mean_between(first, last, LAYER, layer=str(i), part="block", phase="decode", fusion=path) * 1e6
            for i in layers
        ]
        ax.bar([i + off_x for i in layers], y, width=width, color=c, label=f"fusion={path}")
    ax.set_title("Per-layer mean latency (block, decode)")
    ax.set_xlabel("layer")
    ax.set_ylabel("µs")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)

    ax = axes[1][0]
    grid = [
        [
            mean_between(a, b, LAYER, layer=str(i), part="block", phase="decode", fusion="on") * 1e6
            for (_, a), (_, b) in pairs
        ]
        for i in layers
    ]
    # a cell is empty (nan) while fusion was off: the heatmap shows the path selected
    im = ax.imshow(
        grid,
        aspect="auto",
        origin="lower",
        cmap="Spectral_r",
        extent=(ts[0], ts[-1], -0.5, len(layers) - 0.5),
        interpolation="nearest",
    )
    fig.colorbar(im, ax=ax, label="µs")
    ax.set_title("Mean latency by layer (block, decode, fused)")
    ax.set_ylabel("layer")
    ax.set_xlabel("minutes")

    ax = axes[1][1]
    for metric, name, ls in (
        ("fusionserve_time_to_first_token_seconds", "TTFT", "-"),
        ("fusionserve_inter_token_latency_seconds", "ITL", "--"),
    ):
        for q, c in ((0.5, "#1f77b4"), (0.99, "#d62728")):
            y = [quantile_between(a, b, q, metric) * 1e3 for (_, a), (_, b) in pairs]
            ax.plot(ts, y, ls=ls, color=c, lw=1.6, label=f"{name} p{int(q * 100)}")
    ax.set_yscale("log")
    ax.set_title("TTFT / inter-token latency quantiles")
    ax.set_ylabel("ms")
    ax.set_xlabel("minutes")
    ax.legend(loc="upper left", fontsize=8, ncol=2)

    ax = axes[1][2]
    dts = [b_t - a_t for (a_t, _), (b_t, _) in pairs]
    for name, label, c in (
        ("fusionserve_generation_tokens_total", "generation tok/s", "#9467bd"),
        ("fusionserve_prompt_tokens_total", "prompt tok/s", "#8c564b"),
    ):
        ax.plot(
            ts,
            [delta(a, b, name) / dt for ((_, a), (_, b)), dt in zip(pairs, dts, strict=True)],
            color=c,
            label=label,
        )
    ax.set_title("Throughput; KV cache usage")
    ax.set_ylabel("tokens / s")
    ax.set_xlabel("minutes")
    ax2 = ax.twinx()
    ax2.plot(
        ts, [total(b, "fusionserve_kv_cache_usage_ratio") for _, (_, b) in pairs], color="grey", lw=1, ls=":"
    )
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("KV usage")
    ax.legend(loc="upper left", fontsize=8)

    # mark the fusion mode phases on every time axis
    modes = [
        next(
            (dict(lab)["mode"] for (n, lab), v in s.items() if n == "fusionserve_fusion_mode" and v == 1), "?"
        )
        for _, s in snaps[1:]
    ]
    for ax in (axes[0][0], axes[0][1], axes[1][0], axes[1][1], axes[1][2]):
        start = 0
        for i in range(1, len(modes) + 1):
            if i == len(modes) or modes[i] != modes[start]:
                ax.axvspan(
                    ts[start],
                    ts[i - 1],
                    color={"on": fused, "off": unfused}.get(modes[start], "#aaaaaa"),
                    alpha=0.06,
                )
                if ax is axes[0][0]:
                    ax.text(
                        (ts[start] + ts[i - 1]) / 2,
                        0.02,
                        f"mode {modes[start]}",
                        transform=ax.get_xaxis_transform(),
                        ha="center",
                        fontsize=8,
                    )
                start = i
    for row in axes:
        for ax in row:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a server's /metrics URL, e.g. http://127.0.0.1:8000/metrics")
    src.add_argument("--simulate", action="store_true", help="feed ServerMetrics simulated traffic instead")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds to scrape (--url)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between scrapes (--url)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = ap.parse_args(argv)
    if args.simulate:
        snaps = simulate()
        title = "fusionserve dashboard PREVIEW: simulated traffic fed to ServerMetrics (illustration, not a measurement)"
    else:
        snaps = scrape_server(args.url, args.duration, args.interval)
        title = f"fusionserve: {args.url}, {len(snaps)} scrapes every {args.interval:g} s"
    if len(snaps) < 3:
        print("need at least 3 scrapes", file=sys.stderr)
        return 1
    render(snaps, args.out, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
