"""Durable transfer throughput and latency: Tally vs SQLite vs an in-memory loop, in one run.

    python bench/bench_engine.py [--transfers 4000] [--accounts 10000] [--json out.json]

For 1, 8 and 64 client threads, uniform and hot-spot (10% of accounts take 90%
of transfers), it runs the same seeded workload on
- Tally (durable: each transfer returns after its group commit is fsynced),
- a straightforward SQLite ledger (WAL, synchronous=FULL, BEGIN IMMEDIATE, an
  entries table and a balance check), one connection per client thread,
- a single-threaded in-memory Python loop (dicts, no durability): the ceiling.
It also times `transfer_many` in batches of 1,000, beside the durable floor: one
thread writing the same records and index entries to LMDB with one fsync per
1,000, and nothing else (no concurrency control, actors or idempotency). Each timed phase
starts after a full garbage collection (`collect_before_timing`). Ratios are what to read:
this machine is shared and noisy, so only figures from the same run compare.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LedgerError, Ledger, TransferRequest  # noqa: E402

FUNDING = 10**12


def workload(accounts: int, transfers: int, mix: str, seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    hot = max(2, accounts // 10)
    pairs = []
    for _ in range(transfers):
        if mix == "hotspot" and rng.random() < 0.9:
            source, destination = rng.sample(range(hot), 2)
        else:
            source, destination = rng.sample(range(accounts), 2)
        pairs.append((source, destination, rng.randint(1, 1000)))
    return pairs


def collect_before_timing() -> None:
    """A full garbage collection just before a timed phase. The collector's debt for what
    the bench built (the workload, a batch phase's 20,000 requests) is paid here, instead
    of by whichever phase allocates next; the collections a phase causes itself still count.
    Every phase, Tally's and the baselines', starts this way."""
    gc.collect()


def run_clients(clients: int, work: list[tuple[int, int, int]], call: Callable[[int, int, int, int], None]) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(number: int) -> None:
        mine = []
        barrier.wait(timeout=120)
        for k in range(number, len(work), clients):
            source, destination, amount = work[k]
            started = time.perf_counter()
            call(k, source, destination, amount)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    collect_before_timing()
    barrier.wait(timeout=120)
    started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for thread in threads:
        thread.join()
    elapsed, cpu_after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()
    return {
        "transfers_per_s": round(len(work) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
        # the whole process's CPU a call (every thread: the clients', the writer's, the actors')
        "cpu_user_us_per_call": round((cpu_after.ru_utime - cpu.ru_utime) / len(work) * 1e6, 1),
        "cpu_system_us_per_call": round((cpu_after.ru_stime - cpu.ru_stime) / len(work) * 1e6, 1),
    }


def transfer_call(ledger: Ledger, names: list[str], prefix: str) -> Callable[[int, int, int, int], None]:
    """`run_clients`' call for a Tally ledger: transfer k, ids `{prefix}-{k}`; a refusal is an outcome too."""

    def transfer(k: int, source: int, destination: int, amount: int) -> None:
        try:
            ledger.transfer(f"{prefix}-{k}", source=names[source], destination=names[destination], amount=amount)
        except LedgerError:
            pass

    return transfer


class TallyBench:
    def __init__(self, path: str, accounts: int) -> None:
        self.ledger = Ledger.open(path)
        self.names = [f"a{n}" for n in range(accounts)]
        self.ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in self.names:
            self.ledger.create_account(name, currency="USD")
        requests = [TransferRequest(f"fund-{name}", "bank", name, FUNDING) for name in self.names]
        for first in range(0, len(requests), 1000):
            self.ledger.transfer_many(requests[first : first + 1000])
        self.run = 0

    def call(self, prefix: str) -> Callable[[int, int, int, int], None]:
        return transfer_call(self.ledger, self.names, prefix)

    def batches(self, work: list[tuple[int, int, int]], prefix: str) -> dict:
        names = self.names
        requests = [TransferRequest(f"{prefix}-{k}", names[s], names[d], a) for k, (s, d, a) in enumerate(work)]
        collect_before_timing()
        started = time.perf_counter()
        for first in range(0, len(requests), 1000):
            self.ledger.transfer_many(requests[first : first + 1000])
        return {"transfers_per_s": round(len(requests) / (time.perf_counter() - started), 1)}


class SqliteBench:
    def __init__(self, path: str, accounts: int) -> None:
        self.path = os.path.join(path, "ledger.sqlite")
        db = self._connect()
        db.executescript(
            """
            CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL, overdraft INTEGER NOT NULL);
            CREATE TABLE entries (account INTEGER NOT NULL, transfer TEXT NOT NULL, amount INTEGER NOT NULL,
                                  balance INTEGER NOT NULL);
            CREATE INDEX entries_account ON entries(account);
            CREATE TABLE transfers (id TEXT PRIMARY KEY, source INTEGER, destination INTEGER, amount INTEGER);
            """
        )
        with db:
            db.executemany("INSERT INTO accounts VALUES (?, ?, 0)", [(n, FUNDING) for n in range(accounts)])
        db.close()
        self.local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def call(self, prefix: str) -> Callable[[int, int, int, int], None]:
        def transfer(k: int, source: int, destination: int, amount: int) -> None:
            db = getattr(self.local, "db", None)
            if db is None:
                db = self.local.db = self._connect()
            tid = f"{prefix}-{k}"
            db.execute("BEGIN IMMEDIATE")
            try:
                (balance, overdraft), = db.execute(
                    "SELECT balance, overdraft FROM accounts WHERE id = ?", (source,)).fetchall()
                if balance - amount < -overdraft:
                    db.execute("INSERT INTO transfers VALUES (?, ?, ?, NULL)", (tid, source, destination))
                else:
                    db.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, source))
                    db.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, destination))
                    for account, signed in ((source, -amount), (destination, amount)):
                        db.execute(
                            "INSERT INTO entries SELECT ?, ?, ?, balance FROM accounts WHERE id = ?",
                            (account, tid, signed, account))
                    db.execute("INSERT INTO transfers VALUES (?, ?, ?, ?)", (tid, source, destination, amount))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return transfer


