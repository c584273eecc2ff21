#!/usr/bin/env bash
# Serving benchmark on one GPU: fusionserve over its OpenAI API (bench/serve.py; fusion on vs off
# flipped through /admin/fusion; rate inf, then R req/s), then HF transformers' continuous batching
# (bench/hf_generate_batch.py) in its own process on the same random Llama-3.1-8B-shaped checkpoint.
#
#   bash bench/serve_gpu.sh          # on the device machine; results under $OUT
#
# Steps: install carried wheels (.whl_serve/*.whl → /tmp/site), make the checkpoint under /tmp
# (bench/make_random_checkpoint.py; kept if complete), start `python3 -m fusionserve.server.api.cli serve` in the
# background, wait for /health, warm both fusion paths, run the load per (rate, fusion) with a
# /metrics snapshot before and after each run (step latency by phase and path, server CPU time,
# preemptions) and nvidia-smi sampling, SIGTERM the server, run HF's generate_batch, then write
# $OUT/summary.md + summary.json (+ details.tgz with every raw file, server_log_tail.txt, run.log)
# and print the table last.
#
# The device image has no fastapi/uvicorn/pydantic: fetch cp312 wheels once, here, into the git-ignored
# .whl_serve (and carry it):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl_serve \
#     annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 certifi==2026.10.19.post1 click==8.5.1 fastapi==0.165.0 h11==0.16.0 httpcore==1.0.9 httpx==0.28.1 idna==3.20 opentelemetry-api==1.45.2 py-spy==0.4.3 pydantic==2.14.4 pydantic-core==2.50.5 sniffio==1.3.1 starlette==1.10.0 typing-extensions==4.16.0 typing-inspection==0.4.5 uvicorn==0.54.0
#
# Knobs (environment): N=500 IN=512 OUTLEN=128 RATES="inf 8" HF_N=256 (0: skip HF)
#   MODEL=/tmp/llama8b PRESET=llama-3.1-8b SEQS=256 MBT=8192 PORT=8000 SERVE_EXTRA=""
#   WHL=.whl_serve CACHE=.serve_cache (a triton_cache.tgz there is unpacked first) SAVE_TRITON=0
#   CLIENT_PROCS=4 (load-generator processes: one saturates near 16k SSE chunks/s)
#   RUN_TIMEOUT=200 HF_TIMEOUT=240 HEALTH_TIMEOUT=420
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/results/serve_gpu_local}
N=${N:-500} IN=${IN:-512} OUTLEN=${OUTLEN:-128} RATES=${RATES:-"inf 8"} HF_N=${HF_N:-256}
MODEL=${MODEL:-/tmp/llama8b} PRESET=${PRESET:-llama-3.1-8b} SEQS=${SEQS:-256} MBT=${MBT:-8192}
PORT=${PORT:-8000} KEY=${KEY:-k} SERVE_EXTRA=${SERVE_EXTRA:-}
WHL=${WHL:-.whl_serve} CACHE=${CACHE:-.serve_cache} SAVE_TRITON=${SAVE_TRITON:-0} CLIENT_PROCS=${CLIENT_PROCS:-4}
RUN_TIMEOUT=${RUN_TIMEOUT:-200} HF_TIMEOUT=${HF_TIMEOUT:-240} HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-420}
W=${W:-/tmp/serve_gpu}   # raw files; tarred into $OUT/details.tgz
URL=http://127.0.0.1:$PORT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
mkdir -p "$OUT" "$W"
rm -f "$W"/serve_*.json "$W"/serve_*.md "$W"/metrics_*.txt "$W"/marks.txt "$W"/hf.json
ulimit -n 65536 2>/dev/null || true

