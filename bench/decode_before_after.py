"""Decode latency of two commits side by side: the JSON files `bench/decode.py` wrote for each
(run alternately in one device call, so both see the same GPU, clocks and temperature).

    python bench/decode_before_after.py --before DIR --after DIR --label-before 8da6fd0 --label-after HEAD --tag arch

Each side's rounds are reduced to the median per (model, batch, ctx) and path (fused / off); the
table gives both and the change (negative: faster after). Writes bench/results/decode_before_after_<tag>.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, write_results  # noqa: E402


def rounds(folder: Path) -> tuple[dict, dict[tuple, dict[str, list[float]]]]:
    """(the first run's env, {(model, batch, ctx): {"fused_ms": [...], "off_ms": [...]}}) over every round."""
    per_key: dict[tuple, dict[str, list[float]]] = {}
    env: dict = {}
    for path in sorted(folder.glob("decode_*.json")):
        payload = json.loads(path.read_text())
        env = env or payload.get("env", {})
        for r in payload["results"]:
            if r.get("engine", "fusionserve") != "fusionserve" or "fused_ms" not in r:
                continue
            key = (r["model"], r["batch"], r["ctx"])
            for path_name in ("fused_ms", "off_ms"):
                per_key.setdefault(key, {}).setdefault(path_name, []).append(r[path_name])
    return env, per_key


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, type=Path)
    ap.add_argument("--after", required=True, type=Path)
    ap.add_argument("--label-before", default="before")
    ap.add_argument("--label-after", default="after")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None, help="also write the table here (the device's $OUT)")
    args = ap.parse_args()
    env, before = rounds(args.before)
    _, after = rounds(args.after)
    rows, records = [], []
    for key in sorted(before.keys() & after.keys()):
        rec = dict(model=key[0], batch=key[1], ctx=key[2])
        row = list(key)
        for path_name in ("fused_ms", "off_ms"):
            b, a = statistics.median(before[key][path_name]), statistics.median(after[key][path_name])
            rec[path_name] = {"before": before[key][path_name], "after": after[key][path_name]}
            rec[path_name + "_change_pct"] = 100 * (a / b - 1)
            row += [f"{b:.4g}", f"{a:.4g}", f"{100 * (a / b - 1):+.1f}%"]
        records.append(rec)
        rows.append(row)
    n = len(next(iter(before.values()))["fused_ms"]) if before else 0
    title = (
        f"Decode step latency (ms), {args.label_before} vs {args.label_after}, {env.get('gpu')}, torch "
        f"{env.get('torch')}, triton {env.get('triton')}; bench/decode.py, CUDA-graph replay, random bf16 "
        f"weights; median of {n} alternating rounds per side, in one device call\n\n"
    )
    headers = ["model", "batch", "ctx"]
    for p in ("fused", "off"):
        headers += [f"{p} {args.label_before}", f"{p} {args.label_after}", f"{p} change"]
    table = title + markdown_table(headers, rows)
    write_results(
        f"decode_before_after{'_' + args.tag if args.tag else ''}",
        {"env": env, "rows": records},
        table,
        args.out,
    )
    print(table)


if __name__ == "__main__":
    main()
