"""The rules: one pure function decides every transfer, and replay decides each commit again.

`rules.decide` is what the source's turn, the sequencer's stamping, a batch holding turns and
replay all call. Here it is checked on its own, and through replay: a commit record that
live operation could not have written (across currencies, past an overdraft limit, past the
largest balance) is damage, named by its LSN, however well its checksum checks out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from coordinator import INDEX_NAMES
from coordinator._audit import CHECK_LIMITS
from coordinator._records import COMMIT, TRANSFERS_INDEX, encode, id_key, lsn_value
from coordinator._rules import decide, refusal_of_accounts
from engine import Account, JournalCorrupted, Ledger
from journal import Journal

ROOT = Path(__file__).resolve().parents[1]
MAX = 2**63 - 1
USD = Account("a", "USD", 0)
USD_B = Account("b", "USD", 0)
UNLIMITED = Account("bank", "USD", None)
EUR = Account("e", "EUR", 0)


def test_a_transfer_between_two_accounts_stamps_the_next_entry_of_each() -> None:
    assert decide(30, USD, USD_B, (4, 100, 17), (9, 5, 12), 0) == (5, 70, 10, 35)


@pytest.mark.parametrize(
    ("source", "destination", "origin", "target", "reserved", "code"),
    [
        (None, USD_B, (0, 0, 0), (0, 0, 0), 0, "account_not_found"),
        (USD, None, (0, 0, 0), (0, 0, 0), 0, "account_not_found"),
        (USD, EUR, (1, 100, 1), (0, 0, 0), 0, "currency_mismatch"),
        (USD, USD_B, (1, 29, 1), (0, 0, 0), 0, "insufficient_funds"),
        (USD, USD_B, (1, 100, 1), (0, 0, 0), 71, "insufficient_funds"),  # what is reserved is not there to spend
        (Account("a", "USD", 10), USD_B, (1, 19, 1), (0, 0, 0), 0, "insufficient_funds"),
        (UNLIMITED, USD_B, (1, -MAX + 29, 1), (0, 0, 0), 0, "balance_overflow"),
        (USD, USD_B, (1, 100, 1), (1, MAX - 29, 1), 0, "balance_overflow"),
    ],
)
def test_the_rules_refuse_with_the_code_that_says_why(
    source: Account | None, destination: Account | None, origin: tuple, target: tuple, reserved: int, code: str
) -> None:
    assert decide(30, source, destination, origin, target, reserved) == code


def test_an_overdraft_limit_lets_the_balance_reach_minus_the_limit_exactly() -> None:
    assert decide(30, Account("a", "USD", 10), USD_B, (1, 20, 1), (0, 0, 0), 0) == (2, -10, 1, 30)
    assert decide(30, UNLIMITED, USD_B, (1, -MAX + 30, 1), (0, 0, 0), 0) == (2, -MAX, 1, 30)


def test_the_accounts_alone_refuse_before_any_state_is_looked_at() -> None:
    assert refusal_of_accounts(USD, EUR) == "currency_mismatch"
    assert refusal_of_accounts(None, EUR) == "account_not_found"
    assert refusal_of_accounts(USD, USD_B) is None


def _ledger_with_a_forged_commit(path: Path, source: str, destination: str, amount: int, stamp: tuple) -> int:
    """A closed ledger, then a commit record with a valid checksum that the rules refuse,
    appended through the journal as the engine writes one; its LSN."""
    with Ledger.open(path, checkpoint_interval=10**6) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.create_account("euro", currency="EUR")
        ledger.transfer("fund", source="bank", destination="alice", amount=100)
    journal = Journal.open(path, index_names=INDEX_NAMES)
    try:
        lsn = journal.last_lsn + 1
        record = encode([COMMIT, "forged", source, destination, amount, *stamp])
        appended = journal.append(record, [(TRANSFERS_INDEX, id_key("forged"), lsn_value(lsn))])
        assert appended == lsn
        journal.wait_durable(lsn, 10.0)
    finally:
        journal.close()
    return lsn


@pytest.mark.parametrize(
    ("source", "destination", "amount", "stamp", "says"),
    [
        ("alice", "euro", 10, (2, 90, 1, 10), "different currencies"),
        ("alice", "bank", 500, (2, -400, 2, -99_500), "overdraft limit"),
    ],
    ids=["across currencies", "past the overdraft limit"],
)
def test_a_commit_the_rules_refuse_is_damage_at_its_lsn_however_good_its_checksum(
    tmp_path: Path, source: str, destination: str, amount: int, stamp: tuple, says: str
) -> None:
    path = tmp_path / "ledger"
    lsn = _ledger_with_a_forged_commit(path, source, destination, amount, stamp)

    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path)
    assert caught.value.lsn == lsn and says in str(caught.value)
    done = subprocess.run([sys.executable, "-m", "engine", "verify", str(path), "--json"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["corrupt_lsn"] == lsn
    assert report["checks"][CHECK_LIMITS] is False
