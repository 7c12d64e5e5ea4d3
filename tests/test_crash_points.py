"""Crash a real process at each named crash point, recover with `tally recover`, and check the books.

The child (a script written into the test's directory) opens a ledger on the wall clock,
opens accounts, and runs from several threads: single transfers, batches, pending
transfers (some with a one-second timeout, so the ledger's own expirer expires them while
the workload runs) that it posts in full or in part, voids or leaves open, and linked
chains of two or three legs (some of them pending, some refused). Before each call it
prints the ids it is about to use; after each call returns (its outcome durable) it prints
the outcome, one line each, flushed. `TALLY_CRASH_AT=NAME:N` ends it with exit code 99 at
the N-th time it reaches the point, in the middle of the workload.

Then, after `tally recover`: every acknowledged transfer, pending transfer, post, void and
chain is there with its fields (a retry returns it), every acknowledged refusal is still a
refusal; no transfer is half-applied (a single transfer or a post has exactly its debit and
credit, a pending transfer or a void none, a chain all of its legs or none); money is
conserved; every account's pending and incoming are the sums of its open pending transfers
(no protocol reservation survives); every acknowledged pending transfer still open can be
posted or voided (one past its deadline expired as the ledger opened); and a replay gives
the same state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from engine import (
    BalanceOverflow,
    ExceedsPendingAmount,
    InsufficientFunds,
    Ledger,
    LedgerError,
    LinkedTransferFailed,
    PendingTransferAlreadyPosted,
    PendingTransferAlreadyVoided,
    PendingTransferExpired,
    PendingTransferNotFound,
    Transfer,
    TransferRequest,
)
from journal import CRASH_POINTS

ROOT = Path(__file__).resolve().parents[1]
CRASH_EXIT_CODE = 99
CHILD_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 60.0
CHECKPOINT_INTERVAL = 50
NS_PER_S = 1_000_000_000
CRASH_COUNTS = {point: (40, 200) for point in CRASH_POINTS} | {
    "during-checkpoint": (8, 16),
    "during-expiry": (3, 80),
    "mid-linked-chain": (20, 150),
}
"""Die the N-th time a point is reached: early and late in the workload. Measured unarmed
(the same workload to its end, ~2 s): 750 single transfers, thousands of pending transfers,
posts and voids; a checkpoint every 50 records, ~115 in all, so the 16th is ~800 records in;
~370 expiry records, from a second in (the shortest timeout) to the end, the 80th ~0.45 s
after the first; slices of a checkpoint's entries written behind it ~1,000 times (8 entries a
group commit at least, ~100 a checkpoint); 300 chains, ~230 committed, the point met once per leg (~610 times) when a
chain is decided in the accounts' turns, once per chain in the mailboxes, so the 150th comes
before the end either way."""
CRASH_SPECS = [f"{point}:{count}" for point in CRASH_POINTS for count in CRASH_COUNTS[point]]

REFUSALS: dict[str, type[LedgerError]] = {
    cls.code: cls
    for cls in (InsufficientFunds, BalanceOverflow, PendingTransferNotFound, PendingTransferAlreadyPosted,
                PendingTransferAlreadyVoided, PendingTransferExpired, ExceedsPendingAmount)
}
"""The refusals the child may be told of, by code."""

pytestmark = pytest.mark.slow

CHILD = '''
import json, random, sys, threading
from engine import InsufficientFunds, Ledger, LinkedTransferFailed, PendingTransferExpired, TransferRequest

path, threads, per_thread, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import journal._commits
assert "BEHIND_PAIRS_MIN" in vars(journal._commits)  # read there; moved, this fails (a plain assignment would not)
journal._commits.BEHIND_PAIRS_MIN = 8  # a checkpoint's entries in slices of a few, over many group commits

chains_wanted, expiries_wanted = int(sys.argv[5]), int(sys.argv[6])
accounts = [f"acct-{n}" for n in range(8)]
lock = threading.Lock()
REFUSED = (InsufficientFunds, PendingTransferExpired)  # the refusals this workload can meet


def say(kind, **fields):
    with lock:  # one line per write, flushed: os._exit(99) flushes nothing
        sys.stdout.write(kind + " " + json.dumps(fields) + "\\n")
        sys.stdout.flush()


def fields(r):
    return dict(id=r.id, source=r.source, destination=r.destination, amount=r.amount, pending=r.pending,
                timeout_s=r.timeout_s)


def request(rng, tid, pending=False, timeout_s=None):
    source, destination = ("bank", rng.choice(accounts)) if rng.random() < 0.3 else rng.sample(accounts, 2)
    return TransferRequest(tid, source, destination, rng.randint(1, 1000), pending=pending, timeout_s=timeout_s)


def transfer(ledger, r):
    say("I", ids=[r.id])
    try:
        made = ledger.transfer(r.id, source=r.source, destination=r.destination, amount=r.amount, pending=r.pending,
                               timeout_s=r.timeout_s)
    except REFUSED as refusal:
        say("R", code=refusal.code, **fields(r))
        return None
    say("A", timestamp=made.timestamp, **fields(r))
    return made


def single(ledger, thread):
    for k in range(per_thread):
        transfer(ledger, request(random.Random(f"{thread}:{k}"), f"t{thread}-{k}"))


def batches(ledger, thread):
    for first in range(0, per_thread, 10):
        requests = [request(random.Random(f"{thread}:{k}"), f"t{thread}-{k}") for k in range(first, first + 10)]
        say("I", ids=[r.id for r in requests])
        for r, outcome in zip(requests, ledger.transfer_many(requests)):
            if isinstance(outcome, InsufficientFunds):
                say("R", code=outcome.code, **fields(r))
            else:
                assert outcome.id == r.id, outcome
                say("A", timestamp=outcome.timestamp, **fields(r))


def resolve(ledger, tid, pending_id, amount=None, void=False):
    say("I", ids=[tid])
    try:
        if void:
            made = ledger.void_pending(tid, pending_id=pending_id)
        else:
            made = ledger.post_pending(tid, pending_id=pending_id, amount=amount)
    except REFUSED as refusal:
        say("RS", id=tid, pending_id=pending_id, amount=amount, void=void, code=refusal.code)
        return
    say("S", id=tid, pending_id=pending_id, amount=amount, void=void, moved=made.amount)


def pending(ledger, thread):
    """Pending transfers: a third posted at once (in full or in part), a sixth voided, the rest
    left open, most of those with a 1 s timeout, which the expirer expires; now and then a late
    post of one left open (refused once it expired). Goes on until it has seen
    `expiries_wanted` of its own expire."""
    rng = random.Random(f"pending:{thread}")
    waiting = []  # left open with a timeout, oldest first
    expired = k = 0
    while k < per_thread or (expired < expiries_wanted and k < 40 * per_thread):  # bounded if none expire
        pid = f"p{thread}-{k}"
        made = transfer(ledger, request(rng, pid, pending=True, timeout_s=rng.choice((1, 1, 1, None, 3600))))
        if made is not None:
            choice = rng.random()
            if choice < 0.2:
                resolve(ledger, f"s{thread}-{k}", pid)
            elif choice < 0.35:
                resolve(ledger, f"s{thread}-{k}", pid, amount=rng.randint(1, made.amount))
            elif choice < 0.5:
                resolve(ledger, f"s{thread}-{k}", pid, void=True)
            elif made.timeout_s == 1:
                waiting.append(pid)
        if waiting and rng.random() < 0.05:  # a late post: in time, or refused as expired
            resolve(ledger, f"late{thread}-{k}", waiting.pop(0), amount=1)
        while waiting and ledger.get_transfer(waiting[0]).status != "pending":
            waiting.pop(0)
            expired += 1
        k += 1


def linked(ledger, thread):
    """`chains_wanted` chains of 2 or 3 legs: money from the bank passed on, some legs pending; the last leg
    of one in five asks for more than its source has (the chain is refused whole)."""
    rng = random.Random(f"linked:{thread}")
    for k in range(chains_wanted):
        first, second, third = rng.sample(accounts, 3)
        amount = rng.randint(1, 500)
        legs = [TransferRequest(f"l{thread}-{k}-0", "bank", first, amount),
                TransferRequest(f"l{thread}-{k}-1", first, second, rng.randint(1, amount),
                                pending=rng.random() < 0.3, timeout_s=rng.choice((None, 1)))]
        if rng.random() < 0.5:
            legs.append(TransferRequest(f"l{thread}-{k}-2", second, third, rng.randint(1, 200),
                                        pending=rng.random() < 0.3, timeout_s=rng.choice((None, 1))))
        if rng.random() < 0.2:
            legs[-1] = TransferRequest(legs[-1].id, legs[-1].source, legs[-1].destination, 10**9)
        legs = [r if r.pending else TransferRequest(r.id, r.source, r.destination, r.amount) for r in legs]
        say("I", ids=[r.id for r in legs], chain=True)
        try:
            made = ledger.transfer_linked(legs)
        except LinkedTransferFailed as failure:
            say("RL", legs=[fields(r) for r in legs], index=failure.index, code=failure.cause.code)
            continue
        say("L", legs=[fields(r) for r in legs], lsn=made[0].lsn, timestamps=[t.timestamp for t in made])


import coordinator._checkpoint_rows
assert "CHECKPOINT_SWEEP_MIN" in vars(coordinator._checkpoint_rows)  # read there; moved, this fails (a plain assignment would not)
coordinator._checkpoint_rows.CHECKPOINT_SWEEP_MIN = 2  # checkpoints hold only what changed (see tests/conftest.py)
with Ledger.open(path, checkpoint_interval=interval) as ledger:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in accounts:
        ledger.create_account(name, currency="USD")
    say("workload")
    roles = [batches, linked, pending] + [single] * (threads - 3)
    workers = [threading.Thread(target=role, args=(ledger, n)) for n, role in enumerate(roles)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
say("finished")
'''
CHILD_ARGS = ("5", "250", str(CHECKPOINT_INTERVAL), "300", "300")
"""Threads (batches, chains, pending, two of single transfers), transfers per thread,
checkpoint interval, chains, expiries the pending thread waits to see."""


def tally(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT)


@dataclass
class Outcomes:
    """What the child said: every id it was about to use, and each acknowledged outcome."""

    intended: list[tuple[list[str], bool]] = field(default_factory=list)
    """Each call's ids, and whether they are a linked chain's."""
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Acknowledged transfers (single or pending), by id: their fields and timestamp."""
    refused: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Acknowledged refusals of transfers, by id: their fields and the refusal's code."""
    resolutions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Acknowledged posts and voids, by id (`moved`: the amount of the Transfer made)."""
    resolutions_refused: dict[str, dict[str, Any]] = field(default_factory=dict)
    chains: list[dict[str, Any]] = field(default_factory=list)
    """Acknowledged chains: their legs, LSN and timestamps."""
    chains_refused: list[dict[str, Any]] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)


def crash(tmp_path: Path, path: Path, spec: str) -> tuple[subprocess.CompletedProcess[str], Outcomes]:
    """Run the child with the crash point armed; return it and what it said."""
    script = tmp_path / "crash_child.py"
    script.write_text(CHILD)
    env = dict(os.environ, TALLY_CRASH_AT=spec, PYTHONPATH=str(ROOT))  # this tree's engine, not another
    child = subprocess.run([sys.executable, str(script), str(path), *CHILD_ARGS],
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=ROOT)
    return child, parse(child.stdout)


def parse(stdout: str) -> Outcomes:
    said = Outcomes()
    for line in stdout.splitlines():
        kind, _, payload = line.partition(" ")
        fields = json.loads(payload)
        if kind in ("workload", "finished"):
            said.markers.append(kind)
        elif kind == "I":
            said.intended.append((fields["ids"], fields.get("chain", False)))
        elif kind == "A":
            said.transfers[fields["id"]] = fields
        elif kind == "R":
            said.refused[fields["id"]] = fields
        elif kind == "S":
            said.resolutions[fields["id"]] = fields
        elif kind == "RS":
            said.resolutions_refused[fields["id"]] = fields
        elif kind == "L":
            said.chains.append(fields)
        elif kind == "RL":
            said.chains_refused.append(fields)
        else:
            raise AssertionError(f"the child said {line!r}")
    return said


def request_of(fields: dict[str, Any]) -> TransferRequest:
    return TransferRequest(fields["id"], fields["source"], fields["destination"], fields["amount"],
                           pending=fields["pending"], timeout_s=fields["timeout_s"])


def retry(ledger: Ledger, r: TransferRequest) -> Transfer:
    return ledger.transfer(r.id, source=r.source, destination=r.destination, amount=r.amount, pending=r.pending,
                           timeout_s=r.timeout_s)


def resolve(ledger: Ledger, fields: dict[str, Any]) -> Transfer:
    if fields["void"]:
        return ledger.void_pending(fields["id"], pending_id=fields["pending_id"])
    return ledger.post_pending(fields["id"], pending_id=fields["pending_id"], amount=fields["amount"])


def deadline(transfer: Transfer) -> int:
    """When a pending transfer expires (0: never)."""
    return 0 if transfer.timeout_s is None else transfer.timestamp + transfer.timeout_s * NS_PER_S


def assert_acknowledged_outcomes_kept(ledger: Ledger, said: Outcomes) -> None:
    """Every acknowledged outcome is there with its fields, and a retry meets it again."""
    for tid, fields in said.transfers.items():
        found = ledger.get_transfer(tid)
        assert found is not None, f"acknowledged transfer {tid} is gone"
        kind = "pending" if fields["pending"] else "single"
        assert (found.source, found.destination, found.amount, found.kind, found.timeout_s, found.timestamp) == (
            fields["source"], fields["destination"], fields["amount"], kind, fields["timeout_s"], fields["timestamp"])
        again = retry(ledger, request_of(fields))  # the Transfer as decided: its status then
        assert again.status == ("pending" if fields["pending"] else "posted")
        assert replace(again, status=found.status) == found
    for tid, fields in said.refused.items():
        assert ledger.get_transfer(tid) is None, f"acknowledged refusal {tid} was committed"
        with pytest.raises(REFUSALS[fields["code"]]):  # journaled: a retry meets the same refusal
            retry(ledger, request_of(fields))
    for tid, fields in said.resolutions.items():
        found = ledger.get_transfer(tid)
        assert found is not None, f"acknowledged {'void' if fields['void'] else 'post'} {tid} is gone"
        pending = ledger.get_transfer(fields["pending_id"])
        assert pending is not None and found.pending_id == fields["pending_id"]
        assert (found.kind, found.amount, found.source, found.destination) == (
            "void" if fields["void"] else "post", fields["moved"], pending.source, pending.destination)
        assert pending.status == ("voided" if fields["void"] else "posted"), (found, pending)
        assert resolve(ledger, fields) == found
    for tid, fields in said.resolutions_refused.items():
        assert ledger.get_transfer(tid) is None, f"acknowledged refusal {tid} was committed"
        with pytest.raises(REFUSALS[fields["code"]]):
            resolve(ledger, fields)
    for chain in said.chains:
        legs = [request_of(leg) for leg in chain["legs"]]
        there = [ledger.get_transfer(leg.id) for leg in legs]
        assert all(made is not None for made in there), f"an acknowledged chain lost legs: {there}"
        kept = [made for made in there if made is not None]
        assert [(made.id, made.source, made.destination, made.amount, made.lsn, made.timestamp) for made in kept] == [
            (leg.id, leg.source, leg.destination, leg.amount, chain["lsn"], timestamp)
            for leg, timestamp in zip(legs, chain["timestamps"], strict=True)]
        retried = ledger.transfer_linked(legs)  # the Transfers as decided: their statuses then
        assert [replace(made, status=now.status) for made, now in zip(retried, kept, strict=True)] == kept
    for chain in said.chains_refused:
        legs = [request_of(leg) for leg in chain["legs"]]
        assert all(ledger.get_transfer(leg.id) is None for leg in legs), f"a refused chain moved: {legs}"
        with pytest.raises(LinkedTransferFailed) as failed:
            ledger.transfer_linked(legs)
        assert (failed.value.index, failed.value.cause.code) == (chain["index"], chain["code"])


def assert_every_transfer_whole_and_money_conserved(ledger: Ledger, said: Outcomes) -> dict[str, Transfer]:
    """Every transfer with an entry is a single transfer or a post with exactly its two (source
    debit, destination credit), and every one the child may have made has them; a pending
    transfer or a void has none; a chain has all of its legs, in one record, or none. Balances
    sum to 0, and each account's pending and incoming are the sums of its open pending
    transfers. Returns every transfer the child may have made that is there, by id."""
    legs: dict[str, list[tuple[str, int]]] = defaultdict(list)
    balances = {}
    for account in ledger.accounts():
        for entry in ledger.entries(account.id):
            legs[entry.transfer_id].append((account.id, entry.amount))
        balances[account.id] = ledger.balance(account.id)
    found: dict[str, Transfer] = {}
    for ids, chain in said.intended:
        looked_up = {tid: ledger.get_transfer(tid) for tid in ids}
        present = {tid: transfer for tid, transfer in looked_up.items() if transfer is not None}
        if chain:
            assert len(present) in (0, len(ids)), f"chain {ids} is half-applied: only {sorted(present)}"
            assert len({transfer.lsn for transfer in present.values()}) <= 1, f"chain {ids} is not one record"
        found.update(present)
    for tid, entries in legs.items():
        owner = found.get(tid) or ledger.get_transfer(tid)
        assert owner is not None, f"entries {entries} belong to no committed transfer {tid}"
        assert owner.kind in ("single", "post"), f"{owner} has entries {entries}"
    for tid, made in found.items():
        expected = [(made.source, -made.amount), (made.destination, made.amount)] if made.kind in (
            "single", "post") else []
        assert sorted(legs.get(tid, [])) == sorted(expected), (
            f"transfer {made} is half-applied or doubled: {legs.get(tid, [])}")
    assert sum(balance.posted for balance in balances.values()) == 0, balances
    held: dict[str, int] = defaultdict(int)
    incoming: dict[str, int] = defaultdict(int)
    for made in found.values():
        if made.kind == "pending" and made.status == "pending":
            held[made.source] += made.amount
            incoming[made.destination] += made.amount
    for account_id, balance in balances.items():
        assert (balance.pending, balance.incoming) == (held[account_id], incoming[account_id]), (
            f"{account_id}: {balance}, but its open pending transfers hold {held[account_id]} and bring "
            f"{incoming[account_id]}: a reservation survived, or a hold was lost")
        assert balance.available == balance.posted - balance.pending
    return found


def assert_open_pending_transfers_can_be_resolved(ledger: Ledger, said: Outcomes, found: dict[str, Transfer],
                                                  now: int) -> None:
    """Every acknowledged pending transfer (alone or a chain's leg) is open unless resolved before
    the crash or past its deadline as the ledger opened at `now` (then expired, and a post is
    refused as such); each open one is posted in full, in part, or voided, one of each in turn
    (and counted among the transfers `said` may have made, for the checks that follow)."""
    acknowledged = [tid for tid, fields in said.transfers.items() if fields["pending"]]
    acknowledged += [leg["id"] for chain in said.chains for leg in chain["legs"] if leg["pending"]]
    resolved = {fields["pending_id"] for fields in said.resolutions.values()}
    for n, tid in enumerate(acknowledged):
        pending = found[tid]
        due = deadline(pending)
        if pending.status == "expired":
            assert 0 < due <= now, f"{pending} expired, but its deadline is {due} (the ledger opened at {now})"
            with pytest.raises(PendingTransferExpired):
                ledger.post_pending(f"after-{tid}", pending_id=tid)
            continue
        if pending.status != "pending":
            assert tid in resolved or any(tid == made.pending_id for made in found.values()), (
                f"{pending} is {pending.status}, but nothing the child did resolves it")
            continue
        assert tid not in resolved, f"{pending} is open, but its {pending.status} was acknowledged"
        assert not 0 < due <= now, f"{pending} is past its deadline, yet open after the ledger opened at {now}"
        if 0 < due <= now + NS_PER_S // 1000:  # within a millisecond of its deadline: either outcome is fine
            continue
        how = n % 3
        resolution = (ledger.void_pending(f"after-{tid}", pending_id=tid) if how == 2 else
                      ledger.post_pending(f"after-{tid}", pending_id=tid, amount=None if how == 0 else 1))
        assert (resolution.kind, resolution.pending_id, resolution.source, resolution.destination,
                resolution.amount) == ("void" if how == 2 else "post", tid, pending.source, pending.destination,
                                       1 if how == 1 else pending.amount)
        now_there = ledger.get_transfer(tid)
        assert now_there is not None and now_there.status == ("voided" if how == 2 else "posted")
        said.intended.append(([f"after-{tid}"], False))


def test_every_crash_point_is_exercised_early_and_late() -> None:
    assert {spec.partition(":")[0] for spec in CRASH_SPECS} == set(CRASH_POINTS)
    assert len(CRASH_SPECS) == 2 * len(CRASH_POINTS)
    assert all(early < late for early, late in CRASH_COUNTS.values())


@pytest.mark.parametrize("spec", CRASH_SPECS)
def test_a_crash_at_each_point_loses_no_acknowledged_outcome_and_leaves_no_half_applied_transfer(
    tmp_path: Path, spec: str
) -> None:
    path = tmp_path / "ledger"
    child, said = crash(tmp_path, path, spec)

    assert child.returncode == CRASH_EXIT_CODE, (child.returncode, child.stderr[-2000:])
    assert "workload" in said.markers, "the crash came before the workload started"
    assert "finished" not in said.markers
    assert said.transfers, "the crash came before any transfer was acknowledged"

    recovered = tally("recover", str(path), "--json")
    assert recovered.returncode == 0, (recovered.stdout, recovered.stderr)
    assert json.loads(recovered.stdout)["verdict"] == "whole"

    now = time.time_ns()  # the clock stands still while the books are checked: no expiry behind the checks
    with Ledger.open(path, clock_ns=lambda: now) as ledger:
        assert_acknowledged_outcomes_kept(ledger, said)
        found = assert_every_transfer_whole_and_money_conserved(ledger, said)
        assert set(said.transfers) <= set(found)
        assert_open_pending_transfers_can_be_resolved(ledger, said, found, now)
        assert_every_transfer_whole_and_money_conserved(ledger, said)
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
