"""Pauses while many open pending transfers are posted: what a transfer beside them waits out.

    python bench/bench_pauses.py [--pending 300000] [--beside posts|transfers] [--tree PATH]
                                 [--json out.json]

One ledger, 100 accounts and a bank. `--pending` pending transfers with a timeout of an hour
are made in batches of 1,000 (`transfer_many`), then posted in batches of 1,000 (or, with
`--beside transfers`, as many transfers made between the accounts while they stay open)
while a probe thread makes single transfers one after another, a millisecond apart. Printed:
the posts' rate; the probe's latency (p50, p99, longest); the data file's size at the end,
and the time to open the ledger again (after its close, and as a crash would have left it:
its files copied before the close); and, timed around the sequencer's own steps under its
lock while the probe ran (every transfer waits for those), the longest and the total of its
checkpoints (each held every open pending transfer before CHECKPOINT5; now those opened
since the last, a sweep of others, and the ids of those closed since) and of the deadline
heap's compaction (`coordinator._deadlines`, or, in a tree from before it, the one-pass
`Sequencer._compact_deadlines`). `--tree` runs another checkout's engine (every module of
the engine loaded is checked to be that tree's).
A compaction's first step runs inside its start, so its time is in both totals: do not add them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any

from _trees import from_tree  # (bench/, this script's directory)

BATCH = 1_000
PROBE_EVERY_S = 0.001
TIMED = ("checkpoint", "_compact_deadlines", "_drain_deadlines")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=300_000)
    parser.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--beside", choices=("posts", "transfers"), default="posts",
                        help="what the probe goes beside: the pending transfers posted (the default), or as many "
                             "transfers between the accounts while they stay open")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.pending < BATCH:
        parser.error(f"--pending must be at least {BATCH:,} (it is made and posted in batches of {BATCH:,})")
    tree = os.path.abspath(args.tree)
    sys.path.insert(0, tree)
    import coordinator
    import coordinator._sequencer as sequencer_module
    from coordinator import Resolution
    from coordinator._records import CHECKPOINTS_INDEX, value_lsn
    from engine import Ledger, Transfer, TransferRequest

    assert os.path.dirname(os.path.dirname(os.path.abspath(coordinator.__file__))) == tree, coordinator.__file__
    spent: dict[str, list[float]] = defaultdict(list)
    for name in TIMED:  # wrapped on the class that has it, so a base class's is timed too
        real = getattr(sequencer_module.Sequencer, name, None)
        if real is None:
            continue

        def timed(self: Any, *pos: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return _real(self, *pos, **kw)
            finally:
                spent[_name].append(time.perf_counter() - started)

        setattr(sequencer_module.Sequencer, name, timed)

    count = args.pending - args.pending % BATCH
    with tempfile.TemporaryDirectory(dir=os.environ.get("TALLY_BENCH_DIR")) as directory:
        with Ledger.open(os.path.join(directory, "ledger")) as ledger:
            ledger.create_account("bank", currency="USD", overdraft_limit=None)
            names = [f"a{n}" for n in range(100)]
            for name in names:
                ledger.create_account(name, currency="USD", overdraft_limit=None)
            print(f"making {count:,} pending transfers...", flush=True)
            for first in range(0, count, BATCH):
                made = ledger.transfer_many([TransferRequest(f"p{k}", "bank", names[k % 100], 1, pending=True,
                                                             timeout_s=3600) for k in range(first, first + BATCH)])
                assert all(isinstance(transfer, Transfer) for transfer in made), made[0]
            spent.clear()
            latencies: list[float] = []
            failures: list[BaseException] = []
            stop = threading.Event()

            def probe() -> None:
                n = 0
                try:
                    while not stop.is_set():
                        started = time.perf_counter()
                        ledger.transfer(f"probe-{n}", source=names[n % 100], destination=names[(n + 1) % 100],
                                        amount=1)
                        latencies.append(time.perf_counter() - started)
                        n += 1
                        stop.wait(PROBE_EVERY_S)
                except BaseException as error:  # reported below: a bench that hides a failure lies
                    failures.append(error)

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            started = time.perf_counter()
            for first in range(0, count, BATCH):
                if args.beside == "posts":
                    batch = [Resolution(f"q{k}", f"p{k}") for k in range(first, first + BATCH)]
                else:  # transfers between the accounts, the pending transfers left open
                    batch = [TransferRequest(f"s{k}", names[k % 100], names[(k + 1) % 100], 1)
                             for k in range(first, first + BATCH)]
                posted = ledger._decide_many(batch)
                assert all(isinstance(transfer, Transfer) for transfer in posted), posted[0]
            elapsed = time.perf_counter() - started
            stop.set()
            prober.join(60)
            assert not prober.is_alive(), "the probe did not stop"
            assert not failures, f"the probe failed: {failures[0]!r}"
            steps = {name: list(values) for name, values in spent.items() if values}  # (not the close's)
            # Its files as a crash would leave them: copied once every record is durable and the
            # entry index behind the last checkpoint written (the writer idle: a copy made across
            # commits would be torn, as no crash leaves a file).
            journal = ledger._journal
            waited = time.monotonic() + 120
            while not (journal.durable_lsn == journal.last_lsn and journal.indexed_lsn >= value_lsn(
                    journal.index_last(CHECKPOINTS_INDEX) or b"\0" * 8)):
                if time.monotonic() > waited:
                    raise RuntimeError("the journal writer did not go idle in 120 s")
                time.sleep(0.01)
            shutil.copytree(os.path.join(directory, "ledger"), os.path.join(directory, "crashed"))
        data_bytes = os.path.getsize(os.path.join(directory, "ledger", "data.mdb"))
        reopen_s: dict[str, float] = {}
        for name in ("ledger", "crashed"):
            opening = time.perf_counter()
            reopened = Ledger.open(os.path.join(directory, name))
            reopen_s[name] = time.perf_counter() - opening
            still_open = len(reopened._sequencer.pending)
            reopened.close()
    from_tree(tree)
    latencies.sort()
    report = {
        "tree": tree, "pending": count, "beside": args.beside, "rate_per_s": count / elapsed,  # posts, or transfers beside
        "data_file_bytes": data_bytes,
        "reopen_s": reopen_s, "open_after": still_open,
        "probe": {"transfers": len(latencies), "p50_ms": statistics.median(latencies) * 1e3,
                  "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3, "max_ms": latencies[-1] * 1e3},
        "steps": {name: {"calls": len(values), "longest_ms": max(values) * 1e3, "total_ms": sum(values) * 1e3}
                  for name, values in steps.items()},
    }
    what = "pending transfers posted" if args.beside == "posts" else "transfers beside as many open pending transfers"
    print(f"tree {tree}: {count:,} {what} at {report['rate_per_s']:,.0f}/s; data file {data_bytes / 2**20:,.0f} MiB")
    print(f"  reopened in {reopen_s['ledger']:.2f} s after its close, {reopen_s['crashed']:.2f} s after a crash; "
          f"{still_open:,} pending transfers open")
    probe_ = report["probe"]
    print(f"  probe: {probe_['transfers']:,} transfers, p50 {probe_['p50_ms']:.2f} ms, p99 {probe_['p99_ms']:.1f} ms, "
          f"longest {probe_['max_ms']:.1f} ms")
    for name, step in report["steps"].items():
        print(f"  {name}: {step['calls']:,} calls, longest {step['longest_ms']:.1f} ms, total {step['total_ms']:.0f} ms")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