mark() { echo "$(date +%s.%N) $*" >>"$W/marks.txt"; echo "[$(date +%T)] $*"; }
http() {  # http METHOD PATH [JSON]: body to stdout, exit 1 on failure
    python3 - "$1" "$URL$2" "${3:-}" "$KEY" <<'EOF'
import sys, urllib.request as u
method, url, body, key = sys.argv[1:5]
req = u.Request(url, data=body.encode() if body else None, method=method,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
try:
    sys.stdout.write(u.urlopen(req, timeout=10).read().decode())
except Exception as exc:
    sys.stderr.write(f"{method} {url}: {exc}\n"); sys.exit(1)
EOF
}

main() {
    mark "begin"
    # -- environment ------------------------------------------------------------------------
    if ls "$WHL"/*.whl >/dev/null 2>&1; then
        if [ ! -f /tmp/site/.installed ]; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site "$WHL"/*.whl && touch /tmp/site/.installed || { echo "wheel install failed"; return 1; }
        fi
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [ -f "$CACHE/triton_cache.tgz" ] && [ ! -d "$TRITON_CACHE_DIR" ]; then
        mkdir -p "$TRITON_CACHE_DIR" && tar xzf "$CACHE/triton_cache.tgz" -C "$TRITON_CACHE_DIR" && echo "triton cache unpacked"
    fi
    python3 - <<'EOF' | tee "$W/env.json" || return 1
import json, platform, importlib.metadata as md
import torch
v = {p: md.version(p) for p in ("torch", "triton", "transformers", "fastapi", "uvicorn", "pydantic",
                                 "starlette", "httpx", "tokenizers", "safetensors", "prometheus-client")}
v["python"] = platform.python_version()
v["git_head"] = __import__("os").environ.get("GIT_HEAD", "unknown")
v["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(json.dumps(v))
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    df -h /tmp | tail -1; nproc; free -g | head -2

    # -- checkpoint -------------------------------------------------------------------------
    mark "checkpoint start"
    python3 bench/make_random_checkpoint.py "$MODEL" --preset "$PRESET" || return 1
    mark "checkpoint done"

    # -- server -----------------------------------------------------------------------------
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw \
            --format=csv,noheader,nounits -lms 500 >"$W/gpu.csv" 2>/dev/null &
        echo $! >"$W/gpumon.pid"
    fi
    mark "server launch"
    # shellcheck disable=SC2086
    python3 -m fusionserve.server.api.cli serve --model "$MODEL" --admin-key "$KEY" --max-num-seqs "$SEQS" \
        --max-num-batched-tokens "$MBT" --max-queue 4096 --port "$PORT" $SERVE_EXTRA >"$W/server.log" 2>&1 &
    SPID=$!
    echo "$SPID" >"$W/server.pid"
    local ok=0
    for _ in $(seq 1 "$HEALTH_TIMEOUT"); do
        if http GET /health >/dev/null 2>&1; then ok=1; break; fi
        kill -0 "$SPID" 2>/dev/null || break
        sleep 1
    done
    if [ "$ok" != 1 ]; then
        mark "server failed to start"; tail -n 60 "$W/server.log"; kill -TERM "$SPID" 2>/dev/null
        return 1
    fi
    mark "server healthy"
    grep -v "it/s\]$\|layer/s\]$" "$W/server.log" | tail -n 5

    # -- load -------------------------------------------------------------------------------
    local common=(--url "$URL" --input-len "$IN" --admin-key "$KEY" --model-dir "$MODEL" --timeout 300)
    mark "warmup start"  # compiles/warms both fusion paths' prefill, mixed and decode shapes
    timeout "$RUN_TIMEOUT" python3 bench/serve.py "${common[@]}" -n 32 --output-len 16 --rate inf \
        --fusion-compare --prompt-seed 100 --out-dir "$W/warm" --tag warmup >/dev/null 2>"$W/warmup.err" \
        || { echo "warmup failed:"; tail -n 20 "$W/warmup.err"; }
    mark "warmup done"
    local pseed=0
    for rate in $RATES; do
        local modes="on off"
        [ "$rate" != inf ] && modes="off on"  # ABBA across the two rates: drift hits both paths alike
        for mode in $modes; do
            http POST /admin/fusion "{\"mode\": \"$mode\"}" >/dev/null || return 1
            http GET /metrics >"$W/metrics_${rate}_${mode}_before.txt"
            pseed=$((pseed + 1))  # fresh prompts every run: no prefix-cache hits from an earlier run
            mark "run start rate=$rate fusion=$mode"
            if [ "$rate" = inf ] && [ "$mode" = off ] && [ -x /tmp/site/bin/py-spy ]; then
                # where the server's CPU time goes (both modes behave alike on the host side)
                (sleep 3; timeout 20 /tmp/site/bin/py-spy record --pid "$SPID" --duration 6 --rate 50 --nonblocking \
                    --threads --subprocesses --format raw --output "$W/pyspy_inf_off.txt" >"$W/pyspy.log" 2>&1) &
            fi
            timeout "$RUN_TIMEOUT" python3 bench/serve.py "${common[@]}" -n "$N" --output-len "$OUTLEN" \
                --rate "$rate" --prompt-seed "$pseed" --warmup-requests 0 --client-procs "$CLIENT_PROCS" --out-dir "$W" --tag "r${rate}_${mode}" \
                2>"$W/serve_r${rate}_${mode}.err" | tail -n 3
            echo "exit ${PIPESTATUS[0]}"
            mark "run end rate=$rate fusion=$mode"
            http GET /metrics >"$W/metrics_${rate}_${mode}_after.txt"
            grep -i "failed\|error\|Traceback" "$W/serve_r${rate}_${mode}.err" | head -n 5
        done
    done
    http GET /admin/fusion >"$W/fusion_summary.json"
    mark "server stop (SIGTERM)"
    kill -TERM "$SPID"
    for _ in $(seq 1 60); do kill -0 "$SPID" 2>/dev/null || break; sleep 1; done
    kill -0 "$SPID" 2>/dev/null && { echo "server still up after 60s: SIGKILL"; kill -KILL "$SPID"; }
    wait "$SPID"; echo "server exit status $?"
    rm -f "$W/server.pid"
    mark "server stopped"
    tail -n 40 "$W/server.log" | grep -v "it/s\]$" >"$OUT/server_log_tail.txt"

    # -- HF transformers continuous batching ------------------------------------------------
    if [ "$HF_N" -gt 0 ]; then
        mark "hf start"
        timeout "$HF_TIMEOUT" python3 bench/hf_generate_batch.py --model "$MODEL" -n "$HF_N" --input-len "$IN" \
            --output-len "$OUTLEN" --out "$W/hf.json" >"$W/hf.log" 2>&1
        echo "hf exit $?"
        grep -v "request/s\]$\|it/s\]$" "$W/hf.log" | tail -n 25
        mark "hf done"
    fi
    return 0
}

summarize() {
    SEQS="$SEQS" MBT="$MBT" SERVE_EXTRA="$SERVE_EXTRA" python3 - "$W" "$OUT" "$N" "$IN" "$OUTLEN" <<'EOF'
import glob, json, math, os, re, sys, time
from datetime import datetime
W, OUT, N, IN, OUTLEN = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])

def metrics(path):
    """Prometheus text → {(name, frozenset(labels)): value}."""
    out = {}
    if not os.path.isfile(path):
        return out
    for line in open(path):
        m = re.match(r'^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)', line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out

def delta(a, b, name, **want):
    return sum(v - a.get(k, 0.0) for k, v in b.items()
               if k[0] == name and all((lk, lv) in k[1] for lk, lv in want.items()))

def hist_q(a, b, name, q, **want):
    """Quantile of a histogram's increments (linear within the bucket)."""
    buckets = {}
    for k, v in b.items():
        if k[0] == name + "_bucket" and all((lk, lv) in k[1] for lk, lv in want.items()):
            le = dict(k[1])["le"]
            buckets[float("inf") if le == "+Inf" else float(le)] = v - a.get(k, 0.0)
    if not buckets:
        return math.nan
    les = sorted(buckets)
    total = buckets[les[-1]]
    if total <= 0:
        return math.nan
    target, prev_le, prev_c = q * total, 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= target:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (target - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c
    return math.nan

marks = []
if os.path.isfile(f"{W}/marks.txt"):
    for line in open(f"{W}/marks.txt"):
        t, msg = line.split(" ", 1)
        marks.append((float(t), msg.strip()))
def at(msg):
    return next((t for t, m in marks if m == msg), None)

gpu = []
if os.path.isfile(f"{W}/gpu.csv"):
    for line in open(f"{W}/gpu.csv"):
        parts = [p.strip() for p in line.split(",")]
        try:
            ts = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            gpu.append((ts, float(parts[1]), float(parts[2]), float(parts[3])))
        except (ValueError, IndexError):
            pass

env = json.load(open(f"{W}/env.json")) if os.path.isfile(f"{W}/env.json") else {}
runs = []
for path in sorted(glob.glob(f"{W}/serve_r*.json")):
    d = json.load(open(path))
    tag = re.match(r".*serve_r(.+?)_(on|off)_", path)
    rate, mode = tag.group(1), tag.group(2)
    r = dict(d["runs"][0]); r["rate"], r["fusion"] = rate, mode
    a, b = metrics(f"{W}/metrics_{rate}_{mode}_before.txt"), metrics(f"{W}/metrics_{rate}_{mode}_after.txt")
    step = "fusionserve_step_latency_seconds"
    srv = {}
    for phase in ("prefill", "decode"):
        n = delta(a, b, step + "_count", phase=phase, fusion=mode)
        s = delta(a, b, step + "_sum", phase=phase, fusion=mode)
        srv[phase] = {"steps": int(n), "sum_s": round(s, 3), "mean_ms": 1e3 * s / n if n else math.nan,
                      "p50_ms": 1e3 * hist_q(a, b, step, 0.5, phase=phase, fusion=mode),
                      "p90_ms": 1e3 * hist_q(a, b, step, 0.9, phase=phase, fusion=mode)}
    steps = srv["prefill"]["steps"] + srv["decode"]["steps"]
    busy = srv["prefill"]["sum_s"] + srv["decode"]["sum_s"]
    srv["gen_tokens"] = delta(a, b, "fusionserve_generation_tokens_total")
    srv["prompt_tokens"] = delta(a, b, "fusionserve_prompt_tokens_total")
    srv["preemptions"] = delta(a, b, "fusionserve_preemptions_total")
    srv["http_cpu_s"] = delta(a, b, "process_cpu_seconds_total")
    srv["engine_cpu_s"] = delta(a, b, "fusionserve_engine_process_cpu_seconds_total")  # 0: engine thread
    srv["cpu_s"] = srv["http_cpu_s"] + srv["engine_cpu_s"]
    dur = r["duration_s"]
    srv["cpu_cores"] = srv["cpu_s"] / dur if dur else math.nan
    srv["in_step_frac"] = busy / dur if dur else math.nan
    srv["outside_step_ms_per_step"] = 1e3 * (dur - busy) / steps if steps else math.nan
    srv["tokens_per_step"] = srv["gen_tokens"] / steps if steps else math.nan
    t0, t1 = at(f"run start rate={rate} fusion={mode}"), at(f"run end rate={rate} fusion={mode}")
    util = [g[1] for g in gpu if t0 and t1 and t0 <= g[0] <= t1]
    srv["gpu_util_mean"] = sum(util) / len(util) if util else math.nan
    srv["gpu_power_mean_w"] = (sum(g[3] for g in gpu if t0 and t1 and t0 <= g[0] <= t1) / len(util)) if util else math.nan
    r["server"] = srv
    runs.append(r)

hf = json.load(open(f"{W}/hf.json")) if os.path.isfile(f"{W}/hf.json") else None
phases = {}
for a_, b_, key in (("checkpoint start", "checkpoint done", "checkpoint_s"), ("server launch", "server healthy", "server_startup_s"),
                    ("hf start", "hf done", "hf_total_s"), ("begin", "server stopped", "serve_part_s")):
    if at(a_) and at(b_):
        phases[key] = round(at(b_) - at(a_), 1)

def fmt(x, p=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{p}f}"

order = {"inf": 0}
runs.sort(key=lambda r: (order.get(r["rate"], 1), r["fusion"] != "on"))
lines = [f"# Serving benchmark: fusionserve vs HF generate_batch, {env.get('gpu', '?')}", "",
         f"Llama-3.1-8B shape, random bf16 weights; {N} requests x {IN} in / {OUTLEN} out (ignore_eos, greedy), "
         f"max-num-seqs {os.environ['SEQS']}, max-num-batched-tokens {os.environ['MBT']}, server options '{os.environ['SERVE_EXTRA']}'; torch {env.get('torch')}, triton {env.get('triton')}, "
         f"transformers {env.get('transformers')}, python {env.get('python')}. Phases (s): {phases}", "",
         "| rate | fusion | ok/fail | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | prefill steps (mean ms) | decode steps (mean/p50 ms) | tok/step | in-step % | outside step ms/step | server CPU cores (engine) | client CPU cores | GPU util % | preempt |",
         "|" + "---|" * 18]
for r in runs:
    s = r["server"]
    lines.append(f"| {r['rate']} | {r['fusion']} | {r['completed']}/{r['failed']} | {r['req_per_s']:.2f} | {r['output_tok_per_s']:.0f} "
                 f"| {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} | {fmt(r['itl_p50_ms'])} | {fmt(r['itl_p99_ms'])} "
                 f"| {s['prefill']['steps']} ({fmt(s['prefill']['mean_ms'])}) | {s['decode']['steps']} ({fmt(s['decode']['mean_ms'])}/{fmt(s['decode']['p50_ms'])}) "
                 f"| {fmt(s['tokens_per_step'])} | {fmt(100 * s['in_step_frac'], 0)} | {fmt(s['outside_step_ms_per_step'], 2)} "
                 f"| {fmt(s['cpu_cores'], 2)} ({fmt(s['engine_cpu_s'] / r['duration_s'], 2)}) | {fmt(r.get('client_cpu_cores'), 2)} "
                 f"| {fmt(s['gpu_util_mean'], 0)} | {int(s['preemptions'])} |")
lines.append("")
if hf:
    h = hf["summary"]
    lines.append(f"HF {hf['meta']['engine']}: {h['completed']}/{h['requests']} requests x {IN}/{OUTLEN}, "
                 f"{h['output_tok_per_s']:.0f} output tok/s over the requests' span ({h['span_s']} s; "
                 f"{h['output_tok_per_s_wall']:.0f} over the whole call incl. warm-up, {h['wall_s']} s), "
                 f"TTFT p50 {fmt(h['ttft_p50_ms'])} ms, ITL p50 {fmt(h['itl_p50_ms'])} ms, load {hf['meta']['load_s']} s.")
else:
    lines.append("HF generate_batch: no result (see details.tgz hf.log).")
best = {}
for r in runs:
    best.setdefault(r["rate"], {})[r["fusion"]] = r
goals = []
inf_runs = best.get("inf", {})
if inf_runs:
    on = inf_runs.get("on") or next(iter(inf_runs.values()))
    goals.append(f"rate inf, fusion on: {on['output_tok_per_s']:.0f} output tok/s (goal >= 6000: {'met' if on['output_tok_per_s'] >= 6000 else 'MISSED'})")
    if hf and hf["summary"]["output_tok_per_s"] > 0:
        goals.append(f"vs HF generate_batch: {on['output_tok_per_s'] / hf['summary']['output_tok_per_s']:.1f}x (goal >= 12x)")
    if {"on", "off"} <= inf_runs.keys():
        goals.append(f"fused/off output tok/s at rate inf: {inf_runs['on']['output_tok_per_s'] / inf_runs['off']['output_tok_per_s']:.3f}")
for rate, rr in best.items():
    if rate == "inf":
        continue
    on = rr.get("on") or next(iter(rr.values()))
    goals.append(f"rate {rate}, fusion on: TTFT p50 {on['ttft_p50_ms']:.1f} ms (goal <= 50: {'met' if on['ttft_p50_ms'] <= 50 else 'MISSED'}), "
                 f"ITL p50 {on['itl_p50_ms']:.1f} ms (goal <= 15: {'met' if on['itl_p50_ms'] <= 15 else 'MISSED'})")
lines += ["", "Goals:"] + [f"- {g}" for g in goals]
lines += ["", "Columns: prefill steps = steps with any prompt chunk (mixed with decodes), decode = decode-only (CUDA graphs; "
          "every 50th per path is an eager timed step, not counted); tok/step = generated tokens / steps; in-step % = time "
          "inside engine.step() (prepare + forward + sample + sync) / run wall time; outside step = the rest per step "
          "(token bookkeeping, detokenize, HTTP streaming, GIL); server CPU cores = CPU seconds / wall of the HTTP "
          "process + the engine process (in brackets; from /metrics); client CPU cores = the load generator's; GPU util = nvidia-smi utilization.gpu mean over the run."]
prof = {}
if os.path.isfile(f"{W}/pyspy_inf_off.txt"):
    threads, incl, leaf, total = {}, {}, {}, 0
    for line in open(f"{W}/pyspy_inf_off.txt"):
        stack, _, n = line.rstrip().rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = [re.sub(r" \((?:.*/)?([^/]+?):\d+\)$", r" (\1)", f) for f in stack.split(";")[1:]]
        kind = ("engine thread" if any("EngineCore.run (core.py)" in f for f in frames) else
                "engine process pipe" if any("ProcessEngineClient._read" in f for f in frames) else
                "asyncio/HTTP thread" if any("asyncio" in f or "uvicorn" in f or "base_events" in f for f in frames)
                else "other")
        threads[kind] = threads.get(kind, 0) + n
        total += n
        for f in set(frames):
            incl[(kind, f)] = incl.get((kind, f), 0) + n
        if frames:
            leaf[(kind, frames[-1])] = leaf.get((kind, frames[-1]), 0) + n
    prof = {"samples": total, "threads": threads,
            "inclusive": sorted(([k[0], k[1], v] for k, v in incl.items()), key=lambda x: -x[2])[:80],
            "leaf": sorted(([k[0], k[1], v] for k, v in leaf.items()), key=lambda x: -x[2])[:20]}
    if total:
        lines += ["", f"Server CPU profile (py-spy, 50 Hz, 6 s inside the rate-inf fusion-off run; {total} samples, "
                  "a sample = a thread on CPU): " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in threads.items()), "",
                  "| thread | function (inclusive) | % of samples |", "|---|---|---|"]
        skip = ("(threading.py)", "runpy>)", "(base_events.py)", "(runners.py)", "(cli.py)", "(_contextlib.py)",
                "(events.py)", "run_serve (serve.py)", "Server.run (server.py)", "<module> (<string>)",
                "EngineCore.run (core.py)", "core_main (core.py)", "(process.py)", "(spawn.py)")
        shown = 0
        for kind, f, v in prof["inclusive"]:
            if f.endswith(skip) or f.startswith(("process ", "thread (", " spawn_main")) or 100 * v / total < 2:
                continue
            lines.append(f"| {kind} | {f} | {100 * v / total:.0f} |")
            shown += 1
            if shown >= 16:
                break
        lines += ["", "| thread | innermost Python frame (self) | % of samples |", "|---|---|---|"]
        lines += [f"| {k} | {f} | {100 * v / total:.0f} |" for k, f, v in prof["leaf"][:10]]
