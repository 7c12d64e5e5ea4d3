"""Real load: `transfer_many` from several threads at once, and batches beside single transfers.

    python bench/bench_load.py [--accounts 10000] [--transfers 24000] [--rounds 3] [--order palindrome|ascending]
                               [--json out.json]

A host with several workers, each sending batches of 1,000, is the case this holds.
Per round, on one ledger of `--accounts` accounts (uniform random pairs):
- the durable floor of the same run (`bench_engine.durable_floor`: one thread writing the
  same records to LMDB, one fsync per 1,000, and nothing else);
- `transfer_many` from 1, 2, 4 and 8 threads at once, `--transfers` in total, in batches of
  1,000: the total durable rate, and its ratio to the 1-thread rate of the same round;
- mixed load: 4 batch threads (`--transfers` in total) beside 16 threads calling
  `transfer` one at a time until the batches are done: the batches' rate against the
  4-thread rows of the same round, the single transfers' rate and their p99 latency.
Each figure is the median of `--rounds` rounds, with its range. Ratios are what to read.

A round runs its rows there and back, the floor, 1, 2, 4, 8 threads, the mixed row, then 8,
4, 2, 1 and the floor again (`--order palindrome`, the default), and a thread count's rate
(and the floor's) is that of its two rows together. The rows share one ledger that grows by
`--transfers` a row, and a later row costs more CPU than an early one for the same
instructions (a larger ledger's pages, a process that has run longer: `bench/README.md`);
run in one direction (`--order ascending`: 1, 2, 4, 8, mixed), the 8-thread row came out
~10% below where the same code put it with the rows in the reverse order (the fourth row was
slow whatever its threads). There
and back, each count and the mixed row sit at the same mean position in the round, so a
drift that moves steadily weighs on none of them more than on another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import TallyBench, collect_before_timing, durable_floor, workload, write_json  # noqa: E402

from engine import LedgerError, TransferRequest  # noqa: E402

BATCH = 1000
THREADS = (1, 2, 4, 8)
MIXED_BATCH_THREADS = 4
MIXED_SINGLE_THREADS = 16
JOIN_TIMEOUT_S = 600.0


def run_threads(count: int, work: Callable[[int], None]) -> float:
    """Run `work(n)` on `count` threads released together; the seconds until all are done."""
    barrier = threading.Barrier(count + 1)
    failures: list[BaseException] = []

    def body(n: int) -> None:
        barrier.wait(timeout=60)
        try:
            work(n)
        except BaseException as error:  # reported below: a bench that hides a failure lies
            failures.append(error)

    threads = [threading.Thread(target=body, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    collect_before_timing()
    barrier.wait(timeout=60)
    started = time.perf_counter()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} threads failed") from failures[0]
    return elapsed


class Load:
    def __init__(self, tally: TallyBench, accounts: int, transfers: int, seed: int) -> None:
        self.tally, self.accounts, self.transfers, self.seed = tally, accounts, transfers, seed
        self.tag = 0

    def _batches(self, threads: int) -> list[list[list[TransferRequest]]]:
        """Each thread's batches: `transfers` in all, fresh ids."""
        self.tag += 1
        names, tag = self.tally.names, self.tag
        work = workload(self.accounts, self.transfers, "uniform", self.seed + tag)
        requests = [TransferRequest(f"L{tag}-{k}", names[s], names[d], a) for k, (s, d, a) in enumerate(work)]
        batches = [requests[first : first + BATCH] for first in range(0, len(requests), BATCH)]
        return [batches[n::threads] for n in range(threads)]

    def many(self, threads: int) -> float:
        """Durable transfers/s of `threads` threads each calling `transfer_many` on its batches."""
        ledger, mine = self.tally.ledger, self._batches(threads)

        def work(n: int) -> None:
            for batch in mine[n]:
                ledger.transfer_many(batch)

        return self.transfers / run_threads(threads, work)

    def mixed(self) -> dict:
        """Batches from 4 threads beside 16 threads of single transfers."""
        ledger, names, mine = self.tally.ledger, self.tally.names, self._batches(MIXED_BATCH_THREADS)
        self.tag += 1
        tag = self.tag
        singles = workload(self.accounts, 200_000, "uniform", self.seed + tag)
        batches_done = threading.Event()
        latencies: list[list[float]] = [[] for _ in range(MIXED_SINGLE_THREADS)]
        batch_elapsed: list[float] = []

        def work(n: int) -> None:
            if n < MIXED_BATCH_THREADS:
                started = time.perf_counter()
                for batch in mine[n]:
                    ledger.transfer_many(batch)
                batch_elapsed.append(time.perf_counter() - started)
                if len(batch_elapsed) == MIXED_BATCH_THREADS:
                    batches_done.set()
                return
            n -= MIXED_BATCH_THREADS
            mine_latencies = latencies[n]
            for k in range(n, len(singles), MIXED_SINGLE_THREADS):
                if batches_done.is_set():
                    return
                source, destination, amount = singles[k]
                started = time.perf_counter()
                try:
                    ledger.transfer(f"S{tag}-{k}", source=names[source], destination=names[destination], amount=amount)
                except LedgerError:
                    pass
                mine_latencies.append(time.perf_counter() - started)

        elapsed = run_threads(MIXED_BATCH_THREADS + MIXED_SINGLE_THREADS, work)
        every = sorted(latency for part in latencies for latency in part)
        return {
            "batch_transfers_per_s": self.transfers / max(batch_elapsed),
            "single_transfers_per_s": len(every) / elapsed,
            "single_p50_ms": every[len(every) // 2] * 1000 if every else float("nan"),
            "single_p99_ms": every[int(len(every) * 0.99)] * 1000 if every else float("nan"),
        }


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def show(label: str, values: list[float], unit: str = "", digits: int = 0) -> None:
    s = summary(values)
    print(f"{label:38} {s['median']:>10,.{digits}f}{unit}  [{s['min']:,.{digits}f}-{s['max']:,.{digits}f}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--transfers", type=int, default=24_000, help="per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--order", choices=("palindrome", "ascending"), default="palindrome",
                        help="rows there and back (floor, 1, 2, 4, 8, mixed, 8, 4, 2, 1, floor; the default) or one way")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory(prefix="tally-bench-", dir=os.environ.get("TALLY_BENCH_DIR")) as scratch:
        print(f"setting up {args.accounts} accounts...", file=sys.stderr)
        tally = TallyBench(os.path.join(scratch, "tally"), args.accounts)
        load = Load(tally, args.accounts, args.transfers, args.seed)
        for number in range(1, args.rounds + 1):
            work = workload(args.accounts, args.transfers, "uniform", args.seed - number)
            floor = durable_floor(args.accounts, work, os.path.join(scratch, f"floor-{number}"))["transfers_per_s"]
            rates = {threads: load.many(threads) for threads in THREADS}
            mixed = load.mixed()
            if args.order == "palindrome":
                back = {threads: load.many(threads) for threads in reversed(THREADS)}
                # Each count's two rows together: `--transfers` each, so the rate of both is the
                # harmonic mean of theirs. The floor too, before the rows and after.
                rates = {threads: 2 / (1 / rate + 1 / back[threads]) for threads, rate in rates.items()}
                after = durable_floor(args.accounts, work, os.path.join(scratch, f"floor-{number}-after"))
                floor = 2 / (1 / floor + 1 / after["transfers_per_s"])
            add("floor", floor)
            for threads, rate in rates.items():
                add(f"many-{threads}", rate)
                add(f"many-{threads}/1", rate / rates[1])
            add("many-1/floor", rates[1] / floor)
            add("mixed-batches", mixed["batch_transfers_per_s"])
            add("mixed-batches/alone", mixed["batch_transfers_per_s"] / rates[MIXED_BATCH_THREADS])
            add("mixed-singles", mixed["single_transfers_per_s"])
            add("mixed-single-p50-ms", mixed["single_p50_ms"])
            add("mixed-single-p99-ms", mixed["single_p99_ms"])
            print(f"  round {number}: floor {floor:,.0f}/s, many " + ", ".join(
                f"{t}: {r:,.0f}/s" for t, r in rates.items()) + f", mixed {json.dumps(mixed)}", file=sys.stderr)
        stats = tally.ledger.stats()
        tally.ledger.close()
    print(f"\n{args.accounts:,} accounts, uniform pairs, batches of {BATCH:,}; median of {args.rounds} rounds [range]; "
          f"rows {'there and back' if args.order == 'palindrome' else 'one way'}")
    show("durable floor, transfers/s", rows["floor"])
    for threads in THREADS:
        show(f"transfer_many, {threads} thread(s), transfers/s", rows[f"many-{threads}"])
    for threads in THREADS[1:]:
        show(f"  {threads} threads / 1 thread", rows[f"many-{threads}/1"], digits=2)
    show("  1 thread / durable floor", rows["many-1/floor"], digits=2)
    show(f"mixed: batches ({MIXED_BATCH_THREADS} threads), transfers/s", rows["mixed-batches"])
    show("  batches mixed / alone", rows["mixed-batches/alone"], digits=2)
    show(f"mixed: singles ({MIXED_SINGLE_THREADS} threads), transfers/s", rows["mixed-singles"])
    show("  singles p50 latency", rows["mixed-single-p50-ms"], " ms", digits=1)
    show("  singles p99 latency", rows["mixed-single-p99-ms"], " ms", digits=1)
    result = {"accounts": args.accounts, "transfers": args.transfers, "rounds": args.rounds, "order": args.order,
              "rows": {key: summary(values) for key, values in rows.items()}, "ledger_stats": stats}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