def memory_loop(accounts: int, work: list[tuple[int, int, int]]) -> dict:
    balances = dict.fromkeys(range(accounts), FUNDING)
    entries: dict[int, list[tuple[str, int, int]]] = {n: [] for n in range(accounts)}
    seen: dict[str, tuple[int, int, int]] = {}
    collect_before_timing()
    started = time.perf_counter()
    for k, (source, destination, amount) in enumerate(work):
        tid = f"m-{k}"
        if tid in seen or balances[source] - amount < 0:
            continue
        seen[tid] = (source, destination, amount)
        balances[source] -= amount
        balances[destination] += amount
        entries[source].append((tid, -amount, balances[source]))
        entries[destination].append((tid, amount, balances[destination]))
    return {"transfers_per_s": round(len(work) / (time.perf_counter() - started), 1)}


def durable_floor(accounts: int, work: list[tuple[int, int, int]], path: str) -> dict:
    """The floor of a durable Python ledger: one thread, no concurrency control, no actors,
    no idempotency: per transfer a balance check, the same msgpack commit record with a
    CRC-32 frame, and the same three index entries, written to LMDB and fsynced once per
    1,000 transfers. What the engine adds beyond this is the price of its guarantees."""
    import struct
    import zlib

    import lmdb
    import msgpack

    pack = msgpack.Packer(use_bin_type=True).pack
    u64 = struct.Struct(">Q")
    env = lmdb.open(path, map_size=1 << 30, max_dbs=4, sync=False, metasync=False)  # flushed once a commit, below,
    # as the journal flushes its own (`journal._store`): the floor has the engine's durability, no more, no less
    records, transfers, entries = (env.open_db(name) for name in (b"records", b"transfers", b"entries"))
    balances = dict.fromkeys(range(accounts), FUNDING)
    seqs = dict.fromkeys(range(accounts), 0)
    names = [f"a{n}".encode() for n in range(accounts)]
    lsn = 0
    collect_before_timing()
    started = time.perf_counter()
    for first in range(0, len(work), 1000):
        rows, ids, lines = [], [], []
        for k in range(first, min(first + 1000, len(work))):
            source, destination, amount = work[k]
            tid = f"f-{k}"
            if balances[source] - amount < 0:
                continue
            lsn += 1
            balances[source] -= amount
            balances[destination] += amount
            seqs[source] += 1
            seqs[destination] += 1
            payload = pack([2, tid, source, destination, amount, seqs[source], balances[source],
                            seqs[destination], balances[destination]])
            key = u64.pack(lsn)
            rows.append((key, b"\x01" + u64.pack(zlib.crc32(payload, zlib.crc32(key)))[4:] + payload))
            ids.append((tid.encode(), key))
            lines.append((names[source] + u64.pack(seqs[source]), pack((tid, -amount, balances[source], lsn))))
            lines.append((names[destination] + u64.pack(seqs[destination]),
                          pack((tid, amount, balances[destination], lsn))))
        with env.begin(write=True) as txn:
            txn.cursor(db=records).putmulti(rows, append=True)
            txn.cursor(db=transfers).putmulti(ids)
            txn.cursor(db=entries).putmulti(lines)
        env.sync(True)
    elapsed = time.perf_counter() - started
    env.close()
    return {"transfers_per_s": round(len(work) / elapsed, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--transfers", type=int, default=4_000, help="per configuration")
    parser.add_argument("--batch-transfers", type=int, default=20_000)
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    clients_list = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tally-bench-", dir=os.environ.get("TALLY_BENCH_DIR")) as scratch:
        print(f"setting up {args.accounts} accounts in Tally and SQLite...", file=sys.stderr)
        tally = TallyBench(os.path.join(scratch, "tally"), args.accounts)
        sqlite = SqliteBench(scratch, args.accounts)
        for mix in ("uniform", "hotspot"):
            for clients in clients_list:
                work = workload(args.accounts, args.transfers, mix, args.seed + clients)
                tag = f"{mix}-{clients}"
                row = {"mix": mix, "clients": clients,
                       "tally": run_clients(clients, work, tally.call(tag)),
                       "sqlite": run_clients(clients, work, sqlite.call(tag)),
                       "memory": memory_loop(args.accounts, work)}
                row["tally_vs_sqlite"] = round(row["tally"]["transfers_per_s"] / row["sqlite"]["transfers_per_s"], 2)
                rows.append(row)
                print(f"  {tag}: tally {row['tally']} sqlite {row['sqlite']}", file=sys.stderr)
        batch_work = workload(args.accounts, args.batch_transfers, "uniform", args.seed)
        batched = tally.batches(batch_work, "batch")
        batched_memory = memory_loop(args.accounts, batch_work)
        floor = durable_floor(args.accounts, batch_work, os.path.join(scratch, "floor"))
        stats = tally.ledger.stats()
        tally.ledger.close()
    print()
    print(f"{'mix':8} {'clients':>7} | {'tally/s':>9} {'p50 ms':>7} {'p99 ms':>7} | {'sqlite/s':>9} {'p50 ms':>7}"
          f" {'p99 ms':>7} | {'x sqlite':>8} | {'memory/s':>10}")
    for row in rows:
        t, s = row["tally"], row["sqlite"]
        print(f"{row['mix']:8} {row['clients']:>7} | {t['transfers_per_s']:>9,.0f} {t['p50_ms']:>7} {t['p99_ms']:>7} |"
              f" {s['transfers_per_s']:>9,.0f} {s['p50_ms']:>7} {s['p99_ms']:>7} | {row['tally_vs_sqlite']:>8} |"
              f" {row['memory']['transfers_per_s']:>10,.0f}")
    print(f"transfer_many, batches of 1,000, uniform: {batched['transfers_per_s']:,.0f} durable transfers/s"
          f" (durable floor {floor['transfers_per_s']:,.0f}/s, memory loop {batched_memory['transfers_per_s']:,.0f}/s)")
    result = {"accounts": args.accounts, "transfers_per_config": args.transfers, "rows": rows,
              "transfer_many_1000": batched, "durable_floor_1000": floor, "ledger_stats": stats,
              "python": sys.version.split()[0]}
    print(json.dumps(result))
    write_json(args.json, result)
    return 0


def write_json(path: str | None, result: dict) -> None:
    """Write a bench's results to `path` (`--json`), if one was given."""
    if path:
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
