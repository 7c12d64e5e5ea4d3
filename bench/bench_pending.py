"""Pending then post pairs, and 2-leg linked transfers, beside single transfers, in one run.

    python bench/bench_pending.py [--clients 64] [--operations 4000] [--rounds 5] [--json out.json]

One ledger of 10,000 funded accounts. Each round runs, one after another with the same
client threads count and uniform random pairs of accounts:
- `single`: `ledger.transfer`, one durable transfer per call;
- `pending+post`: a client makes a pending transfer, then posts it (both durable): one
  operation is the pair;
- `linked-2`: `ledger.transfer_linked` of two legs (A -> B, B -> C): one operation is the chain.
Rates are operations per second; read the ratios to `single` of the same round (the machine is
shared and noisy), as medians over the rounds with their range. Then the process's CPU (user
and system) an operation of each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import TallyBench, run_clients  # noqa: E402
from engine import LedgerError, TransferRequest  # noqa: E402

MODES = ("single", "pending+post", "linked-2")


def work(accounts: int, operations: int, seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    return [(*rng.sample(range(accounts), 2), rng.randint(1, 1000)) for _ in range(operations)]


def caller(bench: TallyBench, mode: str, prefix: str) -> Callable[[int, int, int, int], None]:
    ledger, names = bench.ledger, bench.names
    count = len(names)
    if mode == "single":
        return bench.call(prefix)
    if mode == "pending+post":
        def pair(k: int, source: int, destination: int, amount: int) -> None:
            try:
                ledger.transfer(f"{prefix}-p{k}", source=names[source], destination=names[destination], amount=amount,
                                pending=True, timeout_s=3600)
                ledger.post_pending(f"{prefix}-q{k}", pending_id=f"{prefix}-p{k}")
            except LedgerError:
                pass
        return pair

    def chain(k: int, source: int, destination: int, amount: int) -> None:
        onward = (destination + 1) % count
        try:
            ledger.transfer_linked([TransferRequest(f"{prefix}-a{k}", names[source], names[destination], amount),
                                    TransferRequest(f"{prefix}-b{k}", names[destination], names[onward], amount)])
        except LedgerError:
            pass
    return chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--operations", type=int, default=4_000, help="per mode and round")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    user: dict[str, list[float]] = {mode: [] for mode in MODES}
    system: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TALLY_BENCH_DIR")) as directory:
        print(f"setting up {args.accounts} accounts...", flush=True)
        bench = TallyBench(os.path.join(directory, "ledger"), args.accounts)
        bench.ledger._coordinator.claims.wait_warm(60)
        try:
            for round_ in range(args.rounds):
                load = work(args.accounts, args.operations, round_)
                for mode in MODES:
                    result = run_clients(args.clients, load, caller(bench, mode, f"r{round_}-{mode}"))
                    rates[mode].append(result["transfers_per_s"])
                    user[mode].append(result["cpu_user_us_per_call"])
                    system[mode].append(result["cpu_system_us_per_call"])
                print(f"round {round_ + 1}: " + ", ".join(f"{mode} {rates[mode][-1]:,.0f}/s" for mode in MODES),
                      flush=True)
        finally:
            bench.ledger.close()
    single = rates["single"]
    print(f"\n{args.clients} clients, {args.operations} operations per mode and round, {args.rounds} rounds")
    print(f"{'mode':<14} {'ops/s median':>13} {'range':>20} {'x single (median of per-round ratios)':>40}")
    summary = {}
    for mode in MODES:
        ratios = [rate / base for rate, base in zip(rates[mode], single, strict=True)]
        summary[mode] = {"ops_per_s": rates[mode], "median": statistics.median(rates[mode]),
                         "ratio_to_single": ratios, "ratio_median": statistics.median(ratios)}
        print(f"{mode:<14} {statistics.median(rates[mode]):>13,.0f} {min(rates[mode]):>9,.0f}-{max(rates[mode]):<9,.0f} "
              f"{statistics.median(ratios):>20.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
    print("\nCPU of the whole process an operation (a pair or a chain is one), medians [range]; user CPU is")
    print("mostly the interpreter's, which one thread at a time runs: what bounds the rate here")
    print(f"{'mode':<14} {'user us':>22} {'system us':>22}")
    for mode in MODES:
        summary[mode]["cpu_user_us"], summary[mode]["cpu_system_us"] = user[mode], system[mode]
        print(f"{mode:<14} {statistics.median(user[mode]):>8.1f} [{min(user[mode]):.1f}-{max(user[mode]):.1f}]"
              f"{statistics.median(system[mode]):>10.1f} [{min(system[mode]):.1f}-{max(system[mode]):.1f}]")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"clients": args.clients, "operations": args.operations, "modes": summary,
                       "time": time.time()}, out, indent=2)


if __name__ == "__main__":
    main()
