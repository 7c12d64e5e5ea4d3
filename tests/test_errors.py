"""The error table, row by row: what each error means, and what it leaves written.

Rows that write nothing are checked by comparing the whole observable ledger
(state hash, journal counters, balances) before and after. Rows that consume the
transfer id are checked by the journal record they add and by a retry that
raises the same error even once the cause is gone.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from coordinator import shown
from engine import (
    Account,
    AccountExists,
    AccountNotFound,
    AsyncLedger,
    Balance,
    BalanceOverflow,
    CurrencyMismatch,
    Entry,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    JournalCorrupted,
    Ledger,
    LedgerClosed,
    LedgerError,
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    NotALedger,
    Transfer,
    TransferRequest,
)
from journal import JournalWriteError
from support import wait_until

ROOT = Path(__file__).resolve().parents[1]
AMOUNT_MAX = 2**63 - 1


class Books(NamedTuple):
    state_hash: str
    records_written: int
    durable_lsn: int
    balances: dict[str, Balance]


def books(ledger: Ledger) -> Books:
    stats = ledger.stats()
    balances = {account.id: ledger.balance(account.id) for account in ledger.accounts()}
    return Books(ledger.state_hash(), stats["records_written"], stats["durable_lsn"], balances)


def one_record_more(before: Books, after: Books) -> bool:
    """Exactly one journal record (a refusal) was written, and no balance changed."""
    return (
        after.records_written == before.records_written + 1
        and after.durable_lsn == before.durable_lsn + 1
        and after.state_hash == before.state_hash
        and after.balances == before.balances
    )


@pytest.fixture
def funded(ledger: Ledger) -> Ledger:
    """bank (no limit), alice with 100, bob with 0, all USD; eur in EUR."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("alice", currency="USD")
    ledger.create_account("bob", currency="USD")
    ledger.create_account("eur", currency="EUR")
    ledger.transfer("fund-alice", source="bank", destination="alice", amount=100)
    return ledger


# --- InvalidRequest: nothing written, id not consumed ----------------------------

BAD_IDS = ["", "x" * 129, None, 5, b"x", "t-\ud800"]
"""The last has a lone surrogate: no UTF-8 for it, so no index key."""
BAD_AMOUNTS = [0, -1, AMOUNT_MAX + 1, True, 1.0, "1", None, 10**5000, -(10**5000)]
"""The last two have more digits than Python will turn into a str: the error must still say what is wrong."""


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
@pytest.mark.parametrize("field", ["transfer_id", "source", "destination"])
def test_a_malformed_id_is_invalid_and_writes_nothing(funded: Ledger, field: str, bad: Any) -> None:
    before = books(funded)
    fields = {"transfer_id": "t-bad", "source": "alice", "destination": "bob", "amount": 1}
    fields[field] = bad
    transfer_id = fields.pop("transfer_id")
    with pytest.raises(InvalidRequest):
        funded.transfer(transfer_id, **fields)
    assert books(funded) == before


@pytest.mark.parametrize("bad", BAD_AMOUNTS, ids=shown)
def test_an_amount_that_is_not_a_positive_int_in_range_is_invalid_and_writes_nothing(
    funded: Ledger, bad: Any
) -> None:
    before = books(funded)
    with pytest.raises(InvalidRequest):
        funded.transfer("t-bad", source="alice", destination="bob", amount=bad)
    assert books(funded) == before


def test_an_id_of_exactly_128_characters_is_valid(funded: Ledger) -> None:
    transfer_id = "t" * 128
    transfer = funded.transfer(transfer_id, source="alice", destination="bob", amount=1)
    assert transfer.id == transfer_id
    assert funded.get_transfer(transfer_id) == transfer


@pytest.mark.parametrize("char", ["é", "\U0001f4b6"], ids=["2-byte", "4-byte"])
def test_ids_beyond_ascii_are_valid_up_to_128_characters_and_retry_after_reopening(
    ledger_path: Path, char: str
) -> None:
    """At 128 four-byte characters an id's UTF-8 (512 bytes) is past LMDB's key limit, and
    its index key is a digest: a retry must still find the id, before and after reopening."""
    account, transfer_id = char * 128, "t-" + char * 126
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        assert ledger.create_account(account, currency="USD").id == account
        first = ledger.transfer(transfer_id, source="bank", destination=account, amount=7)
        assert ledger.transfer(transfer_id, source="bank", destination=account, amount=7) == first
        (again,) = ledger.transfer_many([TransferRequest(transfer_id, "bank", account, 7)])
        assert again == first
        assert ledger.get_transfer(transfer_id) == first
        assert [entry.transfer_id for entry in ledger.entries(account)] == [transfer_id]
    with Ledger.open(ledger_path) as ledger:
        assert ledger.transfer_many([TransferRequest(transfer_id, "bank", account, 7)]) == [first]
        assert ledger.transfer(transfer_id, source="bank", destination=account, amount=7) == first
        assert ledger.balance(account) == Balance(7, 0, 7)


def test_a_transfer_to_the_same_account_is_invalid_and_writes_nothing(funded: Ledger) -> None:
    before = books(funded)
    with pytest.raises(InvalidRequest):
        funded.transfer("t-self", source="alice", destination="alice", amount=1)
    assert books(funded) == before


@pytest.mark.parametrize("bad", ["usd", "", "X" * 17, "US-D", None, 840], ids=repr)
def test_a_malformed_currency_is_invalid_and_opens_nothing(ledger: Ledger, bad: Any) -> None:
    before = books(ledger)
    with pytest.raises(InvalidRequest):
        ledger.create_account("carol", currency=bad)
    assert books(ledger) == before
    assert ledger.accounts() == []


def test_a_currency_of_sixteen_letters_and_digits_is_valid(ledger: Ledger) -> None:
    account = ledger.create_account("carol", currency="ABCDEFGHIJ012345")
    assert account == Account("carol", "ABCDEFGHIJ012345", 0)


@pytest.mark.parametrize("bad", [-1, AMOUNT_MAX + 1, 1.5, True, "0", 10**5000], ids=shown)
def test_a_malformed_overdraft_limit_is_invalid_and_opens_nothing(ledger: Ledger, bad: Any) -> None:
    before = books(ledger)
    with pytest.raises(InvalidRequest):
        ledger.create_account("carol", currency="USD", overdraft_limit=bad)
    assert books(ledger) == before
    with pytest.raises(AccountNotFound):
        ledger.balance("carol")


@pytest.mark.parametrize("limit", [None, 0, AMOUNT_MAX])
def test_an_overdraft_limit_of_none_or_zero_to_the_maximum_is_valid(ledger: Ledger, limit: int | None) -> None:
    assert ledger.create_account("carol", currency="USD", overdraft_limit=limit).overdraft_limit == limit


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_a_malformed_account_id_is_invalid_and_opens_nothing(ledger: Ledger, bad: Any) -> None:
    before = books(ledger)
    with pytest.raises(InvalidRequest):
        ledger.create_account(bad, currency="USD")
    assert books(ledger) == before


