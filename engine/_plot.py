"""`--report FILE.html|FILE.png`: throughput and latency over time, drawn with matplotlib."""

from __future__ import annotations

import html
import io
from typing import Any

from coordinator import InvalidRequest

from engine._sending import SAMPLES_MAX
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
    marker = "o" if len(seconds) < 20 else None  # a run shorter than 0.2 s is a few slices: each one seen
    top.plot(seconds, rate, color="tab:blue", marker=marker)
    top.set_ylabel("transfers / s")
    top.set_ylim(bottom=0)  # from zero: a dip of a tenth must not look like a stall
    top.set_title(f"tally stress: {summary['transfers_sent']:,} transfers, verdict {summary['verdict']}")
    bottom.plot(seconds, p50, label="p50", color="tab:green", marker=marker)
    bottom.plot(seconds, p99, label="p99", color="tab:red", marker=marker)
    bottom.set_ylabel("latency (ms)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds since start")
    bottom.legend()
    note = _missing(samples, summary)
    if note:
        top.text(0.5, 0.5, note, transform=top.transAxes, ha="center", va="center", wrap=True,
                 bbox={"facecolor": "white", "edgecolor": "tab:gray"})
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


def _missing(samples: list[tuple[float, float]], summary: dict[str, Any]) -> str | None:
    """What the plot cannot show, said on it: no samples (a --chaos run times its rounds, not
    its transfers), or samples that stop before the run did (each client keeps its first
    `SAMPLES_MAX`)."""
    if not samples:
        return "no latency samples: this run timed no transfer one by one (a --chaos run times its rounds)"
    end_s, elapsed_s = samples[-1][0], float(summary.get("elapsed_s") or 0.0)
    if elapsed_s - end_s > 1.0:
        return (f"samples end at {end_s:.1f} s of {elapsed_s:.1f} s (each client keeps its first {SAMPLES_MAX:,}, and "
                "requests no server answered have none); the figures printed cover the whole run")
    return None


def _per_second(samples: list[tuple[float, float]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Throughput and p50/p99 latency per slice of the run: a second, or for a run shorter than
    20 s a twentieth of it (at least 10 ms), so a short run is a line too, not one point."""
    end_s = max((at_s for at_s, _ in samples), default=0.0)
    slice_s = 1.0 if end_s >= 20 else max(0.01, end_s / 20)
    full = int(end_s / slice_s + 1e-9)  # whole slices before the end
    last = full - 1 if full and end_s - full * slice_s < slice_s / 2 else full  # a short tail joins the slice before
    buckets: dict[int, list[float]] = {}
    for at_s, latency_ms in samples:
        buckets.setdefault(min(int(at_s / slice_s), last), []).append(latency_ms)
    starts: list[float] = []
    rate: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    for index in sorted(buckets):
        values = sorted(buckets[index])
        start_s = index * slice_s
        width_s = slice_s if index < last else max(slice_s / 2, end_s - start_s)  # the last: to the end
        starts.append(start_s)
        rate.append(len(values) / width_s)
        p50.append(percentile(values, 0.5))
        p99.append(percentile(values, 0.99))
    return starts, rate, p50, p99
