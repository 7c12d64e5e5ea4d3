"""SIGKILL a process in the middle of concurrent transfers, then recover its ledger.

A child process (a real `sys.executable`) opens the ledger and runs transfers
from several threads, printing one line per outcome it was told about, flushed
at once. The parent waits for enough acknowledgements, kills the child with
SIGKILL, opens the ledger itself and checks that every acknowledged transfer
survived, every refusal is still a refusal, nothing is left pending, money is
conserved and the entries are gapless running sums. It does this three times on
the same ledger, each new child continuing the workload where the last one died.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine import Balance, InsufficientFunds, Ledger, LedgerError, Transfer

ROOT = Path(__file__).resolve().parents[1]
KILLS = 3
ACKS_BEFORE_KILL = 300
WAIT_S = 30.0
"""Bound on each wait for the child: its output, its death, the ledger's calls."""
ACCOUNTS = ("a", "b", "c", "d", "e")
FUNDING = 1_000
CHECKPOINT_INTERVAL = 64
"""Small, so every child writes checkpoints and a kill can land near one."""

CHILD = """
import random, sys, threading
sys.path.insert(0, sys.argv[1])
from engine import InsufficientFunds, Ledger, LedgerError, TransferRequest

path, round_ = sys.argv[2], int(sys.argv[3])
ACCOUNTS, FUNDING, THREADS = {accounts!r}, {funding!r}, 6
lock = threading.Lock()

def emit(line):
    with lock:
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

import coordinator._checkpoint_rows
assert "CHECKPOINT_SWEEP_MIN" in vars(coordinator._checkpoint_rows)  # read there; moved, this fails (a plain assignment would not)
coordinator._checkpoint_rows.CHECKPOINT_SWEEP_MIN = 2  # checkpoints hold only what changed (see tests/conftest.py)
ledger = Ledger.open(path, timeout_s=30, checkpoint_interval={checkpoint_interval!r})
ledger.create_account("bank", currency="USD", overdraft_limit=None)  # idempotent: same every round
for name in ACCOUNTS:
    ledger.create_account(name, currency="USD")
for name in ACCOUNTS:
    ledger.transfer("fund-" + name, source="bank", destination=name, amount=FUNDING)

def report(request, outcome):
    fields = f"{{request.id}} {{request.source}} {{request.destination}} {{request.amount}}"
    if not isinstance(outcome, LedgerError):
        emit(f"ACK {{fields}} {{outcome.lsn}} {{outcome.timestamp}}")
    elif type(outcome) is InsufficientFunds:
        emit(f"REFUSED {{fields}}")
    else:
        emit(f"ERROR {{fields}} {{outcome!r}}")
        raise SystemExit(1)

def request(rng, tid):
    source, destination = rng.sample(ACCOUNTS, 2)
    return TransferRequest(tid, source, destination, rng.randint(1, 300))

def single(n):
    rng = random.Random(round_ * 1000 + n)
    for k in range(10**6):
        r = request(rng, f"r{{round_}}-w{{n}}-{{k}}")
        try:
            outcome = ledger.transfer(r.id, source=r.source, destination=r.destination, amount=r.amount)
        except LedgerError as error:
            outcome = error
        report(r, outcome)

def batches(n):
    rng = random.Random(round_ * 1000 + n)
    for k in range(10**6):
        batch = [request(rng, f"r{{round_}}-b{{n}}-{{k}}-{{i}}") for i in range(5)]
        for r, outcome in zip(batch, ledger.transfer_many(batch)):
            report(r, outcome)

emit("READY")
threads = [threading.Thread(target=single if n else batches, args=(n,)) for n in range(THREADS)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


@dataclass
class Told:
    """What the children were told, over every round."""

    acknowledged: dict[str, Transfer] = field(default_factory=dict)
    refused: dict[str, tuple[str, str, int]] = field(default_factory=dict)


def run_child_until_killed(script: Path, path: Path, round_: int, stderr_path: Path, told: Told) -> int:
    """Run a child until it has acknowledged ACKS_BEFORE_KILL transfers, SIGKILL it,
    and record every complete line it printed. Returns the acknowledgements seen."""
    with open(stderr_path, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(script), str(ROOT), str(path), str(round_)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
        )
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, name=f"child-{round_}-stdout", daemon=True)
    reader.start()
    acks = 0
    errors: list[str] = []
    deadline = time.monotonic() + WAIT_S
    try:
        while acks < ACKS_BEFORE_KILL:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"round {round_}: only {acks} acknowledgements in {WAIT_S} s") from None
            if line is None:
                raise AssertionError(f"round {round_}: the child exited early:\n{stderr_path.read_text()}")
            acks += record(line, told, errors)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=WAIT_S)
    assert child.returncode == -signal.SIGKILL
    reader.join(timeout=WAIT_S)
    assert not reader.is_alive(), "the child's stdout did not close after its death"
    while (line := lines.get_nowait()) is not None:  # what it printed before dying counts too
        acks += record(line, told, errors)
    assert errors == [], f"the child was told something other than a transfer or a refusal: {errors}"
    return acks


def record(line: str, told: Told, errors: list[str]) -> int:
    """Note one line of the child's; a line cut off by the kill (no newline) is ignored."""
    if not line.endswith("\n"):
        return 0
    kind, *fields = line.split()
    if kind == "ACK":
        tid, source, destination, amount, lsn, timestamp = fields
        told.acknowledged[tid] = Transfer(tid, source, destination, int(amount), int(lsn), int(timestamp))
        return 1
    if kind == "REFUSED":
        tid, source, destination, amount = fields
        told.refused[tid] = (source, destination, int(amount))
    elif kind != "READY":
        errors.append(line)
    return 0