def test_validation_comes_before_the_ids_history(funded: Ledger) -> None:
    funded.transfer("t-1", source="alice", destination="bob", amount=10)
    with pytest.raises(InsufficientFunds):
        funded.transfer("t-2", source="bob", destination="alice", amount=500)
    before = books(funded)
    with pytest.raises(InvalidRequest):
        funded.transfer("t-1", source="alice", destination="bob", amount=0)
    with pytest.raises(InvalidRequest):
        funded.transfer("t-1", source="alice", destination="alice", amount=10)
    with pytest.raises(InvalidRequest):
        funded.transfer("t-2", source="bob", destination="alice", amount=True)
    assert books(funded) == before


def test_an_id_refused_as_invalid_can_then_be_used(funded: Ledger) -> None:
    with pytest.raises(InvalidRequest):
        funded.transfer("t-1", source="alice", destination="bob", amount=-5)
    transfer = funded.transfer("t-1", source="alice", destination="bob", amount=5)
    assert transfer == Transfer("t-1", "alice", "bob", 5, transfer.lsn, transfer.timestamp)
    assert funded.balance("bob") == Balance(5, 0, 5)


# --- AccountNotFound: consumes the id --------------------------------------------


@pytest.mark.parametrize("missing", ["source", "destination"])
def test_an_unknown_account_is_refused_and_consumes_the_id(funded: Ledger, missing: str) -> None:
    fields = {"source": "alice", "destination": "bob", "amount": 5}
    fields[missing] = "carol"
    before = books(funded)
    with pytest.raises(AccountNotFound):
        funded.transfer("t-1", **fields)
    assert one_record_more(before, books(funded))

    funded.create_account("carol", currency="USD")
    funded.transfer("fund-carol", source="bank", destination="carol", amount=100)
    before = books(funded)
    with pytest.raises(AccountNotFound):
        funded.transfer("t-1", **fields)
    assert books(funded) == before
    assert funded.get_transfer("t-1") is None


def test_balance_and_entries_of_an_unknown_account_raise_account_not_found(ledger: Ledger) -> None:
    with pytest.raises(AccountNotFound):
        ledger.balance("nope")
    with pytest.raises(AccountNotFound):
        ledger.entries("nope")


# --- CurrencyMismatch: consumes the id -------------------------------------------


def test_a_currency_mismatch_is_refused_and_consumes_the_id(funded: Ledger) -> None:
    before = books(funded)
    with pytest.raises(CurrencyMismatch):
        funded.transfer("t-fx", source="alice", destination="eur", amount=5)
    assert one_record_more(before, books(funded))
    before = books(funded)
    with pytest.raises(CurrencyMismatch):
        funded.transfer("t-fx", source="alice", destination="eur", amount=5)
    assert books(funded) == before


# --- InsufficientFunds: consumes the id ------------------------------------------


def test_retry_after_insufficient_funds_raises_the_same_error_even_once_funds_arrive(funded: Ledger) -> None:
    before = books(funded)
    with pytest.raises(InsufficientFunds):
        funded.transfer("t-big", source="alice", destination="bob", amount=101)
    assert one_record_more(before, books(funded))
    assert funded.balance("alice") == Balance(100, 0, 100)

    funded.transfer("top-up", source="bank", destination="alice", amount=1_000)
    before = books(funded)
    with pytest.raises(InsufficientFunds):
        funded.transfer("t-big", source="alice", destination="bob", amount=101)
    assert books(funded) == before
    assert funded.get_transfer("t-big") is None
    assert funded.transfer("t-big-2", source="alice", destination="bob", amount=101).amount == 101


def test_an_overdraft_limit_lets_the_balance_go_that_far_below_zero_and_no_further(ledger: Ledger) -> None:
    ledger.create_account("credit", currency="USD", overdraft_limit=50)
    ledger.create_account("shop", currency="USD")
    ledger.transfer("t-1", source="credit", destination="shop", amount=50)
    assert ledger.balance("credit") == Balance(-50, 0, -50)
    with pytest.raises(InsufficientFunds):
        ledger.transfer("t-2", source="credit", destination="shop", amount=1)
    assert ledger.balance("credit") == Balance(-50, 0, -50)


# --- BalanceOverflow: consumes the id --------------------------------------------


def test_a_credit_past_the_maximum_balance_is_refused_and_consumes_the_id(ledger: Ledger) -> None:
    ledger.create_account("big", currency="USD")
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("bank2", currency="USD", overdraft_limit=None)
    ledger.transfer("fill", source="bank", destination="big", amount=AMOUNT_MAX)
    assert ledger.balance("big").posted == AMOUNT_MAX

    before = books(ledger)
    with pytest.raises(BalanceOverflow):
        ledger.transfer("one-more", source="bank2", destination="big", amount=1)
    assert one_record_more(before, books(ledger))
    assert ledger.balance("bank2") == Balance(0, 0, 0)  # the hold was released

    ledger.transfer("drain", source="big", destination="bank", amount=10)  # now there is room
    before = books(ledger)
    with pytest.raises(BalanceOverflow):
        ledger.transfer("one-more", source="bank2", destination="big", amount=1)
    assert books(ledger) == before


