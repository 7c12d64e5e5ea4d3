"""`create_accounts`: many accounts at once, one outcome each, by `create_account`'s rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator import ACCOUNTS_PER_BLOCK_MAX
from coordinator._sequencer import Sequencer
from engine import Account, AccountExists, InvalidRequest, Ledger, LedgerClosed, Transfer
from engine._tools_audit import verify
from support import interrupt_after


def test_each_item_gets_the_outcome_create_account_would_give_it(ledger: Ledger) -> None:
    ledger.create_account("old", currency="USD")
    outcomes = ledger.create_accounts([
        Account("a", "USD", 0),
        Account("a", "USD", 0),  # the same again: idempotent
        Account("a", "EUR", 0),  # the same id, other fields
        Account("old", "USD", 0),  # exists already, the same
        Account("old", "USD", None),  # exists already, other limit
        Account("", "USD", 0),
        Account("b", "usd!", 0),
        Account("c", "USD", -1),
        Account("d", "USD", 0, code=70_000),
        Account("e", "USD", 5, code=7, metadata={"team": "ops", "n": 3}),  # type: ignore[arg-type]
        "f",  # type: ignore[list-item]
    ])
    assert outcomes[0] == outcomes[1] == Account("a", "USD", 0)
    assert isinstance(outcomes[2], AccountExists)
    assert str(outcomes[2]) == "account 'a' exists with other fields: USD, overdraft_limit 0, code 0, no metadata"
    assert outcomes[3] == Account("old", "USD", 0)
    assert isinstance(outcomes[4], AccountExists)
    assert str(outcomes[4]) == "account 'old' exists with other fields: USD, overdraft_limit 0, code 0, no metadata"
    assert all(isinstance(outcome, InvalidRequest) for outcome in outcomes[5:9])
    made = outcomes[9]
    assert isinstance(made, Account) and made.metadata is not None and made.metadata.as_dict() == {"team": "ops", "n": 3}
    assert isinstance(outcomes[10], InvalidRequest)
    assert [account.id for account in ledger.accounts()] == ["old", "a", "e"]
    assert ledger.create_account("e", currency="USD", overdraft_limit=5, code=7, metadata={"team": "ops", "n": 3}) == made


def test_a_list_longer_than_a_block_is_durable_in_order_and_usable(ledger_path: Path) -> None:
    count = ACCOUNTS_PER_BLOCK_MAX * 2 + 7
    wanted = [Account(f"n{k}", "USD", None if k == 0 else 0) for k in range(count)]
    with Ledger.open(ledger_path, checkpoint_interval=500) as ledger:
        assert ledger.create_accounts(wanted) == wanted
        assert isinstance(ledger.transfer("t", source="n0", destination=f"n{count - 1}", amount=9), Transfer)
    with Ledger.open(ledger_path) as reopened:
        assert reopened.accounts() == wanted
        assert reopened.balance(f"n{count - 1}").posted == 9
        assert reopened.create_accounts(wanted[:3]) == wanted[:3]  # again: idempotent, nothing new
    assert verify(str(ledger_path))["verdict"] == "whole"


@pytest.mark.parametrize("value", [None, "abc", b"abc", 5, Account("a", "USD", 0)])
def test_create_accounts_refuses_what_is_not_a_sequence(ledger: Ledger, value: object) -> None:
    with pytest.raises(InvalidRequest):
        ledger.create_accounts(value)  # type: ignore[arg-type]
    assert ledger.accounts() == []


def test_an_empty_list_creates_nothing(ledger: Ledger) -> None:
    assert ledger.create_accounts([]) == []
    assert ledger.accounts() == []


@pytest.mark.parametrize("many", [False, True], ids=["create_account", "create_accounts"])
def test_an_interrupt_out_of_an_accounts_queued_record_leaves_it_opened_once(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch, many: bool) -> None:
    """An interrupt comes out of the journal's append once the account's record is queued:
    memory still takes the account, so the retry finds it (the same account: returned)
    instead of journaling it a second time, which no reopen would accept."""
    ledger = Ledger.open(ledger_path)
    try:
        journal = ledger._journal
        interrupt_after(monkeypatch, journal, "append_block" if many else "append")  # once the record is queued
        account = Account("x", "USD", 0)
        with pytest.raises(KeyboardInterrupt):
            if many:
                ledger.create_accounts([account])
            else:
                ledger.create_account("x", currency="USD")
        last_lsn = journal.last_lsn
        assert (ledger.create_accounts([account]) if many else [ledger.create_account("x", currency="USD")]) == [account]
        assert journal.last_lsn == last_lsn, "the retry journaled nothing"
    finally:
        ledger.close()
    with Ledger.open(ledger_path) as reopened:
        assert reopened.accounts() == [account]
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_a_list_the_closing_journal_cut_short_answers_each_account(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal closes (as `Ledger.close` closes it once its wait for calls runs out)
    after the first block of a long list: that block's accounts are opened and answered,
    the rest `LedgerClosed`, never one `LedgerClosed` for the whole list, which tells its
    caller none was opened."""
    ledger = Ledger.open(ledger_path)
    real = Sequencer.open_accounts
    blocks = [0]

    def closing_before_the_second(self: Sequencer, accounts: Any) -> int:
        blocks[0] += 1
        if blocks[0] == 2:
            ledger._journal.close()
        return real(self, accounts)

    monkeypatch.setattr(Sequencer, "open_accounts", closing_before_the_second)
    count = ACCOUNTS_PER_BLOCK_MAX + 5
    try:
        results = ledger.create_accounts([Account(f"a{n}", "USD", 0) for n in range(count)])
    finally:
        ledger.close()
    assert [type(result) for result in results] == [Account] * ACCOUNTS_PER_BLOCK_MAX + [LedgerClosed] * 5
    with Ledger.open(ledger_path) as reopened:
        assert reopened.accounts() == results[:ACCOUNTS_PER_BLOCK_MAX]
    assert verify(str(ledger_path))["verdict"] == "whole"
