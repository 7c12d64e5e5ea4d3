"""Crash a real process at each named crash point, recover with `tally recover`, and check the books.

The child (a script written into the test's directory) opens a ledger, opens
accounts, and runs transfers from several threads, printing one line per
acknowledged outcome (after it is durable, flushed). `TALLY_CRASH_AT=NAME:N`
ends it with exit code 99 at the N-th time it reaches the point, in the middle
of the workload. Then: every acknowledged transfer is there with its fields,
every acknowledged refusal is still a refusal, no transfer is half-applied,
money is conserved, nothing is pending, and a replay gives the same state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from engine import InsufficientFunds, Ledger
from journal import CRASH_POINTS

ROOT = Path(__file__).resolve().parents[1]
CRASH_EXIT_CODE = 99
CHILD_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 60.0
CHECKPOINT_INTERVAL = 50
CRASH_COUNTS = {point: (40, 200) for point in CRASH_POINTS} | {"during-checkpoint": (8, 16)}
"""Die the N-th time a point is reached: early and late in the workload of ~1,000 transfers
(checkpoints come every 50 records, so the 8th is ~400 records in)."""
CRASH_SPECS = [f"{point}:{count}" for point in CRASH_POINTS for count in CRASH_COUNTS[point]]

pytestmark = pytest.mark.slow

CHILD = '''
import random, sys, threading
from engine import InsufficientFunds, Ledger, TransferRequest

path, threads, per_thread = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
accounts = [f"acct-{n}" for n in range(8)]
lock = threading.Lock()


def say(line):
    with lock:  # one line per write, flushed: os._exit(99) flushes nothing
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()


def request(thread, k):
    rng = random.Random(f"{thread}:{k}")
    source, destination = ("bank", rng.choice(accounts)) if rng.random() < 0.3 else rng.sample(accounts, 2)
    return TransferRequest(f"t{thread}-{k}", source, destination, rng.randint(1, 1000))


def single(ledger, thread):
    for k in range(per_thread):
        r = request(thread, k)
        try:
            ledger.transfer(r.id, source=r.source, destination=r.destination, amount=r.amount)
            say(f"A {r.id} {r.source} {r.destination} {r.amount}")
        except InsufficientFunds as refusal:
            say(f"R {r.id} {r.source} {r.destination} {r.amount} {refusal.code}")


def batches(ledger, thread):
    for first in range(0, per_thread, 10):
        requests = [request(thread, k) for k in range(first, first + 10)]
        for r, outcome in zip(requests, ledger.transfer_many(requests)):
            if isinstance(outcome, InsufficientFunds):
                say(f"R {r.id} {r.source} {r.destination} {r.amount} {outcome.code}")
            else:
                assert outcome.id == r.id, outcome
                say(f"A {r.id} {r.source} {r.destination} {r.amount}")


with Ledger.open(path, checkpoint_interval=int(sys.argv[4])) as ledger:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in accounts:
        ledger.create_account(name, currency="USD")
    say("workload")
    workers = [threading.Thread(target=batches if n == 0 else single, args=(ledger, n)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
say("finished")
'''


def tally(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT)


Outcomes = dict[str, tuple[str, str, int]]


def crash(tmp_path: Path, path: Path, spec: str) -> tuple[subprocess.CompletedProcess[str], Outcomes, Outcomes]:
    """Run the child with the crash point armed; return it and the (source, destination, amount)
    of every transfer it acknowledged as committed, and of every one it acknowledged as refused."""
    script = tmp_path / "crash_child.py"
    script.write_text(CHILD)
    env = dict(os.environ, TALLY_CRASH_AT=spec, PYTHONPATH=str(ROOT))  # this tree's engine, not another
    child = subprocess.run([sys.executable, str(script), str(path), "4", "250", str(CHECKPOINT_INTERVAL)],
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=ROOT)
    outcomes: dict[str, Outcomes] = {"A": {}, "R": {}}
    for line in child.stdout.splitlines():
        kind, *fields = line.split()
        if kind in outcomes:
            outcomes[kind][fields[0]] = (fields[1], fields[2], int(fields[3]))
    return child, outcomes["A"], outcomes["R"]


def assert_every_transfer_whole_and_money_conserved(ledger: Ledger) -> set[str]:
    """Every transfer with an entry has exactly its two (source debit, destination credit), balances
    sum to 0 and nothing is pending. Returns the ids of the transfers found."""
    legs: dict[str, list[tuple[str, int]]] = defaultdict(list)
    balances = {}
    for account in ledger.accounts():
        for entry in ledger.entries(account.id):
            legs[entry.transfer_id].append((account.id, entry.amount))
        balances[account.id] = ledger.balance(account.id)
    for tid, entries in legs.items():
        found = ledger.get_transfer(tid)
        assert found is not None, f"entries {entries} belong to no committed transfer {tid}"
        assert sorted(entries) == sorted([(found.source, -found.amount), (found.destination, found.amount)]), (
            f"transfer {tid} is half-applied or doubled: {entries}")
    assert sum(balance.posted for balance in balances.values()) == 0, balances
    assert all(balance.pending == 0 for balance in balances.values()), balances
    return set(legs)


def test_every_crash_point_is_exercised_early_and_late() -> None:
    assert {spec.partition(":")[0] for spec in CRASH_SPECS} == set(CRASH_POINTS)
    assert len(CRASH_SPECS) == 2 * len(CRASH_POINTS)


@pytest.mark.parametrize("spec", CRASH_SPECS)
def test_a_crash_at_each_point_loses_no_acknowledged_outcome_and_leaves_no_half_applied_transfer(
    tmp_path: Path, spec: str
) -> None:
    path = tmp_path / "ledger"
    child, acknowledged, refused = crash(tmp_path, path, spec)

    assert child.returncode == CRASH_EXIT_CODE, (child.returncode, child.stderr[-2000:])
    assert "workload" in child.stdout.splitlines(), "the crash came before the workload started"
    assert "finished" not in child.stdout.splitlines()
    assert acknowledged, "the crash came before any transfer was acknowledged"

    recovered = tally("recover", str(path), "--json")
    assert recovered.returncode == 0, (recovered.stdout, recovered.stderr)
    assert json.loads(recovered.stdout)["verdict"] == "whole"

    with Ledger.open(path) as ledger:
        for tid, fields in acknowledged.items():
            found = ledger.get_transfer(tid)
            assert found is not None, f"acknowledged transfer {tid} is gone"
            assert (found.source, found.destination, found.amount) == fields
            assert ledger.transfer(tid, source=fields[0], destination=fields[1], amount=fields[2]) == found
        for tid, (source, destination, amount) in refused.items():
            assert ledger.get_transfer(tid) is None, f"acknowledged refusal {tid} was committed"
            with pytest.raises(InsufficientFunds):  # journaled: a retry meets the same refusal
                ledger.transfer(tid, source=source, destination=destination, amount=amount)
        assert set(acknowledged) <= assert_every_transfer_whole_and_money_conserved(ledger)
        state_hash = ledger.state_hash()

    replayed = tally("replay", str(path), "--into", str(tmp_path / "replayed"), "--json")
    assert replayed.returncode == 0, (replayed.stdout, replayed.stderr)
    report = json.loads(replayed.stdout)
    assert report["verdict"] == "identical"
    assert report["state_hash_original"] == report["state_hash_replayed"] == state_hash


RECOVER_CRASH_POINTS = ("during-checkpoint", "mid-group-commit", "after-commit-durable")
"""The points `tally recover` itself passes while it writes its checkpoint."""


@pytest.mark.parametrize("point", RECOVER_CRASH_POINTS)
def test_a_recover_that_crashes_while_writing_its_checkpoint_leaves_a_ledger_the_next_recover_finishes(
    tmp_path: Path, point: str
) -> None:
    path = tmp_path / "ledger"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        for n in range(20):
            ledger.transfer(f"t-{n}", source="bank", destination="alice", amount=n + 1)
        state_hash = ledger.state_hash()
    env = dict(os.environ, TALLY_CRASH_AT=f"{point}:1", PYTHONPATH=str(ROOT))

    crashed = subprocess.run([sys.executable, "-m", "engine", "recover", str(path)], capture_output=True, text=True,
                             timeout=CLI_TIMEOUT_S, env=env, cwd=ROOT)
    assert crashed.returncode == CRASH_EXIT_CODE, (crashed.stdout, crashed.stderr)

    recovered = tally("recover", str(path), "--json")
    assert recovered.returncode == 0, (recovered.stdout, recovered.stderr)
    report = json.loads(recovered.stdout)
    assert report["verdict"] == "whole" and report["state_hash"] == state_hash
    with Ledger.open(path) as ledger:
        assert ledger.recovered.records == 0, "after a finished recover, opening replays nothing"
        assert ledger.state_hash() == state_hash
        assert ledger.balance("alice").posted == sum(range(1, 21))
