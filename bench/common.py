"""Shared bits of the benchmarks: where results go and how tables are written."""

from __future__ import annotations

import json
import math
import platform
import random
import statistics
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import torch

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, table: str, out: str | None = None) -> Path:
    """bench/results/<name>.{json,md}, and a copy under `out` (the device machine's $OUT) when given."""
    for folder in [RESULTS] + ([Path(out)] if out else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
        (folder / f"{name}.md").write_text(table + "\n")
    return RESULTS / f"{name}.md"


def copy_bandwidth(nbytes: int = 1 << 31) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read + written (the roofline's ceiling)."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def random_token_prompts(
    vocab_size: int, special: set[int], n: int, input_len: int, seed: int
) -> list[list[int]]:
    """n prompts of exactly input_len random non-special token ids: no dataset download, same seed → same ids."""
    rng = random.Random(seed)
    pool = [i for i in range(vocab_size) if i not in special]
    return [[rng.choice(pool) for _ in range(input_len)] for _ in range(n)]