md = "\n".join(lines) + "\n"
payload = {"env": env, "phases_s": phases, "spec": {"n": N, "input_len": IN, "output_len": OUTLEN},
           "runs": runs, "hf": hf, "goals": goals, "marks": marks, "pyspy": prof}
open(f"{OUT}/summary.md", "w").write(md)
open(f"{OUT}/summary.json", "w").write(json.dumps(payload, indent=2, default=str) + "\n")
print(md)
EOF
}

main 2>&1 | tee "$OUT/run.log"
status=${PIPESTATUS[0]}
for f in server.pid gpumon.pid; do  # whatever main left running (an early return)
    [ -f "$W/$f" ] && kill -0 "$(cat "$W/$f")" 2>/dev/null && kill -KILL "$(cat "$W/$f")"
    rm -f "$W/$f"
done
summarize 2>&1 | tee -a "$OUT/run.log" >"$W/summary.out"
if [ "$SAVE_TRITON" = 1 ] && [ -d "$TRITON_CACHE_DIR" ]; then
    tar czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" . && ls -la "$OUT/triton_cache.tgz"
fi
tar czf "$OUT/details.tgz" -C "$W" --exclude=warm . 2>/dev/null
ls -la "$OUT"
echo "main exit status $status"
cat "$W/summary.out"
exit "$status"
