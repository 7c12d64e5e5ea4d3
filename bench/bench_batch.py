"""Where a `transfer_many` batch spends its time, phase by phase, round after round.

    python bench/bench_batch.py [--accounts 10000] [--rounds 5] [--transfers 20000]

Opens a ledger like `bench_engine.py` does, then runs `--rounds` rounds of
`--transfers` transfers in batches of 1,000 into the same (growing) ledger. Per
round it prints the rate, the CPU each thread spent per transfer (the caller and
the journal writer, read from /proc), the caller's CPU per phase of the batch path
(`coordinator._lane`), the writer's staging CPU, the commit size, and the time
spent in garbage collection. The phases are timed by wrapping the functions with
`time.thread_time`, which adds about a microsecond per batch and per phase: read
the split, not the last digit. Linux only (per-thread CPU from /proc).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import TallyBench, workload  # noqa: E402

import coordinator._lane as lane  # noqa: E402
import journal._writer as writer  # noqa: E402
from engine import TransferRequest  # noqa: E402

PHASES = ("validate", "take", "claim", "decide", "give back", "settle")
spent: Counter[str] = Counter()
"""CPU seconds per phase (thread time of the thread that ran it), plus counters."""


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] += time.thread_time() - started

    return wrapper


def instrument() -> None:
    lane.check_transfer = timed("validate", lane.check_transfer)
    lane.take_turns = timed("take", lane.take_turns)
    lane.give_back_turns = timed("give back", lane.give_back_turns)
    lane.decide_all = timed("decide", lane.decide_all)
    lane.TurnBatch._claim = timed("claim", lane.TurnBatch._claim)  # type: ignore[method-assign]
    lane.TurnBatch._settle = timed("settle", lane.TurnBatch._settle)  # type: ignore[method-assign]
    writer.Writer._stage = timed("writer stage", writer.Writer._stage)  # type: ignore[method-assign]
    collecting: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting.append(time.perf_counter())
        elif collecting:
            spent["gc"] += time.perf_counter() - collecting.pop()

    gc.callbacks.append(on_gc)


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread, by name."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu[thread.name] = (int(fields[11]) + int(fields[12])) / ticks
    return cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transfers", type=int, default=20_000, help="per round")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tally-bench-", dir=os.environ.get("TALLY_BENCH_DIR")) as scratch:
        print(f"setting up {args.accounts} accounts...", file=sys.stderr)
        tally = TallyBench(os.path.join(scratch, "tally"), args.accounts)
        assert tally.ledger._coordinator.claims.wait_warm(60.0)
        instrument()
        names = tally.names
        print(f"{'round':>5} {'transfers/s':>11} | us of CPU per transfer: {'caller':>6} {'writer':>6} |"
              + "".join(f" {phase:>8}" for phase in PHASES) + f" | {'stage':>5} {'gc':>5} | records/commit")
        for number in range(1, args.rounds + 1):
            work = workload(args.accounts, args.transfers, "uniform", args.seed + number)
            requests = [TransferRequest(f"r{number}-{k}", names[s], names[d], a) for k, (s, d, a) in enumerate(work)]
            gc.collect()  # the collector's debt for the requests just built is not the round's (see bench_engine.py)
            spent.clear()
            commits_before = tally.ledger.stats()["commits"]
            cpu_before = thread_cpu_s()
            started = time.perf_counter()
            for first in range(0, len(requests), 1000):
                tally.ledger.transfer_many(requests[first : first + 1000])
            elapsed = time.perf_counter() - started
            cpu_after = thread_cpu_s()
            commits = tally.ledger.stats()["commits"] - commits_before
            count = len(requests)

            def per_transfer_us(seconds: float, count: int = count) -> str:
                return f"{seconds / count * 1e6:.1f}"

            caller = cpu_after["MainThread"] - cpu_before.get("MainThread", 0.0)
            journal = cpu_after["tally-journal-writer"] - cpu_before.get("tally-journal-writer", 0.0)
            print(f"{number:>5} {len(requests) / elapsed:>11,.0f} | {'':24}{per_transfer_us(caller):>6}"
                  f" {per_transfer_us(journal):>6} |"
                  + "".join(f" {per_transfer_us(spent[phase]):>8}" for phase in PHASES)
                  + f" | {per_transfer_us(spent['writer stage']):>5} {per_transfer_us(spent['gc']):>5} |"
                  f" {len(requests) / max(commits, 1):,.0f}")
        tally.ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
