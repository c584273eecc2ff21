"""Start-up time and memory of the server's HTTP process (and of its engine process), for several
ways of starting it, alternately, in one run.

    python bench/http_startup.py --label before --cmd "python -m server.cli serve" --cwd OLD_CHECKOUT \
        --label after --cmd "python -m fusionserve.server.api.cli serve" --model DIR --rounds 3

For each round: the time from spawning the command to the first 200 of /health, the HTTP
process's resident memory (VmRSS) and whether it has torch loaded (/proc/<pid>/maps), and the
engine child's RSS. Medians over the rounds; writes bench/results/http_startup_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, write_results  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def has_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def one_start(cmd: str, cwd: str | None, model: str, timeout: float) -> dict:
    port = free_port()
    argv = [*shlex.split(cmd), "--model", model, "--port", str(port), "--log-level", "warning"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        else:
            raise TimeoutError(f"{cmd} did not answer within {timeout}s")
        ready_s = time.perf_counter() - t0
        time.sleep(1.0)  # let the first scrape-free second settle
        engine = [c for c in children(proc.pid) if has_torch(c)]
        return dict(
            ready_s=ready_s,
            http_rss_mib=rss_mib(proc.pid),
            http_has_torch=has_torch(proc.pid),
            engine_rss_mib=rss_mib(engine[0]) if engine else float("nan"),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", action="append", required=True)
    ap.add_argument("--cmd", action="append", required=True)
    ap.add_argument("--cwd", action="append", default=[], help="per command, in order ('' for none)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    cwds = (args.cwd + [""] * len(args.cmd))[: len(args.cmd)]
    runs: dict[str, list[dict]] = {label: [] for label in args.label}
    for _ in range(args.rounds):  # alternating, so both see the same machine state
        for label, cmd, cwd in zip(args.label, args.cmd, cwds):
            runs[label].append(one_start(cmd, cwd or None, args.model, args.timeout))
            print(label, runs[label][-1], flush=True)
    rows = []
    for label, cmd in zip(args.label, args.cmd):
        r = runs[label]
        rows.append(
            [
                label,
                cmd,
                round(statistics.median(x["ready_s"] for x in r), 2),
                round(statistics.median(x["http_rss_mib"] for x in r)),
                "yes" if any(x["http_has_torch"] for x in r) else "no",
                round(statistics.median(x["engine_rss_mib"] for x in r)),
            ]
        )
    env = environment()
    table = (
        f"HTTP process start-up, {env.get('cpu') or os.uname().machine}, {os.cpu_count()} cores, "
        f"medians of {args.rounds} alternating rounds; model {Path(args.model).name} (already converted)\n\n"
        + markdown_table(
            [
                "build",
                "command",
                "spawn → /health 200 (s)",
                "HTTP process RSS (MiB)",
                "torch in HTTP process",
                "engine process RSS (MiB)",
            ],
            rows,
        )
    )
    write_results(f"http_startup{'_' + args.tag if args.tag else ''}", {"env": env, "runs": runs}, table)
    print(table)


if __name__ == "__main__":
    main()
