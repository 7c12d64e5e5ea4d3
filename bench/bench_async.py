"""`AsyncLedger` on one event loop against `Ledger` from client threads, side by side in one run.

    python bench/bench_async.py [--accounts 10000] [--transfers 20000] [--coroutines 1000]
                                [--threads 64] [--rounds 5] [--json out.json]
    python bench/bench_async.py --history-read [--rounds 5] [--json out.json]

Per round, on one ledger of `--accounts` funded accounts, the same seeded workload (uniform
random pairs, `bench_engine.workload`) is run twice, in alternating order:
- `--threads` client threads calling `Ledger.transfer` one at a time;
- `--coroutines` coroutines on one asyncio loop awaiting `AsyncLedger.transfer`, beside a
  loop-lag probe: a task that sleeps 1 ms in a loop and records how late it wakes, from
  the moment every coroutine has made its first request (starting a thousand tasks at once
  is one turn of the loop of ~15 ms, before the probe).
The coroutines run twice: as they are, and after `gc.freeze()` once the ledger is open, as
a host may do once started: a full collection otherwise walks every account the ledger
holds (~20 ms at 10,000 accounts) and stops the loop meanwhile. Each phase opens the
ledger afresh (`Ledger.open`, `AsyncLedger.open`) and waits, before its clock starts, until
the ids journaled by earlier rounds are loaded into the claims' filters (a warm-up thread
runs after every open; meanwhile it holds the interpreter too). Reported: durable
transfers/s and p50/p99 latency of each, the ratio async/threads (the issue's target: at
least 0.80), and the probe's lag p50/p99/max (target: p99 under 5 ms). Each figure is the
median of the rounds, with its range.

`--history-read`: big reads beside the loop instead. On a ledger of 2,000 accounts funded as
`bench_engine` funds them and 50,000 transfers more, per round: pages of 10,000 transfers
(`AsyncLedger.transfers(limit=10000)`) read one after another, alone beside the probe; then 50
coroutines transferring one at a time beside one coroutine reading such pages back to back.
Reported: the probe's lag p50/p99/max in each, the read's time, and the writes/s beside reads
(a read must not keep the loop, the decider or the writer out of the interpreter:
`journal._chunks`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import TallyBench, collect_before_timing, run_clients, transfer_call, workload, write_json  # noqa: E402

from engine import AsyncLedger, Ledger, LedgerError, TransferRequest  # noqa: E402

PROBE_SLEEP_S = 0.001


def threads_phase(path: str, names: list[str], work: list[tuple[int, int, int]], threads: int, prefix: str) -> dict:
    with Ledger.open(path) as ledger:
        assert ledger._coordinator.claims.wait_warm(120.0)  # the ids journaled by earlier rounds are loaded
        return run_clients(threads, work, transfer_call(ledger, names, prefix))


async def probe(until: asyncio.Event, lags: list[float]) -> None:
    """The loop-lag probe: sleep `PROBE_SLEEP_S` again and again until `until` is set, adding
    to `lags` how late each wake-up was."""
    loop = asyncio.get_running_loop()
    while not until.is_set():
        started = loop.time()
        await asyncio.sleep(PROBE_SLEEP_S)
        lags.append(loop.time() - started - PROBE_SLEEP_S)


def lag_figures(lags: list[float], prefix: str = "") -> dict:
    lags = sorted(lags)
    return {f"{prefix}lag_p50_ms": round(lags[len(lags) // 2] * 1000, 3),
            f"{prefix}lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1000, 3),
            f"{prefix}lag_max_ms": round(lags[-1] * 1000, 3)}


async def coroutines_phase(path: str, names: list[str], work: list[tuple[int, int, int]], coroutines: int,
                           prefix: str, freeze: bool = False) -> dict:
    async with AsyncLedger.open(path) as ledger:
        claims = ledger._ledger._coordinator.claims
        assert await asyncio.to_thread(claims.wait_warm, 120.0)  # as the threads' phase: the ids are loaded
        if freeze:  # as a host may do once it has started: what exists now is never collected again
            gc.collect()
            gc.freeze()
        latencies: list[float] = []
        lags: list[float] = []
        done = asyncio.Event()

        async def client(number: int) -> None:
            for k in range(number, len(work), coroutines):
                source, destination, amount = work[k]
                started = time.perf_counter()
                try:
                    await ledger.transfer(f"{prefix}-{k}", source=names[source], destination=names[destination],
                                          amount=amount)
                except LedgerError:
                    pass  # a refusal is an outcome too
                latencies.append(time.perf_counter() - started)

        collect_before_timing()
        started = time.perf_counter()
        clients = asyncio.gather(*(client(n) for n in range(coroutines)))
        await asyncio.sleep(0)  # every client has made its first request: the probe measures the run
        prober = asyncio.create_task(probe(done, lags))
        await clients
        elapsed = time.perf_counter() - started
        done.set()
        await prober
    if freeze:
        gc.unfreeze()
    latencies.sort()
    return {
        "transfers_per_s": round(len(work) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        **lag_figures(lags),
        "lag_samples": len(lags),
    }


HISTORY_TRANSFERS = 50_000
HISTORY_ACCOUNTS = 2_000
HISTORY_PAGE = 10_000
HISTORY_PAGES = 5
HISTORY_WRITERS = 50
HISTORY_WRITES_S = 3.0


async def history_phase(path: str, names: list[str], prefix: str) -> dict:
    """One round of `--history-read` (module docstring) on the ledger at `path`."""
    async with AsyncLedger.open(path) as ledger:
        claims = ledger._ledger._coordinator.claims
        assert await asyncio.to_thread(claims.wait_warm, 120.0)  # as the other phases: the ids are loaded
        lags: list[float] = []
        stop = asyncio.Event()
        collect_before_timing()
        prober = asyncio.create_task(probe(stop, lags))
        started = time.perf_counter()
        for _ in range(HISTORY_PAGES):
            assert len(await ledger.transfers(limit=HISTORY_PAGE)) == HISTORY_PAGE
        read_ms = (time.perf_counter() - started) * 1000 / HISTORY_PAGES
        stop.set()
        await prober
        figures = {"read_ms": round(read_ms, 1), **lag_figures(lags)}
        lags.clear()
        stop.clear()
        written = [0]

        async def writer(number: int) -> None:
            k = 0
            while not stop.is_set():
                await ledger.transfer(f"{prefix}-{number}-{k}", source="bank", destination=names[k % len(names)],
                                      amount=1)
                k += 1
                written[0] += 1

        async def reader() -> None:
            while not stop.is_set():
                await ledger.transfers(limit=HISTORY_PAGE)

        tasks = [asyncio.create_task(writer(n)) for n in range(HISTORY_WRITERS)] + [asyncio.create_task(reader())]
        prober = asyncio.create_task(probe(stop, lags))
        await asyncio.sleep(HISTORY_WRITES_S)
        stop.set()
        figures["writes_per_s"] = round(written[0] / HISTORY_WRITES_S, 1)
        await asyncio.gather(prober, *tasks)
        figures.update(lag_figures(lags, "beside_writes_"))
        return figures


def history_read(rounds: int) -> dict:
    base = os.environ.get("TALLY_BENCH_DIR") or None
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        path = os.path.join(scratch, "books")
        setup = TallyBench(path, HISTORY_ACCOUNTS)
        names = setup.names
        for start in range(0, HISTORY_TRANSFERS, HISTORY_PAGE):
            setup.ledger.transfer_many([TransferRequest(f"h-{n}", "bank", names[n % HISTORY_ACCOUNTS], 1)
                                        for n in range(start, start + HISTORY_PAGE)])
        setup.ledger.close()
        results = []
        for r in range(rounds):
            results.append(asyncio.run(history_phase(path, names, f"w{r}")))
            print(f"round {r + 1}: {results[-1]}", flush=True)
    print()
    print(f"pages of {HISTORY_PAGE:,} transfers read alone: {shown([f['read_ms'] for f in results])} ms a page; "
          f"loop lag ms p50 {shown([f['lag_p50_ms'] for f in results], 2)}, "
          f"p99 {shown([f['lag_p99_ms'] for f in results], 1)}, max {shown([f['lag_max_ms'] for f in results], 1)}")
    print(f"{HISTORY_WRITERS} writers beside a reader: {shown([f['writes_per_s'] for f in results])} transfers/s; "
          f"loop lag ms p50 {shown([f['beside_writes_lag_p50_ms'] for f in results], 2)}, "
          f"p99 {shown([f['beside_writes_lag_p99_ms'] for f in results], 1)}, "
          f"max {shown([f['beside_writes_lag_max_ms'] for f in results], 1)}")
    return {"rounds": results}


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def shown(values: list[float], digits: int = 0) -> str:
    s = summary(values)
    return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}-{s['max']:,.{digits}f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--transfers", type=int, default=20_000)
    parser.add_argument("--coroutines", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--history-read", action="store_true", help="big reads beside the loop (module docstring)")
    args = parser.parse_args()
    if args.history_read:
        write_json(args.json, {"args": vars(args), **history_read(args.rounds)})
        return 0
    base = os.environ.get("TALLY_BENCH_DIR") or None
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        path = os.path.join(scratch, "books")
        setup = TallyBench(path, args.accounts)
        names = setup.names
        setup.ledger.close()
        rounds = []
        for r in range(args.rounds):
            work = workload(args.accounts, args.transfers, "uniform", seed=r)
            phases = {}
            order = ("threads", "async", "frozen") if r % 2 == 0 else ("frozen", "async", "threads")
            for phase in order:
                if phase == "threads":
                    phases[phase] = threads_phase(path, names, work, args.threads, f"t{r}")
                else:
                    phases[phase] = asyncio.run(coroutines_phase(path, names, work, args.coroutines, f"{phase}{r}",
                                                                 freeze=phase == "frozen"))
            phases["ratio"] = round(phases["async"]["transfers_per_s"] / phases["threads"]["transfers_per_s"], 3)
            rounds.append(phases)
            print(f"round {r + 1}: threads {phases['threads']['transfers_per_s']:,.0f}/s, "
                  f"async {phases['async']['transfers_per_s']:,.0f}/s (ratio {phases['ratio']:.2f}), "
                  f"loop lag p99 {phases['async']['lag_p99_ms']:.2f} ms", flush=True)
    threads = [p["threads"] for p in rounds]
    coros = [p["async"] for p in rounds]
    frozen = [p["frozen"] for p in rounds]
    print()
    print(f"{'':34}{'transfers/s':>26}{'p50 ms':>20}{'p99 ms':>22}")
    print(f"{f'Ledger, {args.threads} threads':34}{shown([t['transfers_per_s'] for t in threads]):>26}"
          f"{shown([t['p50_ms'] for t in threads], 1):>20}{shown([t['p99_ms'] for t in threads], 1):>22}")
    print(f"{f'AsyncLedger, {args.coroutines} coroutines':34}{shown([c['transfers_per_s'] for c in coros]):>26}"
          f"{shown([c['p50_ms'] for c in coros], 1):>20}{shown([c['p99_ms'] for c in coros], 1):>22}")
    print(f"ratio async / threads (target >= 0.80): {shown([p['ratio'] for p in rounds], 2)}")
    for title, runs in (("loop lag, ms (target p99 < 5)", coros), ("the same after gc.freeze()", frozen)):
        print(f"{title + ':':32}p50 {shown([c['lag_p50_ms'] for c in runs], 3)}, "
              f"p99 {shown([c['lag_p99_ms'] for c in runs], 3)}, max {shown([c['lag_max_ms'] for c in runs], 3)}"
              f"  ({shown([c['transfers_per_s'] for c in runs])} transfers/s)")
    write_json(args.json, {"args": vars(args), "rounds": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
