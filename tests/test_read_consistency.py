"""Reads that must agree with each other while records land: nothing committed but not yet
released shows in one read and not another; a read-only ledger's `get_transfer`
and `outcome` follow the writer as its other reads do; `transfers(account=...)` knows the
accounts `balance` and `entries` know, at the same LSN; a balance at a timestamp the clock has
passed never changes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine import AccountNotFound, Ledger, Transfer
from support import hold_after_commit

WAIT_S = 10.0


def test_a_record_committed_but_not_yet_released_is_shown_by_no_read(ledger_path: Path) -> None:
    """Between LMDB's commit of a record and its release to the callers waiting on it (the
    durable LSN advanced), no read shows it: not `get_transfer` or `outcome` while `entries`
    does not, which would show a transfer whose entries are missing. Once released, all do."""
    ledger = Ledger.open(ledger_path)
    try:
        for name in ("a", "b"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        committed, release = hold_after_commit(ledger)
        results: list[Any] = []
        caller = threading.Thread(
            target=lambda: results.append(ledger.transfer("t-1", source="a", destination="b", amount=10)))
        caller.start()
        try:
            assert committed.wait(WAIT_S)
            assert ledger._journal.durable_lsn < ledger._journal.last_lsn
            assert ledger.get_transfer("t-1") is None
            assert ledger.outcome("t-1") is None
            assert ledger.entries("a") == []  # (`balance` waits for the release)
        finally:
            release.set()
            caller.join(WAIT_S)
        assert [type(result) for result in results] == [Transfer]
        assert ledger.get_transfer("t-1") == results[0] == ledger.outcome("t-1")
        assert [entry.transfer_id for entry in ledger.entries("a")] == ["t-1"]
        assert ledger.balance("b").posted == 10
    finally:
        ledger.close()


def test_a_read_only_ledger_shows_a_transfer_made_after_it_opened(tmp_path: Path) -> None:
    path = tmp_path / "l"
    with Ledger.open(path) as ledger:
        ledger.create_account("a", currency="USD", overdraft_limit=None)
        ledger.create_account("b", currency="USD")
    with Ledger.open(path, readonly=True) as reader:
        script = f"""
            from engine import Ledger
            with Ledger.open({str(path)!r}) as ledger:
                ledger.transfer("t-1", source="a", destination="b", amount=7)
        """
        subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, timeout=60)
        assert [entry.transfer_id for entry in reader.entries("b")] == ["t-1"]
        found = reader.get_transfer("t-1")
        assert found is not None and found.amount == 7
        assert reader.outcome("t-1") == found


def test_transfers_of_an_account_opened_after_a_snapshot_are_refused_as_its_balance_is(ledger_path: Path) -> None:
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("a", currency="USD")
        with ledger.snapshot() as snapshot:
            ledger.create_account("x", currency="USD")
            with pytest.raises(AccountNotFound):
                snapshot.balance("x")
            with pytest.raises(AccountNotFound):
                snapshot.transfers(account="x")
        assert ledger.transfers(account="x") == []


def test_no_read_shows_an_account_committed_but_not_yet_released(ledger_path: Path) -> None:
    ledger = Ledger.open(ledger_path)
    try:
        committed, release = hold_after_commit(ledger)
        opening = threading.Thread(target=lambda: ledger.create_account("y", currency="USD"))
        opening.start()
        try:
            assert committed.wait(WAIT_S)
            assert "y" not in {account.id for account in ledger.accounts()}
            with pytest.raises(AccountNotFound):
                ledger.transfers(account="y")
        finally:
            release.set()
            opening.join(WAIT_S)
        assert ledger.transfers(account="y") == []
    finally:
        ledger.close()


def test_a_balance_at_a_timestamp_the_clock_passed_never_changes(ledger_path: Path) -> None:
    ledger = Ledger.open(ledger_path)
    try:
        for name in ("a", "b"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        committed, release = hold_after_commit(ledger)
        caller = threading.Thread(target=lambda: ledger.transfer("t-1", source="a", destination="b", amount=10))
        caller.start()
        results: list[Any] = []
        try:
            assert committed.wait(WAIT_S)
            at = time.time_ns()  # after t-1 was stamped, before it is released
            reading = threading.Thread(target=lambda: results.append(ledger.balance("b", at_timestamp=at)))
            reading.start()
            reading.join(0.2)  # it waits for t-1, which was stamped before `at`
        finally:
            release.set()
            caller.join(WAIT_S)
        reading.join(WAIT_S)
        assert [balance.posted for balance in results] == [10]
        assert ledger.balance("b", at_timestamp=at).posted == 10
    finally:
        ledger.close()
