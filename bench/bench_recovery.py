"""How long opening a big ledger takes, with checkpoints and without, and the replay rate.

    python bench/bench_recovery.py [--transfers 1000000] [--accounts 10000] [--second-ledger] [--json out.json]

Builds a ledger of `--transfers` committed transfers over `--accounts` accounts
(plus a bank that funds them), sent with `transfer_many` in batches of 1,000,
with the default checkpoint interval. Building 1,000,000 takes minutes;
`--transfers 100000` is a quick run. Then it measures, each `--repeat` times
(the best is reported, the page cache being warm for all):

- `Ledger.open` of that ledger: the check of the data file (every page, every index
  entry), the newest checkpoint, then the tail;
- a full `coordinator.replay` from LSN 0 over a read-only journal, its opening (and so
  its check) included, which is what an open without any checkpoint has to do (and what
  `tally verify` does), and its rate in records/s; and that opening alone;
- with `--second-ledger`, `Ledger.open` of a second ledger built from the same
  workload with `checkpoint_interval` above its record count, so its only checkpoints
  are the ones the entry index needs (one per `UNINDEXED_ENTRIES_MAX` entries, 400,000:
  every 200,000 transfers) and an open replays up to that many.

Prints a table and one JSON line (`--json FILE` also writes it to FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coordinator  # noqa: E402
from engine import Ledger, LedgerError, TransferRequest  # noqa: E402
from journal import Journal  # noqa: E402

BATCH_SIZE = 1_000
ACCOUNT_THREADS = 64
"""`create_account` waits for durability; concurrent callers share each group commit."""
FUNDING = 10**12
AMOUNT_MAX = 1_000


def build(path: Path, *, transfers: int, accounts: int, seed: int, checkpoint_interval: int) -> dict:
    """Create the ledger; every transfer must commit. Returns what was built and how fast."""
    names = [f"acct-{n:06d}" for n in range(accounts)]
    rng = random.Random(seed)
    started = time.perf_counter()
    with Ledger.open(path, checkpoint_interval=checkpoint_interval) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        with ThreadPoolExecutor(ACCOUNT_THREADS) as pool:
            list(pool.map(lambda name: ledger.create_account(name, currency="USD"), names))
        funding = [TransferRequest(f"fund-{name}", "bank", name, FUNDING) for name in names]
        for first in range(0, len(funding), BATCH_SIZE):
            _send(ledger, funding[first : first + BATCH_SIZE])
        sent = 0
        accounts_s = time.perf_counter() - started
        progress_every = max(BATCH_SIZE, transfers // 10 // BATCH_SIZE * BATCH_SIZE)
        for first in range(0, transfers, BATCH_SIZE):
            batch = []
            for k in range(first, min(transfers, first + BATCH_SIZE)):
                source, destination = rng.sample(names, 2)
                batch.append(TransferRequest(f"t-{k}", source, destination, rng.randint(1, AMOUNT_MAX)))
            sent += _send(ledger, batch)
            if (first + BATCH_SIZE) % progress_every == 0:
                elapsed = time.perf_counter() - started
                print(f"  built {first + len(batch):>10,} transfers in {elapsed:7.1f} s", file=sys.stderr, flush=True)
        state_hash = ledger.state_hash()
        stats = ledger.stats()
    elapsed_s = time.perf_counter() - started
    return {"transfers": sent, "funding_transfers": len(funding), "records": stats["durable_lsn"], "state_hash": state_hash,
            "build_s": round(elapsed_s, 1), "accounts_s": round(accounts_s, 1),
            "transfers_per_s": round(transfers / (elapsed_s - accounts_s), 1),
            "data_mdb_bytes": os.path.getsize(path / "data.mdb")}


def _send(ledger: Ledger, batch: list[TransferRequest]) -> int:
    outcomes = ledger.transfer_many(batch)
    refused = [outcome for outcome in outcomes if isinstance(outcome, LedgerError)]
    if refused:
        raise SystemExit(f"bench_recovery: {len(refused)} transfers were refused, the first: {refused[0]}")
    return len(batch)


def time_open(path: Path, repeat: int, state_hash: str) -> dict:
    """Best of `repeat` `Ledger.open` calls (each closed before the next); checks the state hash once."""
    best_s, records, checkpoint_lsn = float("inf"), None, None
    for run in range(repeat):
        started = time.perf_counter()
        ledger = Ledger.open(path)
        opened_s = time.perf_counter() - started
        try:
            best_s = min(best_s, opened_s)
            records, checkpoint_lsn = ledger.recovered.records, ledger.recovered.checkpoint_lsn
            if run == 0 and ledger.state_hash() != state_hash:
                raise SystemExit(f"bench_recovery: {path} reopened with a different state hash")
        finally:
            ledger.close()
    return {"open_s": round(best_s, 3), "records_replayed": records, "started_from_checkpoint_lsn": checkpoint_lsn}


def time_full_replay(path: Path, repeat: int) -> dict:
    """Best of `repeat` full replays from LSN 0 through `coordinator.replay` on a read-only journal,
    opening it included (as `tally verify` does); and best of the opens alone (the data file's
    check: every page, every index entry)."""
    best_s, check_s, records, checkpoints = float("inf"), float("inf"), 0, 0
    for _ in range(repeat):
        started = time.perf_counter()
        journal = Journal.open_readonly(path, index_names=coordinator.INDEX_NAMES)
        try:
            check_s = min(check_s, time.perf_counter() - started)
            books = coordinator.replay(journal)
            best_s = min(best_s, time.perf_counter() - started)
            records, checkpoints = books.records, books.checkpoints
        finally:
            journal.close()
    return {"replay_s": round(best_s, 3), "records_replayed": records, "checkpoints_passed": checkpoints,
            "records_per_s": round(records / best_s, 1), "check_s": round(check_s, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transfers", type=int, default=1_000_000, help="committed transfers (default 1,000,000)")
    parser.add_argument("--accounts", type=int, default=10_000, help="accounts (default 10,000)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each measurement; the best is kept")
    parser.add_argument("--second-ledger", action="store_true",
                        help="also build a ledger with checkpoints only every 200,000 transfers (the entry index's"
                             " bound) and time its open (doubles the build)")
    parser.add_argument("--path", help="directory for the ledgers (default: a temporary one, removed after)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON summary to FILE")
    args = parser.parse_args()
    if args.transfers < 1 or args.accounts < 2 or args.repeat < 1:
        parser.error("--transfers >= 1, --accounts >= 2 and --repeat >= 1, please")

    with tempfile.TemporaryDirectory(prefix="tally-bench-recovery-", dir=args.path) as scratch:
        interval = coordinator.CHECKPOINT_RECORDS_INTERVAL
        print(f"bench_recovery: {args.transfers:,} transfers over {args.accounts:,} accounts, batches of"
              f" {BATCH_SIZE:,}, checkpoint interval {interval:,}", flush=True)
        checkpointed = Path(scratch) / "checkpointed"
        built = build(checkpointed, transfers=args.transfers, accounts=args.accounts, seed=args.seed,
                      checkpoint_interval=interval)
        rows = [("open, with checkpoints", time_open(checkpointed, args.repeat, built["state_hash"]))]
        full = time_full_replay(checkpointed, args.repeat)
        rows.append(("full replay from LSN 0", {"open_s": full["replay_s"], **full}))
        rows.append(("the data file's check alone", {"open_s": full["check_s"], "records_replayed": 0}))
        second = None
        if args.second_ledger:
            bare = Path(scratch) / "no-checkpoint"
            second = build(bare, transfers=args.transfers, accounts=args.accounts, seed=args.seed,
                           checkpoint_interval=built["records"] * 2 + 1)
            if second["state_hash"] != built["state_hash"]:
                raise SystemExit("bench_recovery: the two ledgers of one workload differ")
            rows.append(("open, sparse checkpoints", time_open(bare, args.repeat, built["state_hash"])))

    print(f"  built {built['transfers']:,} transfers and {built['funding_transfers']:,} fundings ({built['records']:,} records, {full['checkpoints_passed']}"
          f" checkpoints, data.mdb {built['data_mdb_bytes'] / 2**20:,.0f} MiB) in {built['build_s']} s:"
          f" {built['transfers_per_s']:,.0f} transfers/s after {built['accounts_s']} s of accounts")
    print(f"  {'':28} {'records replayed':>17} {'seconds':>9} {'records/s':>11}")
    for label, row in rows:
        rate = row.get("records_per_s") or (row["records_replayed"] / row["open_s"] if row["open_s"] else 0.0)
        print(f"  {label:28} {row['records_replayed']:>17,} {row['open_s']:>9.3f} {rate:>11,.0f}")
    speedup = full["replay_s"] / rows[0][1]["open_s"] if rows[0][1]["open_s"] else float("inf")
    print(f"  the check of every page and index entry, part of each open: {full['check_s']} s"
          f" ({built['data_mdb_bytes'] / 2**20 / full['check_s']:,.0f} MiB/s)")
    print(f"  checkpoints make opening {speedup:,.1f}x faster than a full replay;"
          f" full replay rate {full['records_per_s']:,.0f} records/s")
    summary = {
        "transfers": built["transfers"], "accounts": args.accounts, "records": built["records"],
        "checkpoint_interval": interval, "checkpoints": full["checkpoints_passed"], "build": built,
        "open_with_checkpoints": rows[0][1], "full_replay": full,
        "open_sparse_checkpoints": rows[3][1] if second else None,
        "speedup_open_vs_full_replay": round(speedup, 1),
    }
    line = json.dumps(summary)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
