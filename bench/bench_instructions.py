"""Instructions and cache misses per `transfer_many` transfer, counted by valgrind: a figure
the machine's noise does not move.

    python bench/bench_instructions.py [--transfers 5000] [--accounts 10000] [--tree PATH] [--clients N]
                                       [--mode single|pending+post|linked-2]

With `--clients N` it counts single transfers (`Ledger.transfer`) from N threads instead of
batches (with N > 1 the counts move more between runs: how the threads interleave under
valgrind decides how transfers combine). With `--mode` and `--clients` it counts one of
`bench_pending.py`'s operations instead, a pending transfer then its post, or a 2-leg
`transfer_linked`: figures are then per operation (a pair, a chain), to set beside two
single transfers.

The other benchmarks time the engine on a shared machine whose speed moves by more than
most single changes do. This one runs it under `valgrind --tool=callgrind --cache-sim=yes`
and counts, for `--transfers` transfers in batches of 1,000 into a ledger of `--accounts`
funded accounts: the instructions executed (Ir) and the data reads and writes that missed
the first-level and the last-level cache (simulated: valgrind's default first level and a
4 MiB last level). Counting is off while the ledger is set up, through one warm-up round of
the same size, and a full garbage collection; then on for the measured round only. Both
threads count (the caller's and the journal writer's). Hash randomisation is off, so two
runs of the same tree agree to within ~0.5% in instructions; the misses move by up to ~15%,
as the writer's group commits fall differently against the caller's chunks. `--tree` runs
another checkout's engine (an old commit, say) for an A/B of the two.

What it does not see: time spent waiting (fsync, locks), and the cost of a miss, which is
the machine's. A full garbage collection in the measured round adds ~350 last-level misses
a transfer at 5,000 transfers; the collection before it makes that unlikely, not impossible
(compare runs by their `gc` line).

Needs valgrind (Debian: `apt install valgrind`). About a minute at the defaults.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENTS = ("Ir", "D1mr", "D1mw", "DLmr", "DLmw")


def child(args: argparse.Namespace) -> None:
    """Under valgrind: set up, then count one round of `transfer_many`."""
    sys.path.insert(0, args.tree)
    from engine import Ledger, TransferRequest

    collections = {"full": 0}
    with tempfile.TemporaryDirectory(prefix="tally-bench-", dir=os.environ.get("TALLY_BENCH_DIR")) as scratch:
        ledger = Ledger.open(os.path.join(scratch, "tally"))
        names = [f"acct-{n:05}" for n in range(args.accounts)]
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in names:
            ledger.create_account(name, currency="USD")
        funding = [TransferRequest(f"fund-{name}", "bank", name, 10**12) for name in names]
        rng = random.Random(args.seed)
        work = []
        for k in range(2 * args.transfers):
            source, destination = rng.sample(names, 2)
            work.append(TransferRequest(f"t-{k}", source, destination, rng.randint(1, 1_000)))
        for first in range(0, len(funding), 1000):
            ledger.transfer_many(funding[first : first + 1000])
        warm_up, measured = work[: args.transfers], work[args.transfers :]
        for first in range(0, len(warm_up), 1000):
            ledger.transfer_many(warm_up[first : first + 1000])
        ledger._coordinator.claims.wait_warm(120.0)
        gc.collect()
        gc.callbacks.append(lambda phase, info: collections.__setitem__(
            "full", collections["full"] + (phase == "start" and info["generation"] == 2)))
        control = ["callgrind_control", "--instr=on", str(os.getpid())]
        subprocess.run(control, check=True, capture_output=True)
        if args.clients:
            singles(ledger, measured, args.clients, args.mode)
        else:
            for first in range(0, len(measured), 1000):
                ledger.transfer_many(measured[first : first + 1000])
        control[1] = "--instr=off"
        subprocess.run(control, check=True, capture_output=True)
        ledger.close()
    print(json.dumps(collections))


def singles(ledger: Any, requests: list[Any], clients: int, mode: str) -> None:
    """One operation of `mode` for each request, from `clients` threads at once (each its
    share, in turn): `ledger.transfer`, a pending transfer then its post, or a 2-leg chain
    (the request's transfer, then the same amount from its destination back to its source)."""
    import threading

    from engine import TransferRequest

    def client(number: int) -> None:
        for request in requests[number::clients]:
            tid, source, destination, amount = request.id, request.source, request.destination, request.amount
            if mode == "single":
                ledger.transfer(tid, source=source, destination=destination, amount=amount)
            elif mode == "pending+post":
                ledger.transfer(tid, source=source, destination=destination, amount=amount, pending=True,
                                timeout_s=3600)
                ledger.post_pending(tid + "-post", pending_id=tid)
            else:
                ledger.transfer_linked([TransferRequest(tid, source, destination, amount),
                                        TransferRequest(tid + "-on", destination, source, amount)])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)


def totals(path: str) -> dict[str, int]:
    """The event totals of a callgrind output file."""
    names: list[str] = []
    with open(path) as output:
        for line in output:
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith("totals:"):  # at the end (the "summary:" near the top is 0)
                return dict(zip(names, map(int, line.split()[1:]), strict=True))
    raise SystemExit(f"no totals in {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfers", type=int, default=5_000, help="measured transfers (default 5,000)")
    parser.add_argument("--clients", type=int, default=0,
                        help="measure single transfers (`transfer`) from this many threads instead of batches")
    parser.add_argument("--mode", choices=("single", "pending+post", "linked-2"), default="single",
                        help="with --clients: what one operation is (default: a single transfer)")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tree", default=REPO, help="checkout whose engine to run (default: this one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode != "single" and not args.clients:
        parser.error("--mode goes with --clients")
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="tally-callgrind-") as scratch:
        out = os.path.join(scratch, "callgrind.out")
        command = [
            "valgrind", "--tool=callgrind", "--cache-sim=yes", "--LL=4194304,16,64", "--instr-atstart=no",
            f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__), "--child",
            "--transfers", str(args.transfers), "--accounts", str(args.accounts), "--seed", str(args.seed),
            "--clients", str(args.clients), "--mode", args.mode,
            "--tree", os.path.abspath(args.tree),
        ]
        try:
            run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        except FileNotFoundError:
            raise SystemExit("valgrind is not installed (Debian: apt install valgrind)") from None
        if run.returncode != 0:
            raise SystemExit(f"the run under valgrind failed:\n{run.stderr[-2000:]}")
        collections = json.loads(run.stdout.strip().splitlines()[-1])
        counted = totals(out)
    per = {event: counted.get(event, 0) / args.transfers for event in EVENTS}
    shape = f"{args.mode} operations from {args.clients} threads" if args.clients else "batches of 1,000"
    print(f"tree {os.path.abspath(args.tree)}: {args.transfers:,} transfers in {shape}, {args.accounts:,} accounts")
    print(f"  per transfer: {per['Ir']:,.0f} instructions; first-level misses {per['D1mr']:,.0f} read, "
          f"{per['D1mw']:,.0f} write; last-level misses {per['DLmr']:,.0f} read, {per['DLmw']:,.0f} write")
    print(f"  gc: {collections['full']} full collection(s) while counting")
    print(json.dumps({"tree": os.path.abspath(args.tree), "transfers": args.transfers, "accounts": args.accounts,
                      "per_transfer": {event: round(value, 1) for event, value in per.items()},
                      "full_collections": collections["full"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