def test_an_unlimited_debit_past_the_minimum_balance_is_refused_and_consumes_the_id(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    ledger.create_account("b", currency="USD")
    ledger.transfer("fill", source="bank", destination="a", amount=AMOUNT_MAX)
    assert ledger.balance("bank").posted == -AMOUNT_MAX

    before = books(ledger)
    with pytest.raises(BalanceOverflow):
        ledger.transfer("one-more", source="bank", destination="b", amount=1)
    assert one_record_more(before, books(ledger))
    assert ledger.balance("bank") == Balance(-AMOUNT_MAX, 0, -AMOUNT_MAX)

    ledger.transfer("give-back", source="a", destination="bank", amount=10)
    before = books(ledger)
    with pytest.raises(BalanceOverflow):
        ledger.transfer("one-more", source="bank", destination="b", amount=1)
    assert books(ledger) == before


# --- IdempotencyConflict ---------------------------------------------------------


@pytest.mark.parametrize(
    "changed", [{"source": "bank"}, {"destination": "alice", "source": "bob"}, {"amount": 11}], ids=str
)
def test_reusing_a_committed_id_with_different_fields_is_a_conflict(funded: Ledger, changed: dict) -> None:
    funded.transfer("fund-bob", source="bank", destination="bob", amount=50)
    original = funded.transfer("t-1", source="alice", destination="bob", amount=10)
    before = books(funded)
    fields = {"source": "alice", "destination": "bob", "amount": 10, **changed}
    with pytest.raises(IdempotencyConflict):
        funded.transfer("t-1", **fields)
    assert books(funded) == before
    assert funded.get_transfer("t-1") == original


@pytest.mark.parametrize(
    "changed", [{"source": "bank"}, {"destination": "bank"}, {"amount": 50}], ids=str
)
def test_reusing_a_refused_id_with_different_fields_is_a_conflict(funded: Ledger, changed: dict) -> None:
    with pytest.raises(InsufficientFunds):
        funded.transfer("t-1", source="alice", destination="bob", amount=500)
    before = books(funded)
    fields = {"source": "alice", "destination": "bob", "amount": 500, **changed}
    with pytest.raises(IdempotencyConflict):
        funded.transfer("t-1", **fields)
    assert books(funded) == before
    assert funded.get_transfer("t-1") is None


def test_reusing_an_id_refused_for_an_unknown_account_with_other_fields_is_a_conflict(funded: Ledger) -> None:
    with pytest.raises(AccountNotFound):
        funded.transfer("t-1", source="alice", destination="carol", amount=5)
    with pytest.raises(IdempotencyConflict):
        funded.transfer("t-1", source="alice", destination="bob", amount=5)


# --- LedgerLocked ----------------------------------------------------------------


def test_a_second_open_in_this_process_is_locked(ledger: Ledger, ledger_path: Path) -> None:
    with pytest.raises(LedgerLocked):
        Ledger.open(ledger_path)
    ledger.create_account("still-mine", currency="USD")  # the first ledger is untouched
    assert [account.id for account in ledger.accounts()] == ["still-mine"]


def test_a_ledger_held_by_another_live_process_is_locked_until_it_exits(ledger_path: Path) -> None:
    script = (
        "import sys\n"
        "from engine import Ledger\n"
        "with Ledger.open(sys.argv[1]) as ledger:\n"
        "    ledger.create_account('theirs', currency='USD')\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(ledger_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "ready\n"
        with pytest.raises(LedgerLocked) as caught:
            Ledger.open(ledger_path)
        assert caught.value.code == "ledger_locked"
        child.stdin.close()  # let it close the ledger and exit
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    with Ledger.open(ledger_path) as mine:
        assert [account.id for account in mine.accounts()] == ["theirs"]


# --- JournalCorrupted ------------------------------------------------------------


def test_a_flipped_byte_makes_reopening_raise_corrupted_naming_the_lsn(
    ledger_path: Path, flip_record_byte
) -> None:
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        transfer = ledger.transfer("t-1", source="bank", destination="alice", amount=10)
        ledger.transfer("t-2", source="bank", destination="alice", amount=20)
    flip_record_byte(ledger_path, transfer.lsn)

    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn == transfer.lsn
    assert f"LSN {transfer.lsn}" in str(caught.value)
    assert caught.value.code == "journal_corrupted"

    flip_record_byte(ledger_path, transfer.lsn)  # undo: the failed open released the directory
    with Ledger.open(ledger_path) as repaired:
        assert repaired.balance("alice") == Balance(30, 0, 30)


def test_an_unknown_format_version_raises_corrupted_without_an_lsn(ledger_path: Path, raw_lmdb) -> None:
    Ledger.open(ledger_path).close()
    with raw_lmdb(ledger_path) as env:
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True, db=meta) as txn:
            txn.put(b"format_version", b"99")
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn is None
    assert "format version 99" in str(caught.value)


def test_a_path_that_is_a_file_is_not_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("hello")
    with pytest.raises(NotALedger):
        Ledger.open(path)


def test_a_directory_of_other_files_is_not_a_ledger_and_is_left_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotALedger, match="holds other files"):
        Ledger.open(tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_a_new_ledger_may_share_its_directory_with_hidden_files_and_lost_and_found(tmp_path: Path) -> None:
    (tmp_path / ".keep").write_text("")
    (tmp_path / "lost+found").mkdir()  # the root of a file system made for the ledger
    with Ledger.open(tmp_path) as ledger:
        ledger.create_account("bank", currency="USD")
    with Ledger.open(tmp_path) as ledger:
        assert [account.id for account in ledger.accounts()] == ["bank"]


def test_a_directory_the_system_cannot_make_now_is_unavailable_not_not_a_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of space or of file descriptors says nothing about the path: a retry may work."""
    import journal._journal

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal._journal.os, "makedirs", full)
    with pytest.raises(LedgerUnavailable, match="No space left"):
        Ledger.open(tmp_path / "ledger")


BAD_PATHS: dict[str, tuple[type[LedgerError], Callable[[Path], Any]]] = {
    "under a file": (NotALedger, lambda tmp: tmp / "file" / "ledger"),
    "a dangling link": (NotALedger, lambda tmp: tmp / "dangling"),
    "empty": (InvalidRequest, lambda tmp: ""),
    "with a NUL": (InvalidRequest, lambda tmp: f"{tmp}/led\x00ger"),
    "not UTF-8": (InvalidRequest, lambda tmp: f"{tmp}/led\udcffger"),  # the byte 0xff, as os.fsdecode gives it
    "bytes": (InvalidRequest, lambda tmp: os.fsencode(tmp / "ledger")),
    "an int": (InvalidRequest, lambda tmp: 3),
    "None": (InvalidRequest, lambda tmp: None),
}


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_a_path_that_cannot_be_a_ledger_directory_is_refused_and_nothing_is_made(tmp_path: Path, case: str) -> None:
    (tmp_path / "file").write_text("hello")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = sorted(os.listdir(tmp_path))
    error, make = BAD_PATHS[case]
    with pytest.raises(error):
        Ledger.open(make(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    "timeout_s", [0, -1.0, True, "30", None, float("nan"), float("inf"), 1e10, 10**400], ids=shown
)
def test_a_timeout_that_is_not_a_positive_number_a_lock_can_wait_is_invalid(ledger_path: Path, timeout_s: Any) -> None:
    with pytest.raises(InvalidRequest):
        Ledger.open(ledger_path, timeout_s=timeout_s)
    with Ledger.open(ledger_path) as ledger:  # nothing was left locked
        assert ledger.accounts() == []


# --- LedgerClosed ----------------------------------------------------------------


CALLS_AFTER_CLOSE = {
    "create_account": lambda ledger: ledger.create_account("carol", currency="USD"),
    "transfer": lambda ledger: ledger.transfer("t-9", source="alice", destination="bob", amount=1),
    "transfer_many": lambda ledger: ledger.transfer_many([TransferRequest("t-9", "alice", "bob", 1)]),
    "balance": lambda ledger: ledger.balance("alice"),
    "entries": lambda ledger: ledger.entries("alice"),
    "get_transfer": lambda ledger: ledger.get_transfer("fund-alice"),
    "accounts": lambda ledger: ledger.accounts(),
    "state_hash": lambda ledger: ledger.state_hash(),
    "stats": lambda ledger: ledger.stats(),
}


@pytest.mark.parametrize("method", sorted(CALLS_AFTER_CLOSE))
def test_every_method_after_close_raises_ledger_closed(funded: Ledger, method: str) -> None:
    funded.close()
    with pytest.raises(LedgerClosed):
        CALLS_AFTER_CLOSE[method](funded)


def test_close_twice_is_fine_and_the_ledger_reopens(ledger_path: Path) -> None:
    ledger = Ledger.open(ledger_path)
    ledger.create_account("alice", currency="USD")
    ledger.close()
    ledger.close()
    assert ledger.closed
    with Ledger.open(ledger_path) as reopened:
        assert reopened.accounts() == [Account("alice", "USD", 0)]


def _failing_at_close(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `ledger`'s close fail as an anchor that cannot be flushed does: the writer drains and
    stops, then `JournalWriteError` (the journal and the directory are let go all the same)."""
    writer = ledger._journal._writer
    assert writer is not None
    real_close = writer.close

    def failing_close() -> None:
        real_close()
        raise JournalWriteError("the anchor could not be flushed at close: no space left on device")

    monkeypatch.setattr(writer, "close", failing_close)


@pytest.mark.parametrize("host", ["Ledger", "AsyncLedger"])
def test_a_close_after_a_close_that_failed_raises_its_error_again(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """A first close fails (its anchor cannot be flushed): a second `Ledger.close` returned as if
    the books were closed cleanly, on the closing thread or another, while a second
    `AsyncLedger.close` raised the first one's error. Both raise it now: a host that closes
    twice learns the books were not closed cleanly."""
    if host == "AsyncLedger":
        async def close_twice() -> list[BaseException]:
            ledger = await AsyncLedger.open(ledger_path)
            _failing_at_close(ledger._ledger, monkeypatch)
            raised: list[BaseException] = []
            for _ in range(2):
                with pytest.raises(LedgerUnavailable, match="anchor") as caught:
                    await ledger.close()
                raised.append(caught.value)
            return raised

        raised = asyncio.run(close_twice())
        assert raised[0] is raised[1]
        return
    ledger = Ledger.open(ledger_path)
    _failing_at_close(ledger, monkeypatch)
    with pytest.raises(LedgerUnavailable, match="anchor") as first:
        ledger.close()
    assert ledger.closed
    with pytest.raises(LedgerUnavailable, match="anchor") as again:
        ledger.close()
    assert again.value is first.value
    elsewhere: list[BaseException] = []

    def close_on_another_thread() -> None:
        try:
            ledger.close()
        except LedgerError as error:
            elsewhere.append(error)

    other = threading.Thread(target=close_on_another_thread)
    other.start()
    other.join(30.0)
    assert elsewhere == [first.value]


def _with_alice(ledger_path: Path) -> None:
    """Make the ledger and its account "alice" with the usual `timeout_s`: the short one the
    close tests open it with is for the close's waits, and a write bounded by it (its fsync)
    fails with `LedgerTimeout` on a loaded machine whose disk takes longer."""
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("alice", currency="USD")


def test_a_close_made_while_another_thread_closes_returns_once_the_ledger_is_closed(ledger_path: Path) -> None:
    """Two threads close the ledger at once, the first waiting (its `timeout_s`) for a call
    still under way: the second returns only once the first has closed the ledger, its
    directory let go, as `AsyncLedger.close` does; returning at once, it left a reopen
    right after it `LedgerLocked`."""
    _with_alice(ledger_path)
    ledger = Ledger.open(ledger_path, timeout_s=0.5)
    inside, leave = threading.Event(), threading.Event()

    def under_way() -> None:  # a call that outlasts the close's wait (a long batch, say)
        with ledger._call():
            inside.set()
            leave.wait(30.0)

    call = threading.Thread(target=under_way)
    call.start()
    assert inside.wait(30.0)
    first = threading.Thread(target=ledger.close)
    first.start()
    try:
        assert wait_until(lambda: ledger.closed)
        ledger.close()
        with Ledger.open(ledger_path) as reopened:
            assert reopened.accounts() == [Account("alice", "USD", 0)]
    finally:
        leave.set()
        call.join(30.0)
        first.join(30.0)


class _SecondClose:
    """A second close of `ledger`, watched: its waits for the first close are counted (`waits`,
    through the event it waits on), and `done` is set once it has returned or raised."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.changed = threading.Condition()
        self.waits: list[object] = []
        self.done = threading.Event()
        watched = self

        class CountedShut(threading.Event):
            def wait(self, timeout: float | None = None) -> bool:
                with watched.changed:
                    watched.waits.append(timeout)
                    watched.changed.notify_all()
                with ledger._state:  # (for a first close waiting for the calls, below)
                    ledger._state.notify_all()
                return super().wait(timeout)

        ledger._shut = CountedShut()

    def hold(self) -> None:
        """Block until the second close has waited six times for the first, or is done."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.waits) >= 6 or self.done.is_set(), timeout=30.0)

    def closes(self, ledger_path: Path) -> None:
        """Close the ledger on another thread: it returns, and a reopen finds the books."""
        outcome: list[BaseException | None] = []

        def second_close() -> None:
            try:
                self.ledger.close()
                outcome.append(None)
            except LedgerError as error:
                outcome.append(error)
            finally:
                self.let_go()

        second = threading.Thread(target=second_close)
        second.start()
        second.join(30.0)
        assert outcome == [None]
        with Ledger.open(ledger_path) as reopened:
            assert reopened.accounts() == [Account("alice", "USD", 0)]

    def let_go(self) -> None:
        self.done.set()
        with self.changed:
            self.changed.notify_all()


def test_a_close_made_while_another_thread_closes_waits_for_it_however_long_its_work_takes(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first close's work grows with the ledger, not with `timeout_s`: with 300,000 accounts
    and `timeout_s=0.1` it took 0.95 s, and a second close gave up at 4 x `timeout_s` with
    `LedgerTimeout`, the directory still held (a reopen right after it: `LedgerLocked`). Here
    the first close's seal lasts until the second close has waited six `timeout_s` (or has
    given up): the second returns once the ledger is closed, and a reopen finds the books."""
    from journal import _journal

    _with_alice(ledger_path)
    ledger = Ledger.open(ledger_path, timeout_s=0.05)
    second = _SecondClose(ledger)
    real_check_to_seal = _journal.check_to_seal

    def long_seal(*args: Any) -> Any:  # a large ledger's walk
        second.hold()
        return real_check_to_seal(*args)

    monkeypatch.setattr(_journal, "check_to_seal", long_seal)
    first = threading.Thread(target=ledger.close)
    first.start()
    try:
        assert wait_until(lambda: ledger.closed)
        second.closes(ledger_path)
    finally:
        second.let_go()
        first.join(30.0)


@pytest.mark.parametrize("interrupted", ["before the second close", "while the second close waits"])
def test_a_close_made_after_an_interrupted_close_closes_the_ledger_though_that_thread_lives_on(
        ledger_path: Path, interrupted: str) -> None:
    """An interrupt lands in the first close's wait for the calls under way, and its thread goes
    on living (a main thread that caught it), closing nothing: a second close on another thread
    waited a `timeout_s` at a time for as long as that thread lived (forever, for a main
    thread), then `LedgerTimeout`, the directory still held. Now the second close closes the
    ledger itself. The first close's thread lives until the second close has waited six
    `timeout_s` (or has returned). The interrupt lands before the second close begins, or once
    it waits for the first (it took the first's thread for the closer then, and waited on it)."""
    _with_alice(ledger_path)
    ledger = Ledger.open(ledger_path, timeout_s=0.05)
    second = _SecondClose(ledger)
    real_wait_for = ledger._state.wait_for
    later = interrupted == "while the second close waits"

    def wait_then_interrupt(*args: Any, **kwargs: Any) -> Any:  # once: the first close's wait for the calls
        ledger._state.wait_for = real_wait_for  # type: ignore[method-assign]
        if later:  # (it lets go of the lock: the second close comes in, and waits)
            assert real_wait_for(lambda: second.waits, timeout=30.0)
        raise KeyboardInterrupt

    ledger._state.wait_for = wait_then_interrupt  # type: ignore[method-assign]
    interrupts: list[BaseException] = []

    def first_close_then_live_on() -> None:
        try:
            ledger.close()
        except KeyboardInterrupt as interrupt:
            interrupts.append(interrupt)
        second.hold()

    first = threading.Thread(target=first_close_then_live_on)
    first.start()
    try:
        assert wait_until(lambda: ledger.closed)
        if not later:
            assert wait_until(lambda: interrupts)
        second.closes(ledger_path)
        assert interrupts
    finally:
        second.let_go()
        first.join(30.0)


# --- AccountExists ---------------------------------------------------------------


def test_creating_an_existing_account_with_identical_parameters_returns_it(ledger: Ledger) -> None:
    first = ledger.create_account("alice", currency="USD", overdraft_limit=5)
    before = books(ledger)
    again = ledger.create_account("alice", currency="USD", overdraft_limit=5)
    assert again == first == Account("alice", "USD", 5)
    assert books(ledger) == before


@pytest.mark.parametrize("changed", [{"currency": "EUR"}, {"overdraft_limit": 6}, {"overdraft_limit": None}], ids=str)
def test_creating_an_existing_account_with_other_parameters_raises_account_exists(
    ledger: Ledger, changed: dict
) -> None:
    ledger.create_account("alice", currency="USD", overdraft_limit=5)
    before = books(ledger)
    with pytest.raises(AccountExists):
        ledger.create_account("alice", **{"currency": "USD", "overdraft_limit": 5, **changed})
    assert books(ledger) == before
    assert ledger.accounts() == [Account("alice", "USD", 5)]


# --- codes -----------------------------------------------------------------------

CODES = {
    InvalidRequest: "invalid_request",
    AccountNotFound: "account_not_found",
    AccountExists: "account_exists",
    CurrencyMismatch: "currency_mismatch",
    InsufficientFunds: "insufficient_funds",
    BalanceOverflow: "balance_overflow",
    IdempotencyConflict: "idempotency_conflict",
    LedgerLocked: "ledger_locked",
    JournalCorrupted: "journal_corrupted",
    NotALedger: "not_a_ledger",
    LedgerClosed: "ledger_closed",
    LedgerTimeout: "timeout",
    LedgerUnavailable: "ledger_unavailable",
}


@pytest.mark.parametrize("error_class", list(CODES), ids=lambda cls: cls.__name__)
def test_every_error_class_has_its_stable_code_and_is_a_ledger_error(error_class: type[LedgerError]) -> None:
    assert issubclass(error_class, LedgerError)
    assert error_class.code == CODES[error_class]
    assert error_class("message").code == CODES[error_class]


def test_error_codes_are_distinct() -> None:
    assert len(set(CODES.values())) == len(CODES)


def test_a_raised_refusal_carries_its_code(funded: Ledger) -> None:
    with pytest.raises(LedgerError) as caught:
        funded.transfer("t-1", source="bob", destination="alice", amount=1)
    assert type(caught.value) is InsufficientFunds
    assert caught.value.code == "insufficient_funds"


# --- retries and lookups ---------------------------------------------------------


def test_a_retried_committed_transfer_returns_the_identical_transfer_and_writes_nothing(funded: Ledger) -> None:
    original = funded.transfer("t-1", source="alice", destination="bob", amount=10)
    before = books(funded)
    retried = funded.transfer("t-1", source="alice", destination="bob", amount=10)
    assert retried == original
    assert retried.lsn == original.lsn
    assert books(funded) == before
    assert funded.balance("bob") == Balance(10, 0, 10)


def test_a_transfer_whose_caller_timed_out_is_forgotten_once_done_and_a_retry_learns_its_outcome(
    funded: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that gives up waiting (`LedgerTimeout`) never releases its claim; the claims
    forget it once it is done, at the next sweep (`Claims._sweep`), not never: a ledger kept
    past its bound grew by a ticket a timeout. Its id still answers a retry, from the index."""
    from coordinator import _claims

    claims = funded._coordinator.claims
    monkeypatch.setattr(_claims, "CLAIMS_SWEEP_MIN", 3)
    claims._sweep_above = 3
    real_wait = _claims.Ticket.wait

    def gives_up_on_late(self: _claims.Ticket, timeout_s: float | None = None) -> bool:
        if self.request.id.startswith("late-"):
            real_wait(self, timeout_s)  # it is made durable all the same; its caller stops waiting
            return False
        return real_wait(self, timeout_s)

    monkeypatch.setattr(_claims.Ticket, "wait", gives_up_on_late)
    for n in range(3):
        with pytest.raises(LedgerTimeout):
            funded.transfer(f"late-{n}", source="bank", destination="bob", amount=1)
    monkeypatch.setattr(_claims.Ticket, "wait", real_wait)
    late = {ticket.request.id for ticket in claims.in_flight()}
    assert late == {"late-0", "late-1", "late-2"}  # left behind, done
    claims._sweep()  # as a claim that crossed the bound with others, after one of them swept: none left to do
    assert {ticket.request.id for ticket in claims.in_flight()} == late
    funded.transfer("t-0", source="bank", destination="bob", amount=1)  # the fourth claim in flight: a sweep
    assert claims.in_flight() == [] and claims._sweep_above == 3
    retried = funded.transfer("late-1", source="bank", destination="bob", amount=1)
    assert retried == funded.get_transfer("late-1") and funded.balance("bob").posted == 4  # each moved once


def test_a_retry_after_reopening_returns_the_identical_transfer(ledger_path: Path) -> None:
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        original = ledger.transfer("t-1", source="bank", destination="alice", amount=10)
        with pytest.raises(InsufficientFunds):
            ledger.transfer("t-2", source="alice", destination="bank", amount=11)
    with Ledger.open(ledger_path) as reopened:
        assert reopened.transfer("t-1", source="bank", destination="alice", amount=10) == original
        with pytest.raises(InsufficientFunds):
            reopened.transfer("t-2", source="alice", destination="bank", amount=11)
        assert reopened.balance("alice") == Balance(10, 0, 10)


def test_get_transfer_returns_the_committed_transfer(funded: Ledger) -> None:
    transfer = funded.transfer("t-1", source="alice", destination="bob", amount=10)
    assert funded.get_transfer("t-1") == transfer


def test_get_transfer_of_an_unknown_or_refused_id_is_none(funded: Ledger) -> None:
    with pytest.raises(InsufficientFunds):
        funded.transfer("t-refused", source="bob", destination="alice", amount=1)
    assert funded.get_transfer("t-unknown") is None
    assert funded.get_transfer("t-refused") is None


def test_get_transfer_of_a_malformed_id_is_invalid(funded: Ledger) -> None:
    with pytest.raises(InvalidRequest):
        funded.get_transfer("")


def test_entries_page_with_after_and_limit(funded: Ledger) -> None:
    transfers = [funded.transfer(f"t-{n}", source="alice", destination="bob", amount=n + 1) for n in range(5)]
    every = funded.entries("bob")
    expected, balance = [], 0
    for seq, transfer in enumerate(transfers, start=1):
        balance += transfer.amount
        expected.append(Entry("bob", seq, transfer.id, transfer.amount, balance, transfer.lsn, transfer.timestamp))
    assert every == expected
    assert funded.entries("bob", after=0, limit=2) == expected[:2]
    assert funded.entries("bob", after=2, limit=2) == expected[2:4]
    assert funded.entries("bob", after=4, limit=2) == expected[4:]
    assert funded.entries("bob", after=5) == []
    assert funded.entries("bob", limit=0) == []
    alice = funded.entries("alice")
    assert [entry.amount for entry in alice] == [100, -1, -2, -3, -4, -5]
    assert alice[-1].balance == 100 - 15


@pytest.mark.parametrize("after", [2**64 - 1, 2**64, 2**70])
def test_entries_after_a_seq_past_any_possible_one_is_empty_or_invalid(funded: Ledger, after: int) -> None:
    try:
        page = funded.entries("alice", after=after)
    except InvalidRequest:
        return
    assert page == []


def test_entries_of_an_account_leave_out_accounts_whose_id_extends_it(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    ledger.create_account("ab", currency="USD")
    ledger.transfer("t-ab", source="bank", destination="ab", amount=3)
    ledger.transfer("t-a", source="bank", destination="a", amount=2)
    assert [entry.transfer_id for entry in ledger.entries("a")] == ["t-a"]
    assert [entry.transfer_id for entry in ledger.entries("ab")] == ["t-ab"]


def test_ids_of_128_multibyte_characters_work_end_to_end(ledger: Ledger) -> None:
    account, transfer_id = "\U0001F600" * 128, "\U0001F4B8" * 128  # 512 UTF-8 bytes each
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account(account, currency="USD")
    transfer = ledger.transfer(transfer_id, source="bank", destination=account, amount=5)
    assert ledger.transfer(transfer_id, source="bank", destination=account, amount=5) == transfer
    assert ledger.get_transfer(transfer_id) == transfer
    assert ledger.entries(account) == [Entry(account, 1, transfer_id, 5, 5, transfer.lsn, transfer.timestamp)]
    assert ledger.balance(account) == Balance(5, 0, 5)


@pytest.mark.parametrize(
    "paging", [{"after": -1}, {"after": 1.0}, {"limit": -1}, {"limit": True}, {"after": -(10**5000)}],
    ids=lambda paging: ", ".join(f"{key}={shown(value)}" for key, value in paging.items()),
)
def test_entries_with_malformed_paging_is_invalid(funded: Ledger, paging: dict) -> None:
    with pytest.raises(InvalidRequest):
        funded.entries("alice", **paging)


# --- transfer_many ---------------------------------------------------------------


def test_transfer_many_returns_one_result_per_request_in_order(funded: Ledger) -> None:
    requests = [
        TransferRequest("m-1", "alice", "bob", 60),
        TransferRequest("m-2", "alice", "bob", 60),  # only 40 left after m-1
        TransferRequest("m-3", "alice", "alice", 1),  # invalid
        TransferRequest("m-4", "bob", "alice", 10),
        TransferRequest("m-5", "alice", "carol", 1),  # no such account
        TransferRequest("m-6", "alice", "eur", 1),  # currency mismatch
        TransferRequest("", "alice", "bob", 1),  # invalid id
        TransferRequest("m-7", "alice", "bob", 0),  # invalid amount
        TransferRequest("m-\udfff", "alice", "bob", 1),  # invalid id: no UTF-8 for it
        TransferRequest("m-8", "bob", "alice", 1),
    ]
    results = funded.transfer_many(requests)
    assert len(results) == len(requests)
    assert isinstance(results[0], Transfer) and results[0].amount == 60
    assert type(results[1]) is InsufficientFunds
    assert type(results[2]) is InvalidRequest
    assert isinstance(results[3], Transfer) and results[3].source == "bob"
    assert type(results[4]) is AccountNotFound
    assert type(results[5]) is CurrencyMismatch
    assert type(results[6]) is InvalidRequest
    assert type(results[7]) is InvalidRequest
    assert type(results[8]) is InvalidRequest
    assert isinstance(results[9], Transfer) and results[9].id == "m-8"
    assert funded.balance("alice") == Balance(51, 0, 51)
    assert funded.balance("bob") == Balance(49, 0, 49)
    assert funded.transfer("m-7", source="alice", destination="bob", amount=1).amount == 1  # not consumed
    with pytest.raises(InsufficientFunds):
        funded.transfer("m-2", source="alice", destination="bob", amount=60)  # consumed


def test_duplicates_within_a_batch_return_the_same_transfer(funded: Ledger) -> None:
    request = TransferRequest("d-1", "alice", "bob", 10)
    results = funded.transfer_many([request, TransferRequest("d-2", "bob", "alice", 1), request])
    assert isinstance(results[0], Transfer)
    assert results[2] == results[0]
    assert funded.balance("bob") == Balance(9, 0, 9)
    assert len(funded.entries("bob")) == 2


def test_a_conflicting_duplicate_within_a_batch_is_a_conflict(funded: Ledger) -> None:
    results = funded.transfer_many(
        [TransferRequest("d-1", "alice", "bob", 10), TransferRequest("d-1", "alice", "bob", 11)]
    )
    assert isinstance(results[0], Transfer)
    assert type(results[1]) is IdempotencyConflict
    assert funded.balance("bob") == Balance(10, 0, 10)


def test_transfer_many_retries_earlier_ids_with_their_first_outcome(funded: Ledger) -> None:
    committed = funded.transfer("t-1", source="alice", destination="bob", amount=10)
    with pytest.raises(InsufficientFunds):
        funded.transfer("t-2", source="bob", destination="alice", amount=500)
    before = books(funded)
    results = funded.transfer_many(
        [TransferRequest("t-1", "alice", "bob", 10), TransferRequest("t-2", "bob", "alice", 500)]
    )
    assert results[0] == committed
    assert type(results[1]) is InsufficientFunds
    assert books(funded) == before


def test_a_refused_duplicate_within_a_batch_gets_the_same_refusal(funded: Ledger) -> None:
    request = TransferRequest("d-1", "bob", "alice", 5)
    results = funded.transfer_many([request, TransferRequest("fund-bob-2", "bank", "bob", 50), request])
    assert type(results[0]) is InsufficientFunds
    assert isinstance(results[1], Transfer)
    assert type(results[2]) is InsufficientFunds  # the id was consumed by the first refusal
    assert funded.balance("bob") == Balance(50, 0, 50)


def test_a_subclass_of_transfer_request_is_read_once_and_applied_as_it_was_checked(funded: Ledger) -> None:
    """A request is checked and then used; a subclass whose field changes between reads
    must not get a value past the checks (it once left its id in flight for good)."""
    reads = []

    class Shifty(TransferRequest):
        @property  # type: ignore[override]
        def amount(self) -> int:
            reads.append(1)
            return 5 if len(reads) == 1 else 2**70

        @amount.setter
        def amount(self, value: int) -> None:
            pass

    (result,) = funded.transfer_many([Shifty("s-1", "alice", "bob", 5)])
    assert isinstance(result, Transfer) and result.amount == 5
    assert funded.transfer("s-1", source="alice", destination="bob", amount=5) == result  # not stuck in flight
    assert funded.balance("bob") == Balance(5, 0, 5)


def test_a_transfer_request_is_made_fast_and_behaves_as_the_frozen_dataclass_it_is() -> None:
    """`TransferRequest.__init__` is written out (its fields set on an unfrozen twin), not the
    frozen dataclass's generated one: what a host does with one (compare, hash, pickle, copy,
    `dataclasses.replace`, subclass it, validate one with pydantic) works as before."""
    import copy
    import dataclasses
    import inspect
    import pickle

    request = TransferRequest("t-1", "alice", "bob", 5, code=7, reference="r", metadata={"k": 1}, pending=True,
                              timeout_s=60)
    assert request == TransferRequest(id="t-1", source="alice", destination="bob", amount=5, code=7, reference="r",
                                      metadata={"k": 1}, pending=True, timeout_s=60)
    assert type(request) is TransferRequest and dataclasses.is_dataclass(request)
    assert repr(TransferRequest("t", "a", "b", 1)) == ("TransferRequest(id='t', source='a', destination='b', amount=1, "
                                                       "code=0, reference=None, metadata=None, pending=False, "
                                                       "timeout_s=None)")
    plain = TransferRequest("t", "a", "b", 1)
    assert hash(plain) == hash(TransferRequest("t", "a", "b", 1)) and {plain: 1}[TransferRequest("t", "a", "b", 1)] == 1
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(request, protocol)) == request
    assert copy.copy(request) == request and copy.deepcopy(request) == request
    assert dataclasses.replace(request, amount=6) == TransferRequest("t-1", "alice", "bob", 6, 7, "r", {"k": 1}, True, 60)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.amount = 6  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"__init__\(\) missing 1 required positional argument: 'amount'"):
        TransferRequest("t", "a", "b")  # type: ignore[call-arg]
    assert str(inspect.signature(TransferRequest)).endswith("timeout_s: 'int | None' = None) -> None")

    @dataclasses.dataclass(frozen=True, slots=True)
    class Tagged(TransferRequest):
        tag: str = "x"

    tagged = Tagged("t", "a", "b", 1, tag="y")
    assert (tagged.amount, tagged.tag) == (1, "y") and dataclasses.replace(tagged, amount=2).amount == 2

    class Routed(TransferRequest):
        def __init__(self, id: str, route: tuple[str, str], amount: int) -> None:
            super().__init__(id, route[0], route[1], amount)

    assert dataclasses.astuple(Routed("t", ("a", "b"), 3))[:4] == ("t", "a", "b", 3)
    pydantic = pytest.importorskip("pydantic")
    assert pydantic.TypeAdapter(TransferRequest).validate_python(
        {"id": "t", "source": "a", "destination": "b", "amount": 5}) == TransferRequest("t", "a", "b", 5)


def test_an_amount_too_large_to_print_is_invalid_in_its_place(funded: Ledger) -> None:
    results = funded.transfer_many([TransferRequest("h-1", "alice", "bob", 10**5000), TransferRequest("h-2", "alice", "bob", 1)])
    assert type(results[0]) is InvalidRequest and "bits" in str(results[0])
    assert isinstance(results[1], Transfer)


def test_an_item_that_is_not_a_transfer_request_is_invalid_in_its_place(funded: Ledger) -> None:
    results = funded.transfer_many([("t-1", "alice", "bob", 1), TransferRequest("t-2", "alice", "bob", 2)])  # type: ignore[list-item]
    assert type(results[0]) is InvalidRequest
    assert isinstance(results[1], Transfer) and results[1].id == "t-2"


def test_a_batch_larger_than_the_in_flight_bound_is_applied_in_order(ledger_path: Path) -> None:
    with Ledger.open(ledger_path, inflight_max=2) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        ledger.create_account("b", currency="USD")
        requests = [TransferRequest("fund", "bank", "a", 10)]
        requests += [TransferRequest(f"move-{n}", "a", "b", 3) for n in range(4)]  # the 4th finds 1 left
        requests += [TransferRequest("fund", "bank", "a", 10)]
        results = ledger.transfer_many(requests)
        assert [type(result).__name__ for result in results] == [
            "Transfer", "Transfer", "Transfer", "Transfer", "InsufficientFunds", "Transfer"
        ]
        assert results[-1] == results[0]
        lsns = [result.lsn for result in results[:4]]
        assert lsns == sorted(lsns)
        assert ledger.balance("a") == Balance(1, 0, 1)
        assert ledger.balance("b") == Balance(9, 0, 9)


def test_transfer_many_of_nothing_returns_nothing(funded: Ledger) -> None:
    before = books(funded)
    assert funded.transfer_many([]) == []
    assert books(funded) == before


def test_transfer_many_of_a_non_sequence_is_invalid(funded: Ledger) -> None:
    with pytest.raises(InvalidRequest):
        funded.transfer_many("not a list")  # type: ignore[arg-type]


def _transfer_one(ledger: Ledger, transfer_id: str) -> Transfer:
    return ledger.transfer(transfer_id, source="bank", destination="alice", amount=5)


def _transfer_in_a_batch(ledger: Ledger, transfer_id: str) -> Transfer:
    (result,) = ledger.transfer_many([TransferRequest(transfer_id, "bank", "alice", 5)])
    if isinstance(result, LedgerError):
        raise result
    return result


@pytest.mark.parametrize("write", [_transfer_one, _transfer_in_a_batch], ids=["transfer", "transfer_many"])
def test_a_full_disk_fails_every_write_until_reopened_says_so_and_reads_show_what_is_durable(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, write: Any
) -> None:
    from journal._writer import Writer

    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer("before", source="bank", destination="alice", amount=10)

        def disk_full(self: Writer, txn: object, batch: object, records: object, behind: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Writer, "_stage", disk_full)
        with pytest.raises(LedgerUnavailable) as caught:
            write(ledger, "lost")
        assert "no space left" in str(caught.value)
        monkeypatch.undo()
        with pytest.raises(LedgerUnavailable) as caught:  # the writer is gone: nothing is acknowledged any more
            write(ledger, "after")
        assert "no space left" in str(caught.value)
        # Reads go on, and show only what is durable (the actors applied "lost" before it failed).
        assert ledger.balance("alice") == Balance(10, 0, 10)
        assert ledger.balance("bank") == Balance(-10, 0, -10)
        assert [entry.transfer_id for entry in ledger.entries("alice")] == ["before"]
        assert ledger.get_transfer("before") is not None and ledger.get_transfer("lost") is None
        assert [account.id for account in ledger.accounts()] == ["bank", "alice"]
        ledger.state_hash()
    with Ledger.open(ledger_path) as reopened:
        assert reopened.balance("alice") == Balance(10, 0, 10)
        assert reopened.get_transfer("lost") is None
        assert write(reopened, "lost").amount == 5


@pytest.mark.parametrize(
    "option",
    [
        {"dispatcher_threads": 0},
        {"actors_live_max": -1},
        {"inflight_max": True},
        {"checkpoint_interval": 0},
        {"map_size_bytes": 10},
        {"timeout_s": 0},
    ],
)
def test_bad_open_options_raise_invalid_request_and_create_nothing(tmp_path: Path, option: dict[str, Any]) -> None:
    path = tmp_path / "ledger"
    with pytest.raises(InvalidRequest):
        Ledger.open(path, **option)
    assert not path.exists()


def test_a_sharded_ledger_without_ray_installed_says_which_extra_to_install(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import ShardedLedger

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as it does where Ray is not installed
    with pytest.raises(InvalidRequest, match=r"pip install 'tally-ledger\[cluster\]'"):
        ShardedLedger.open(tmp_path / "books", shards=2)
    assert not (tmp_path / "books").exists(), "nothing is written before Ray is there"


class _RaisingEq:
    """A value whose `==` raises: validation must look at a value's type before comparing it."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("== raised")

    __hash__ = object.__hash__


@pytest.mark.parametrize("read", [
    lambda ledger: ledger.balance("alice", at_lsn=10**5000),
    lambda ledger: ledger.balance("alice", at_timestamp=10**5000),
    lambda ledger: ledger.transfers(until_lsn=10**5000),
    lambda ledger: ledger.transfers(kind=10**5000),
    lambda ledger: ledger.transfers(kind=_RaisingEq()),
], ids=["at_lsn", "at_timestamp", "until_lsn", "kind", "kind with a raising =="])
def test_a_history_read_of_a_value_too_large_to_print_or_unsafe_to_compare_is_invalid(
        funded: Ledger, read: Callable[[Ledger], object]) -> None:
    with pytest.raises(InvalidRequest):
        read(funded)
    assert funded.balance("alice").posted == 100


def test_a_code_whose_equality_raises_is_invalid_and_writes_nothing(funded: Ledger) -> None:
    before = books(funded)
    with pytest.raises(InvalidRequest, match="code"):
        funded.transfer("t-eq", source="alice", destination="bob", amount=1, code=_RaisingEq())  # type: ignore[arg-type]
    assert books(funded) == before
    assert funded.transfer("t-eq", source="alice", destination="bob", amount=1).amount == 1  # its id is free


class _Path(str):
    """A str subclass as a path (LMDB takes only a plain str)."""


class _Fspath:
    def __init__(self, path: str) -> None:
        self._path = path

    def __fspath__(self) -> str:
        return _Path(self._path)


@pytest.mark.parametrize("wrap", [_Path, _Fspath], ids=["str subclass", "PathLike of a str subclass"])
def test_a_path_given_as_a_str_subclass_opens_the_ledger_at_that_path(tmp_path: Path, wrap: Callable[[str], Any]) -> None:
    path = str(tmp_path / "ledger")
    with Ledger.open(wrap(path)) as ledger:
        ledger.create_account("a", currency="USD")
    with Ledger.open(path) as reopened:
        assert [account.id for account in reopened.accounts()] == ["a"]


def test_a_shard_count_too_large_to_print_is_invalid_and_creates_nothing(tmp_path: Path) -> None:
    from engine import ShardedLedger

    with pytest.raises(InvalidRequest, match="an int of 16610 bits"):
        ShardedLedger.open(tmp_path / "books", shards=10**5000)
    assert not (tmp_path / "books").exists()


class _RaisingList(list[Any]):
    """A list whose length and iteration raise: the caller's code, so bad input."""

    def __len__(self) -> int:
        raise RuntimeError("len raised")

    def __iter__(self) -> Any:
        raise RuntimeError("iter raised")


@pytest.mark.parametrize("call", [
    lambda ledger: ledger.create_accounts(_RaisingList()),
    lambda ledger: ledger.transfer_many(_RaisingList()),
    lambda ledger: ledger.transfer_linked(_RaisingList()),
], ids=["create_accounts", "transfer_many", "transfer_linked"])
def test_a_sequence_that_cannot_be_read_is_invalid_and_writes_nothing(funded: Ledger,
                                                                      call: Callable[[Ledger], object]) -> None:
    before = books(funded)
    with pytest.raises(InvalidRequest, match="could not be read"):
        call(funded)
    assert books(funded) == before


class _Seconds(float):
    """A float subclass whose own comparisons and conversion raise: read by its value."""

    def __le__(self, other: object) -> bool:
        raise RuntimeError("<= raised")

    __lt__ = __ge__ = __gt__ = __le__

    def __float__(self) -> float:
        raise RuntimeError("float() raised")


def test_a_number_of_seconds_given_as_a_subclass_is_read_by_its_value(ledger_path: Path) -> None:
    with Ledger.open(ledger_path, timeout_s=_Seconds(5.0)) as ledger:
        assert ledger.timeout_s == 5.0 and type(ledger.timeout_s) is float
        assert list(ledger.events(follow=True, timeout_s=_Seconds(0.01))) == []
    with pytest.raises(InvalidRequest, match="timeout_s"):
        Ledger.open(ledger_path, timeout_s=_Seconds(-1.0))


DOCUMENTED_FIRST_PARAMETERS = {  # README.md's signatures: `create_account(id, *, ...)`, `balance(account, ...)`...
    "create_account": "id", "account": "id", "transfer": "id", "post_pending": "id", "void_pending": "id",
    "get_transfer": "id", "outcome": "id", "balance": "account", "entries": "account", "shard_of": "account",
}


def test_the_documented_parameter_names_are_the_real_ones_on_every_ledger() -> None:
    """A host may call `ledger.balance(account="a")` or `ledger.transfer(id="t", ...)` as the
    README writes them, on any of the ledgers."""
    import inspect

    from engine import AsyncLedger, ShardedLedger
    from engine._history import Snapshot
    from engine._readonly import ReadingLedger
    from engine._remote import RemoteLedger

    for kind in (Ledger, AsyncLedger, ShardedLedger, ReadingLedger, Snapshot, RemoteLedger):
        for method, name in DOCUMENTED_FIRST_PARAMETERS.items():
            if hasattr(kind, method):
                first = list(inspect.signature(getattr(kind, method)).parameters)[1]
                assert first == name, (kind.__name__, method, first)


def test_a_ledger_takes_its_documented_parameter_names_as_keywords(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger") as ledger:
        ledger.create_account(id="bank", currency="USD", overdraft_limit=None)
        ledger.create_account(id="alice", currency="USD")
        ledger.transfer(id="t-1", source="bank", destination="alice", amount=10)
        ledger.transfer(id="p-1", source="alice", destination="bank", amount=4, pending=True)
        ledger.post_pending(id="q-1", pending_id="p-1", amount=3)
        ledger.transfer(id="p-2", source="alice", destination="bank", amount=1, pending=True)
        ledger.void_pending(id="v-2", pending_id="p-2")
        assert ledger.account(id="alice").currency == "USD"
        assert ledger.balance(account="alice").posted == 7
        assert [entry.transfer_id for entry in ledger.entries(account="alice")] == ["t-1", "q-1"]
        assert ledger.get_transfer(id="q-1").amount == 3  # type: ignore[union-attr]
        assert ledger.outcome(id="v-2").kind == "void"  # type: ignore[union-attr]
