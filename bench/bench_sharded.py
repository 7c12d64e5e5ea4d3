"""`transfer_many` on a `ShardedLedger` of 1, 2 and 4 shards beside one in-process `Ledger`.

    python bench/bench_sharded.py [--accounts 10000] [--transfers 20000] [--rounds 5]
                                  [--batch 1000] [--callers 8] [--shards 1,2,4] [--json FILE]

Every configuration runs in this one process, in turn, on fresh ledgers in a temporary
directory: first the in-process `Ledger`, then for each shard count a `ShardedLedger` (its
shards in Ray actors, one process each, on this machine's local Ray) with two workloads:

- *90% local*: each transfer's destination is on its source's shard with probability 0.9
  (with one shard, every transfer is local);
- *all cross-shard*: every destination on another shard (the protocol's three steps each).

Accounts have no overdraft limit, so nothing is refused. `--callers` threads send batches of
`--batch` transfers at once (the same for the `Ledger`), `--transfers` per round; each row
gives the median and the range over `--rounds` rounds of transfers/s, and the median CPU a
transfer cost the calling process (the `Ledger` itself, or the router) and the shards'
processes together (read from /proc: Linux only). It also prints the
round trip of an empty Ray actor call (p50, p99), the figure the capacity model in
bench/README.md is built from.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import Account, Ledger, ShardedLedger, Transfer, TransferRequest  # noqa: E402
from engine._placement import shard_of  # noqa: E402

Batch = Sequence[TransferRequest]


def accounts_by_shard(count: int, shards: int) -> list[list[str]]:
    """`count` account ids, grouped by the shard their hash places them on."""
    groups: list[list[str]] = [[] for _ in range(shards)]
    for i in range(count):
        name = f"acc-{i}"
        groups[shard_of(name, shards)].append(name)
    return groups


def workload(groups: list[list[str]], transfers: int, batch: int, local: float, seed: int,
             prefix: str) -> list[list[TransferRequest]]:
    """Batches of transfers: a source at random, its destination on the same shard with
    probability `local` (always, with one shard), else on another shard at random."""
    chance = random.Random(seed)
    batches, current = [], []
    for i in range(transfers):
        a = chance.randrange(len(groups))
        b = a if len(groups) == 1 or chance.random() < local else chance.choice(
            [s for s in range(len(groups)) if s != a])
        source = chance.choice(groups[a])
        destination = chance.choice(groups[b])
        while destination == source:
            destination = chance.choice(groups[b])
        current.append(TransferRequest(f"{prefix}-{i}", source, destination, chance.randint(1, 100)))
        if len(current) == batch:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    return batches


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux: /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CPU: dict[str, list[float]] = {}
"""CPU microseconds a transfer, by process ("caller", "shards"), over the rounds of a row."""


def timed_round(run: Callable[[Batch], list[Transfer | Any]], batches: list[list[TransferRequest]],
                callers: int, shard_pids: Sequence[int] = ()) -> float:
    """Transfers/s of `batches` sent by `callers` threads at once; every outcome a Transfer.
    Adds the CPU a transfer cost this process and the `shard_pids` to `CPU`."""
    queue = list(reversed(batches))
    lock = threading.Lock()
    failures: list[object] = []

    def caller() -> None:
        while True:
            with lock:
                if not queue:
                    return
                batch = queue.pop()
            outcomes = run(batch)
            failures.extend(o for o in outcomes if not isinstance(o, Transfer))

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    cpu_before = cpu_s(os.getpid()), sum(cpu_s(pid) for pid in shard_pids)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    elapsed = time.perf_counter() - started
    count = sum(len(b) for b in batches)
    CPU.setdefault("caller", []).append((cpu_s(os.getpid()) - cpu_before[0]) / count * 1e6)
    CPU.setdefault("shards", []).append((sum(cpu_s(pid) for pid in shard_pids) - cpu_before[1]) / count * 1e6)
    assert not failures, failures[:3]
    return count / elapsed


def summary(rates: list[float]) -> dict[str, float]:
    """Median and range of the rates, and the median CPU a transfer cost (then forgets it)."""
    found = {"median": statistics.median(rates), "low": min(rates), "high": max(rates),
             "caller cpu us": statistics.median(CPU.get("caller", [0.0])),
             "shards cpu us": statistics.median(CPU.get("shards", [0.0]))}
    CPU.clear()
    return found


def ray_round_trip(ledger: ShardedLedger, calls: int = 2_000) -> tuple[float, float]:
    """p50 and p99 in ms of an empty call to a shard's actor (its pid), one after another."""
    import ray

    actor = ledger._router.actors[0]
    spent = []
    for _ in range(calls):
        started = time.perf_counter()
        ray.get(actor.pid.remote(), timeout=30)
        spent.append((time.perf_counter() - started) * 1e3)
    spent.sort()
    return spent[len(spent) // 2], spent[int(len(spent) * 0.99)]


def bench_ledger(root: Path, args: argparse.Namespace) -> dict[str, float]:
    groups = accounts_by_shard(args.accounts, 1)
    with Ledger.open(root / "ledger", map_size_bytes=1 << 32) as ledger:
        ledger.create_accounts([Account(name, "USD", None) for name in groups[0]])
        rates = [timed_round(ledger.transfer_many, workload(groups, args.transfers, args.batch, 1.0, r, f"r{r}"),
                             args.callers) for r in range(args.rounds)]
    return summary(rates)


def bench_sharded(root: Path, shards: int, args: argparse.Namespace) -> dict[str, Any]:
    groups = accounts_by_shard(args.accounts, shards)
    found: dict[str, Any] = {}
    with ShardedLedger.open(root / f"sharded-{shards}", shards=shards, map_size_bytes=1 << 32) as ledger:
        ledger.create_accounts([Account(name, "USD", None) for group in groups for name in group])
        for label, local in (("90% local", 0.9), ("all cross-shard", 0.0)):
            if shards == 1:
                if local == 0.0:
                    continue
                label = "all local"
            pids = ledger.pids()
            rates = [timed_round(ledger.transfer_many,
                                 workload(groups, args.transfers, args.batch, local, r, f"{label[:3]}{r}"),
                                 args.callers, pids) for r in range(args.rounds)]
            found[label] = summary(rates)
        if shards == 1:
            found["ray call ms"] = dict(zip(("p50", "p99"), ray_round_trip(ledger), strict=True))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--transfers", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="tally-bench-sharded-") as directory:
        root = Path(directory)
        results["Ledger"] = bench_ledger(root, args)
        _show("one Ledger (in-process)", results["Ledger"], results["Ledger"])
        for shards in (int(s) for s in args.shards.split(",")):
            found = bench_sharded(root, shards, args)
            results[f"{shards} shards"] = found
            for label, figures in found.items():
                if label == "ray call ms":
                    print(f"  empty Ray actor call: p50 {figures['p50']:.2f} ms, p99 {figures['p99']:.2f} ms")
                else:
                    _show(f"{shards} shard{'s' if shards > 1 else ''}, {label}", figures, results["Ledger"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


def _show(label: str, figures: dict[str, float], baseline: dict[str, float]) -> None:
    print(f"{label:<34} {figures['median']:>9,.0f} /s [{figures['low']:,.0f}-{figures['high']:,.0f}]"
          f"   x{figures['median'] / baseline['median']:.2f} of one Ledger   CPU a transfer: "
          f"{figures['caller cpu us']:.1f} us caller + {figures['shards cpu us']:.1f} us shards", flush=True)


if __name__ == "__main__":
    main()
