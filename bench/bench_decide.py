"""What deciding costs, by kind: the CPU of one ticket decided in turn, for two trees side by side.

    python bench/bench_decide.py [--trees TREE ...] [--rounds 30] [--chunk 256]

Each tree runs in a process of its own, in turn, round after round: on a ledger of 512
accounts, one thread holds every account's turn and decides a chunk of `--chunk` tickets
of one kind at a time (`coordinator._turns.decide_in_turn`, as the combiner and the lane
do): single transfers, pending transfers (with a timeout), then the posts of those pending
transfers. The figure is that thread's CPU a ticket, the chunk's record journaled included
(not its commit: the writer's thread), as the median of the rounds after the first five,
with its range. Nothing else runs meanwhile, so the ratios between kinds and between trees
are steady where `bench_pending.py`'s 64 clients are not; what it leaves out is everything
around the decision (the callers, the combiner, the writer).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from _trees import from_tree  # (bench/, this script's directory)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("single", "pending", "post")
WARM_ROUNDS = 5
WAIT_S = 30.0


def child(tree: str, rounds: int, chunk: int) -> dict[str, list[float]]:
    """One tree's rounds, in this process: microseconds of this thread's CPU a ticket, by kind."""
    sys.path.insert(0, tree)
    import coordinator
    from coordinator import Resolution
    from coordinator._turns import decide_in_turn
    from engine import Ledger, TransferRequest

    assert os.path.dirname(os.path.dirname(os.path.abspath(coordinator.__file__))) == tree, coordinator.__file__
    if os.path.exists(os.path.join(tree, "coordinator", "_taking.py")):
        from coordinator._taking import give_back_turns, take_turns
    else:  # a tree from before 0b67213
        from coordinator._turns import give_back_turns, take_turns  # type: ignore[attr-defined,no-redef]

    rng = random.Random(1)
    spent: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TALLY_BENCH_DIR")) as directory:
        ledger = Ledger.open(os.path.join(directory, "ledger"))
        try:
            names = [f"a{n}" for n in range(512)]
            for name in names:
                ledger.create_account(name, currency="USD", overdraft_limit=None)
            coordinator = ledger._coordinator
            for round_ in range(rounds):
                for kind in KINDS:
                    if kind == "post":
                        requests: list[Any] = [Resolution(f"q{round_}-{k}", f"p{round_}-{k}") for k in range(chunk)]
                    else:
                        requests = [TransferRequest(f"{kind[0]}{round_}-{k}", *rng.sample(names, 2), 1,
                                                    pending=kind == "pending", timeout_s=3600 if kind == "pending" else None)
                                    for k in range(chunk)]
                    tickets = [coordinator.claims.claim(request, relayed=True)[0] for request in requests]
                    coordinator.admission.admit(len(tickets), WAIT_S)
                    turns = take_turns(coordinator, names, wait_s=WAIT_S)
                    assert turns is not None, "every turn free"
                    started = time.thread_time_ns()
                    left = decide_in_turn(coordinator, tickets, turns)
                    spent[kind].append((time.thread_time_ns() - started) / chunk / 1000)
                    give_back_turns(coordinator, turns)
                    assert not left
                    for ticket in tickets:
                        assert ticket.wait(WAIT_S), "durable"
                        assert type(ticket.value).__name__ == "Transfer", ticket.value
                        coordinator.claims.release(ticket)
                        coordinator.decided(ticket)
        finally:
            ledger.close()
    from_tree(tree)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", default=[REPO], help="checkouts whose engine to run, in turn")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="processes a tree, in turn with the others")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds <= WARM_ROUNDS:
        parser.error(f"--rounds must be more than {WARM_ROUNDS}")
    if not 1 <= args.chunk <= 256 or args.runs < 1:  # the engine decides chunks of 256 at most (CHUNK_REQUESTS_MAX)
        parser.error("--chunk must be 1..256 and --runs at least 1")
    if args.child:
        print(json.dumps(child(args.child, args.rounds, args.chunk)))
        return
    trees = [os.path.abspath(tree) for tree in args.trees]
    spent: dict[str, dict[str, list[float]]] = {tree: {kind: [] for kind in KINDS} for tree in trees}
    for _ in range(args.runs):
        for tree in trees:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", tree, "--rounds", str(args.rounds),
                                  "--chunk", str(args.chunk)], check=True, capture_output=True, text=True, timeout=600)
            for kind, values in json.loads(out.stdout).items():
                spent[tree][kind] += values[WARM_ROUNDS:]
    print(f"CPU a ticket decided in turn (us), chunks of {args.chunk}, median [range] of "
          f"{args.runs} x {args.rounds - WARM_ROUNDS} rounds")
    print(f"{'tree':40} " + " ".join(f"{kind:>20}" for kind in KINDS) + "   pair / 2 singles")
    for tree in trees:
        medians = {kind: statistics.median(values) for kind, values in spent[tree].items()}
        cells = [f"{medians[kind]:6.2f} [{min(values):.2f}-{max(values):.2f}]" for kind, values in spent[tree].items()]
        pair = (medians["pending"] + medians["post"]) / (2 * medians["single"])
        print(f"{tree[-40:]:40} " + " ".join(f"{cell:>20}" for cell in cells) + f"   {pair:.2f}")


if __name__ == "__main__":
    main()
