"""`--report FILE.html|FILE.png`: throughput and latency over time, drawn with matplotlib."""

from __future__ import annotations

import html
import io
from typing import Any

from coordinator import InvalidRequest

from engine._stress import percentile


def write_report(samples: list[tuple[float, float]], summary: dict[str, Any], path: str) -> None:
    """Draw throughput/s and p50/p99 latency per second of the run into `path` (.html or .png)."""
    if not path.endswith((".html", ".png")):
        raise InvalidRequest(f"--report takes a .html or .png file name, got {path!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise InvalidRequest("--report needs matplotlib: pip install 'tally-ledger[report]'") from None
    seconds, rate, p50, p99 = _per_second(samples)
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(seconds, rate, color="tab:blue")
    top.set_ylabel("transfers / s")
    top.set_ylim(bottom=0)  # from zero: a dip of a tenth must not look like a stall
    top.set_title(f"tally stress: {summary['transfers_sent']:,} transfers, verdict {summary['verdict']}")
    bottom.plot(seconds, p50, label="p50", color="tab:green")
    bottom.plot(seconds, p99, label="p99", color="tab:red")
    bottom.set_ylabel("latency (ms)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds since start")
    bottom.legend()
    figure.tight_layout()
    if path.endswith(".png"):
        figure.savefig(path, dpi=100)
    else:
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg")
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in summary.items() if k != "config")
        with open(path, "w") as handle:
            handle.write(f"<!doctype html><meta charset=utf-8><title>tally stress</title>"
                         f"<body style='font-family:sans-serif'>{buffer.getvalue()}<table>{rows}</table></body>")
    pyplot.close(figure)


def _per_second(samples: list[tuple[float, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    buckets: dict[int, list[float]] = {}
    for at_s, latency_ms in samples:
        buckets.setdefault(int(at_s), []).append(latency_ms)
    seconds = sorted(buckets)
    end_s = max((at_s for at_s, _ in samples), default=0.0)
    rate: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    for second in seconds:
        values = sorted(buckets[second])
        width_s = min(1.0, max(0.05, end_s - second))  # the last second is usually partial
        rate.append(len(values) / width_s)
        p50.append(percentile(values, 0.5))
        p99.append(percentile(values, 0.99))
    return seconds, rate, p50, p99
