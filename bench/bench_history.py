"""Reading history: how long a point-in-time read, a snapshot and a page of transfers take.

    python bench/bench_history.py [--accounts 1000] [--transfers 200000] [--reads 2000] [--json out.json]

One ledger of `--accounts` funded accounts and `--transfers` random transfers (one in twenty
a pending transfer, half of those posted and half voided), made with `transfer_many`. Then,
one thread, each read `--reads` times at random accounts and LSNs, timed one by one:
- `balance now`: `ledger.balance(account)` (the account's actor), for comparison;
- `balance at_lsn`: `ledger.balance(account, at_lsn=...)`;
- `balance at_timestamp`: the same, by a timestamp (bisects the journal first);
- `snapshot + 100 balances`: `ledger.snapshot()` and `.balances()` of 100 accounts;
- `transfers(account), 100`: a page of an account's transfers from a random LSN;
- `transfers(), 100`: a page of all transfers from a random LSN (reads the journal).
Each reported as p50 and p99 in microseconds. The same reads run again after reopening,
when every entry is in the index (a reopen replays the tail past the newest checkpoint into
memory: both halves of the read path are measured).

    python bench/bench_history.py --beside-writes [--rounds 5] [--json out.json]

Long reads beside writes: `--accounts` accounts, `--transfers` transfers; each round, a page
of 10,000 transfers (`ledger.transfers(limit=10000)`) read alone (ms), then 16 threads of
single transfers for 3 s alone, then the same beside one thread reading such pages back to
back: writes/s and their p99 each time, and the pages read meanwhile. Median [range] of the
rounds.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import write_json  # noqa: E402
from engine import Ledger, Transfer, TransferRequest  # noqa: E402

BATCH = 1000


def build(ledger: Ledger, accounts: int, transfers: int, seed: int) -> list[Transfer]:
    rng = random.Random(seed)
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    names = [f"acct-{i}" for i in range(accounts)]
    for name in names:
        ledger.create_account(name, currency="USD", overdraft_limit=None)
    made: list[Transfer] = []
    for first in range(0, transfers, BATCH):
        requests = [TransferRequest(f"t{first + i}", *rng.sample(names, 2), rng.randint(1, 1000),
                                    pending=rng.random() < 0.05) for i in range(min(BATCH, transfers - first))]
        made += [t for t in ledger.transfer_many(requests) if isinstance(t, Transfer)]
    for step, pending in enumerate(t for t in made if t.kind == "pending"):
        if step % 2:
            ledger.post_pending(f"post-{pending.id}", pending_id=pending.id)
        else:
            ledger.void_pending(f"void-{pending.id}", pending_id=pending.id)
    return made


def timed(reads: int, read: Callable[[random.Random], object], seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    took: list[float] = []
    for _ in range(reads):
        start = time.perf_counter()
        read(rng)
        took.append((time.perf_counter() - start) * 1e6)
    took.sort()
    return {"p50_us": round(statistics.median(took), 1), "p99_us": round(took[int(len(took) * 0.99)], 1)}


def measure(ledger: Ledger, accounts: int, made: list[Transfer], reads: int) -> dict[str, dict[str, float]]:
    names = [f"acct-{i}" for i in range(accounts)]
    end = ledger.stats()["durable_lsn"]
    first = made[0].lsn
    stamps = [t.timestamp for t in made]

    def snapshot_balances(rng: random.Random) -> object:
        with ledger.snapshot() as snapshot:
            return snapshot.balances(rng.sample(names, 100))

    cases: dict[str, Callable[[random.Random], object]] = {
        "balance now": lambda rng: ledger.balance(rng.choice(names)),
        "balance at_lsn": lambda rng: ledger.balance(rng.choice(names), at_lsn=rng.randint(first, end)),
        "balance at_timestamp": lambda rng: ledger.balance(rng.choice(names), at_timestamp=rng.choice(stamps)),
        "snapshot + 100 balances": snapshot_balances,
        "transfers(account), 100": lambda rng: ledger.transfers(account=rng.choice(names),
                                                                after_lsn=rng.randint(0, end), limit=100),
        "transfers(), 100": lambda rng: ledger.transfers(after_lsn=rng.randint(0, end), limit=100),
    }
    return {name: timed(reads if "snapshot" not in name else max(1, reads // 10), read, seed=i)
            for i, (name, read) in enumerate(cases.items())}


WRITERS = 16
WRITE_S = 3.0
PAGE = 10_000


def writes_beside(ledger: Ledger, names: list[str], tag: str, reading: bool) -> dict[str, float]:
    """`WRITERS` threads of single transfers for `WRITE_S`, beside a thread reading pages of
    `PAGE` transfers back to back if `reading`: writes/s, their p99 (ms), pages read."""
    stop = threading.Event()
    latencies: list[float] = []
    pages = [0]

    def write(n: int) -> None:
        rng, mine, k = random.Random(n), [], 0
        while not stop.is_set():
            source, destination = rng.sample(names, 2)
            started = time.perf_counter()
            ledger.transfer(f"{tag}-{n}-{k}", source=source, destination=destination, amount=1)
            mine.append(time.perf_counter() - started)
            k += 1
        latencies.extend(mine)

    def read() -> None:
        while not stop.is_set():
            ledger.transfers(limit=PAGE)
            pages[0] += 1

    threads = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
    threads += [threading.Thread(target=read)] if reading else []
    for thread in threads:
        thread.start()
    time.sleep(WRITE_S)
    stop.set()
    for thread in threads:
        thread.join(600)
    latencies.sort()
    return {"writes_per_s": len(latencies) / WRITE_S, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "pages": pages[0]}


def beside_writes(args: argparse.Namespace) -> None:
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TALLY_BENCH_DIR")) as directory:
        with Ledger.open(os.path.join(directory, "ledger")) as ledger:
            build(ledger, args.accounts, args.transfers, args.seed)
            names = [f"acct-{n}" for n in range(args.accounts)]
            for round_ in range(args.rounds):
                started = time.perf_counter()
                ledger.transfers(limit=PAGE)
                rows.setdefault("page of 10,000 read alone, ms", []).append((time.perf_counter() - started) * 1000)
                for reading in (False, True):
                    got = writes_beside(ledger, names, f"w{round_}{reading:d}", reading)
                    label = "beside a reader" if reading else "alone"
                    rows.setdefault(f"writes/s, {label}", []).append(got["writes_per_s"])
                    rows.setdefault(f"writes p99 ms, {label}", []).append(got["p99_ms"])
                    if reading:
                        rows.setdefault("pages read beside the writes", []).append(got["pages"])
    print(f"{args.accounts} accounts, {args.transfers} transfers; {WRITERS} threads of single transfers, "
          f"{WRITE_S:.0f} s a row, {args.rounds} rounds: median [range]")
    for name, values in rows.items():
        print(f"{name:<34} {statistics.median(values):>10,.1f} [{min(values):,.1f}-{max(values):,.1f}]")
    if args.json:
        write_json(args.json, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--transfers", type=int, default=200_000)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--beside-writes", action="store_true", help="long reads beside writes (see above)")
    parser.add_argument("--rounds", type=int, default=5, help="with --beside-writes")
    args = parser.parse_args()
    if args.beside_writes:
        beside_writes(args)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TALLY_BENCH_DIR")) as directory:
        path = os.path.join(directory, "ledger")
        with Ledger.open(path) as ledger:
            started = time.perf_counter()
            made = build(ledger, args.accounts, args.transfers, args.seed)
            built_s = time.perf_counter() - started
            live = measure(ledger, args.accounts, made, args.reads)
            lsns = ledger.stats()["durable_lsn"]
        with Ledger.open(path) as ledger:
            reopened = measure(ledger, args.accounts, made, args.reads)
    print(f"{args.accounts} accounts, {len(made)} transfers, {lsns} records (built in {built_s:.1f} s); "
          f"{args.reads} reads each, one thread")
    print(f"{'read':<26} {'p50 us':>9} {'p99 us':>9}   after reopening: {'p50 us':>9} {'p99 us':>9}")
    for name, figures in live.items():
        again = reopened[name]
        print(f"{name:<26} {figures['p50_us']:>9} {figures['p99_us']:>9}   {'':>17}{again['p50_us']:>9} "
              f"{again['p99_us']:>9}")
    if args.json:
        write_json(args.json, {"accounts": args.accounts, "transfers": len(made), "records": lsns,
                               "live": live, "reopened": reopened})


if __name__ == "__main__":
    main()