def check_recovered(ledger: Ledger, told: Told) -> None:
    for tid, transfer in told.acknowledged.items():
        assert ledger.get_transfer(tid) == transfer, f"acknowledged transfer {tid} was lost or changed"
    for tid, (source, destination, amount) in told.refused.items():
        assert ledger.get_transfer(tid) is None
        try:
            ledger.transfer(tid, source=source, destination=destination, amount=amount)
        except LedgerError as error:
            assert type(error) is InsufficientFunds, f"retry of refused {tid}: {error!r}"
        else:
            raise AssertionError(f"refused transfer {tid} committed on retry after the crash")

    accounts = ledger.accounts()
    assert sorted(account.id for account in accounts) == sorted(("bank", *ACCOUNTS))
    in_entries: Counter[str] = Counter()
    total = 0
    for account in accounts:
        running = 0
        for seq, entry in enumerate(ledger.entries(account.id), start=1):
            running += entry.amount
            assert (entry.seq, entry.balance) == (seq, running), f"{account.id}: gap or wrong running balance"
            if account.overdraft_limit is not None:
                assert entry.balance >= -account.overdraft_limit, entry
            in_entries[entry.transfer_id] += 1
        assert ledger.balance(account.id) == Balance(running, 0, running), f"{account.id}: pending after recovery"
        total += running
    assert total == 0, "money is not conserved after the crash"
    assert all(in_entries[tid] == 2 for tid in told.acknowledged), "an acknowledged transfer lacks an entry"
    assert set(in_entries.values()) == {2}, "every committed transfer has exactly two entries"


def test_acknowledged_transfers_survive_sigkill_mid_workload_three_times(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(accounts=ACCOUNTS, funding=FUNDING, checkpoint_interval=CHECKPOINT_INTERVAL))
    path = tmp_path / "ledger"
    told = Told()
    acks_per_round = []
    for round_ in range(1, KILLS + 1):
        acks_per_round.append(run_child_until_killed(script, path, round_, tmp_path / f"stderr-{round_}", told))
        with Ledger.open(path, timeout_s=WAIT_S, checkpoint_interval=CHECKPOINT_INTERVAL) as ledger:
            check_recovered(ledger, told)
            state_hash = ledger.state_hash()
        with Ledger.open(path, timeout_s=WAIT_S) as reopened:
            assert reopened.state_hash() == state_hash, "a second recovery must rebuild the same state"
    assert all(acks >= ACKS_BEFORE_KILL for acks in acks_per_round)
    assert told.refused, "no refusal was seen: the overdraft check went untested"
