"""A ledger opened with `Ledger.open(path, readonly=True)`: reads, beside a live writer.

Another process may have the ledger open for writing: LMDB allows it any number of readers,
in any process. This one opens the journal read-only without taking the directory lock,
recovers the projection as an open does (the newest checkpoint, then the records after it:
`load_checkpoint`, `replay`, `check_index_counts`, which only read), and before each read
replays the records that became durable since (only those). So `balance`, `accounts`,
`entries`, `get_transfer`, `state_hash` and `events` answer from the durable journal as of
the call. Nothing is ever written to the ledger's files; every write method raises
`ReadOnlyLedger` before it does anything, and no expiry runs here (the writer's does).

What "durable" means here: another process sees a commit once LMDB's reader table
(`lock.mdb`) names it, which the writer's LMDB does once it has written the commit, before
the writer's flush has made it durable. So before this reader reads a snapshot other than the
last it made sure of, it makes sure that snapshot is on disk: the writer's anchor names it as flushed,
or this reader flushes the data file itself (`journal._seen`). A crash or a power loss never
takes back a record read here. (A writer killed inside a commit, before LMDB's table named
it, leaves it unseen here until the next writer opens: that commit was never acknowledged;
see `journal._store._settle_last_writer`.)

Threads: any. The replay that catches up runs under one lock, on the caller's thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from coordinator import (
    Unindexed,
    INDEX_NAMES,
    Account,
    AccountNotFound,
    Balance,
    Entry,
    JournalCorrupted,
    LedgerError,
    LedgerTimeout,
    ReadOnlyLedger,
    Recovered,
    Transfer,
    TransferRequest,
    check_id,
    check_ids_against_records,
    check_index_counts,
    entries_of,
    ledger_error,
    ledger_errors,
    load_checkpoint,
    pairs,
    replay,
    state_hash,
)
from journal import Journal

from engine._follow import FOLLOW_POLL_S
from engine._head import Head, head_of
from engine._history import History
from engine._calls import OPEN_LEDGERS, LedgerCall
from engine._checks import balance_of, check_page
from engine._ledger import Ledger

OPEN_TRIES_MAX = 100
"""Times a read-only open replays again because the writer moved between its replay and its
count of the index entries (each try is short; a writer would have to outrun it 100 times)."""

SNAPSHOT_TRIES_MAX = 100
"""Times a read that needs the projection and a snapshot in step (`entries`, `state_hash`)
catches up again because the writer moved before its snapshot opened."""

T = TypeVar("T")


def open_readonly(path: str, timeout_s: float) -> ReadingLedger:
    """`Ledger.open(path, readonly=True)`: see `ReadingLedger`. Raises what `Ledger.open`
    raises for a path that holds no ledger, or a damaged one."""
    with ledger_errors():
        journal = Journal.open_readonly(path, index_names=INDEX_NAMES, lock=False)
    try:
        with ledger_errors():
            return ReadingLedger(journal, timeout_s)
    except BaseException:
        journal.close()
        raise


def recover_beside_writer(journal: Journal) -> Recovered:
    """As `coordinator.recover`, beside a writer that may append meanwhile: the index counts
    are read in a later snapshot than the replay's, so a mismatch with new records since is
    a race, retried (bounded), and one without is damage."""
    if journal.problem is not None:  # a writable open raises it; so does this one
        raise ledger_error(journal.problem) from journal.problem
    if journal.format_version < 2:
        check_ids_against_records(journal)
    books = load_checkpoint(journal, unindexed=True)  # replay goes on collecting the entries the index
    # may not hold (`coordinator.indexed_through`), and their hold rows
    for _ in range(OPEN_TRIES_MAX):
        replay(journal, books)
        try:
            check_index_counts(journal, books)
            return books
        except JournalCorrupted:
            if journal.read(books.last_lsn + 1) is None:
                raise
    raise LedgerTimeout(f"the ledger at {journal.path} kept moving: {OPEN_TRIES_MAX} tries to read it whole failed")


class ReadingLedger(Ledger):
    """A read-only `Ledger` (what `Ledger.open(path, readonly=True)` returns): the same
    methods; the reads answer from the durable journal, every write raises `ReadOnlyLedger`."""

    def __init__(self, journal: Journal, timeout_s: float) -> None:  # no super().__init__: it starts writers
        self.path = journal.path
        self.timeout_s = timeout_s
        self._journal = journal
        self._books = self.recovered = recover_beside_writer(journal)
        """The projection as of `_books.last_lsn`, with the entries past its newest checkpoint
        (`unindexed`, as the writer keeps them: the entry index does not hold them yet)."""
        self._catching_up = threading.Lock()
        books = self._books
        self._history = History(journal, lambda: self._catch_up().last_lsn,
                                lambda account, _end: pairs(_unindexed(books).get(account, {})),
                                lambda account, _end: pairs(_unindexed_holds(books).get(account, {})), time.time_ns)
        self._state = threading.Condition()
        self._calls: deque[None] = deque()
        self._closed = False
        self._forked_from: int | None = None
        self._stopping = threading.Event()
        OPEN_LEDGERS.add(self)

    # --- writes: refused ---------------------------------------------------------

    def _refuse(self, what: str) -> NoReturn:
        raise ReadOnlyLedger(f"the ledger at {self.path} is open read-only: {what} writes (write through the "
                             "process that has it open for writing)")

    def create_account(self, id: str, *, currency: str, overdraft_limit: int | None = 0, code: int = 0,
                       metadata: Mapping[str, str | int] | None = None) -> Account:
        self._refuse("create_account")

    def create_accounts(self, accounts: Sequence[Account]) -> list[Account | LedgerError]:
        self._refuse("create_accounts")

    def transfer(self, id: str, *, source: str, destination: str, amount: int, code: int = 0,
                 reference: str | None = None, metadata: Mapping[str, str | int] | None = None,
                 pending: bool = False, timeout_s: int | None = None) -> Transfer:
        self._refuse("transfer")

    def post_pending(self, id: str, *, pending_id: str, amount: int | None = None,
                     reference: str | None = None, metadata: Mapping[str, str | int] | None = None) -> Transfer:
        self._refuse("post_pending")

    def void_pending(self, id: str, *, pending_id: str, reference: str | None = None,
                     metadata: Mapping[str, str | int] | None = None) -> Transfer:
        self._refuse("void_pending")

    def transfer_linked(self, requests: Sequence[TransferRequest]) -> list[Transfer]:
        self._refuse("transfer_linked")

    def transfer_many(self, requests: Sequence[TransferRequest]) -> list[Transfer | LedgerError]:
        self._refuse("transfer_many")

    def expire_pending(self) -> int:
        self._refuse("expire_pending")

    # --- reads -------------------------------------------------------------------

    def _call(self) -> LedgerCall:
        """Every call of a read-only ledger is a read (`Ledger._read`)."""
        return self._read()

    def _catch_up(self) -> Recovered:
        """Replay the records that became durable since the last look (inside a call)."""
        books = self._books
        with self._catching_up:
            if self._journal.read(books.last_lsn + 1) is not None:
                replay(self._journal, books)
        return books

    def _account(self, account_id: str) -> Account:
        check_id(account_id, "account id")
        account = self._catch_up().accounts.get(account_id)
        if account is None:
            raise AccountNotFound(f"no account {account_id!r}")
        return account

    def accounts(self) -> list[Account]:
        """Every durable account, in creation order."""
        with self._call():
            books = self._catch_up()
            with self._catching_up:
                return list(books.accounts.values())

    def balance(self, account: str, *, at_lsn: int | None = None, at_timestamp: int | None = None) -> Balance:
        """As `Ledger.balance`, from the durable journal: `pending` is what its pending
        transfers hold (no transfer in flight elsewhere is seen). `at_timestamp` may not be
        later than this process's clock."""
        if at_lsn is not None or at_timestamp is not None:
            return super().balance(account, at_lsn=at_lsn, at_timestamp=at_timestamp)
        with self._call():
            self._account(account)
            with self._catching_up:
                return balance_of(self._books, account)

    def entries(self, account: str, after: int = 0, limit: int | None = None) -> list[Entry]:
        check_page(after, limit)
        with self._call():
            self._account(account)
            return self._consistent(lambda books, txn: entries_of(
                self._journal, account, after, limit, pairs(_unindexed(books).get(account, {})), txn))

    def state_hash(self) -> str:
        """As `Ledger.state_hash`, of the durable journal."""
        with self._call():
            return self._consistent(lambda books, txn: state_hash(
                self._journal, list(books.accounts.values()), list(books.pending.values()), txn,
                {account: pairs(flat) for account, flat in _unindexed(books).items()}))

    def _consistent(self, read: Callable[[Recovered, Any], T]) -> T:
        """`read(books, txn)`, with the projection caught up to exactly snapshot `txn` (so its
        unindexed entries are those the snapshot's entry index lacks): retried, bounded,
        while the writer moves between the two."""
        journal = self._journal
        for _ in range(SNAPSHOT_TRIES_MAX):
            books = self._catch_up()
            with self._catching_up, journal.snapshot() as txn:
                if journal.read(books.last_lsn + 1, txn) is None:
                    return read(books, txn)
        raise LedgerTimeout(f"the ledger at {self.path} kept moving: {SNAPSHOT_TRIES_MAX} tries to read it "
                            "in step failed")

    def _opened_lsns(self) -> Mapping[str, int]:
        return self._catch_up().account_lsns

    def stats(self) -> dict[str, int]:
        """What this reader has read: `durable_lsn` (the last record replayed) and `accounts`."""
        with self._call():
            books = self._catch_up()
            return {"durable_lsn": books.last_lsn, "accounts": len(books.accounts)}

    def head(self) -> Head:
        """The hash chain's head as of the last record this reader has read (it catches up
        with a live writer first), as that record carries it."""
        with self._call():
            books = self._catch_up()
            return head_of(self._journal.head_at(books.last_lsn))

    # --- events ------------------------------------------------------------------

    def _events_last_lsn(self) -> int | None:
        return None  # whatever is committed is durable: read to the end of the snapshot

    def _await_records(self, after_lsn: int, wait_s: float) -> None:
        """Poll (pauses of `FOLLOW_POLL_S`, doubling) for a record after `after_lsn`, at most
        `wait_s`; returns early if the ledger closes."""
        pause_s, pause_s_max = FOLLOW_POLL_S
        deadline = time.monotonic() + wait_s
        while True:
            with self._call():
                if self._journal.read(after_lsn + 1) is not None:
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.wait(min(pause_s, remaining)):
                return
            pause_s = min(pause_s * 2, pause_s_max)

    # --- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Wait for the calls under way (bounded by `timeout_s`), end every follower, close
        the journal. Idempotent; every later call raises `LedgerClosed`."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            self._state.wait_for(lambda: not self._calls, timeout=self.timeout_s)
        OPEN_LEDGERS.discard(self)
        self._journal.close()

    def __repr__(self) -> str:
        return f"<ReadingLedger {self.path!r} (read-only)>"


def _unindexed(books: Recovered) -> Unindexed:
    """The entries past the newest checkpoint replayed (`recover` collects them)."""
    assert books.unindexed is not None
    return books.unindexed


def _unindexed_holds(books: Recovered) -> Unindexed:
    """Their hold rows."""
    assert books.unindexed_holds is not None
    return books.unindexed_holds
