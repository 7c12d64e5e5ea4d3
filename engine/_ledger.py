"""`Ledger`: the engine a host process embeds.

Threads inside a ledger: one journal writer, `dispatcher_threads` workers that
run every account actor, and the callers' own threads. Every public method is
safe to call from any number of threads at once, and every wait it makes is
bounded by `timeout_s` (raising `LedgerTimeout`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from coordinator import (
    ACCOUNTS_PER_BLOCK_MAX,
    INDEX_NAMES,
    CHECKPOINT_RECORDS_INTERVAL,
    EXPIRY_INTERVAL_S,
    INFLIGHT_TRANSFERS_MAX,
    SNAPSHOT_AGE_S_DEFAULT,
    TIMEOUT_S_DEFAULT,
    Account,
    AccountExists,
    AccountNotFound,
    Balance,
    Coordinator,
    Entry,
    Event,
    InvalidRequest,
    LedgerClosed,
    LedgerError,
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    Projection,
    Resolution,
    Sequencer,
    Transfer,
    TransferRequest,
    check_code,
    check_currency,
    check_ids_against_records,
    check_id,
    check_metadata,
    checked_clock,
    check_overdraft_limit,
    check_path,
    entries_of,
    items_of,
    ledger_error,
    ledger_errors,
    load_checkpoint,
    outcome_now,
    recover,
    replay,
    seconds_of,
    shown,
    state_hash,
    transfer_at,
    resolution_request,
    transfer_request,
)
from journal import Completion, Journal, JournalError, JournalTimeoutError, JournalWriteError, files_of

from engine._head import Head, head_of
from engine._directory import Directory
from engine._history import History, Snapshot, check_lsn, check_max_age
from engine._follow import follow_events
from engine._runtime import Dispatcher

ACTORS_LIVE_MAX_DEFAULT = 65_536
DISPATCHER_THREADS_DEFAULT = 1
CLOSE_WAITS = 4
"""The waits of `timeout_s` a close makes at most (for the calls under way, the expirer, the
checkpoint, the writer's drain): how long a second close waits for the first to end."""

logger = logging.getLogger("tally.engine")


def _exists(existing: Account) -> AccountExists:
    metadata = "no metadata" if existing.metadata is None else f"metadata {existing.metadata.as_dict()!r}"
    limit = "no overdraft limit" if existing.overdraft_limit is None else f"overdraft_limit {existing.overdraft_limit}"
    return AccountExists(f"account {existing.id!r} exists with other fields: {existing.currency}, {limit}, "
                         f"code {existing.code}, {metadata}")


class Ledger:
    """An open ledger. Use `Ledger.open(path)`, preferably as a context manager."""

    def __init__(self, journal: Journal, *, timeout_s: float, dispatcher_threads: int,
                 actors_live_max: int, inflight_max: int, checkpoint_interval: int,
                 clock_ns: Callable[[], int] | None) -> None:
        self.path = journal.path
        self.timeout_s = timeout_s
        self._journal = journal
        books = recover(journal)
        if journal.format_version < 2:  # its index entries carry no checksum: check each against its record
            check_ids_against_records(journal)
        self.recovered = books
        self._sequencer = Sequencer(journal, books, checkpoint_interval, unindexed=books.unindexed,
                                    unindexed_holds=books.unindexed_holds,
                                    since_checkpoint=books.records, clock=clock_ns or time.time_ns)
        self._dispatcher = Dispatcher(dispatcher_threads)
        try:
            self._directory = Directory(self._sequencer, self._dispatcher, actors_live_max)
            self._coordinator = Coordinator(journal, self._sequencer, self._directory, inflight_max)
            self._history = History(journal, lambda: journal.durable_lsn, self._sequencer.unindexed.rows,
                                    self._sequencer.unindexed_holds.rows, self._now, self._settled_end)
            self._state = threading.Condition()
            self._calls: deque[None] = deque()
            """One item per call under way: appends and pops are atomic, so calls take no lock."""
            self._closed = False
            self._shut = threading.Event()
            """Set once `close` has closed the journal (or failed to): a second close waits for it."""
            self._forked_from: int | None = None
            """Set in a child made by `fork()`: the process that opened this ledger (`_after_fork`)."""
            _, expired_at = self._coordinator.expire_due()  # what expired while it was closed, before any call sees it
            journal.wait_durable(expired_at, timeout_s)
        except BaseException:  # the open fails (`open` closes the journal): its threads end here
            self._stop_workers()
            raise
        self._stopping = threading.Event()
        self._expirer: threading.Thread | None = None
        if clock_ns is None:
            self._expirer = threading.Thread(target=self._expire_while_open, name="tally-expirer", daemon=True)
            self._expirer.start()
        _OPEN.add(self)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout_s: float = TIMEOUT_S_DEFAULT,
        dispatcher_threads: int = DISPATCHER_THREADS_DEFAULT,
        actors_live_max: int = ACTORS_LIVE_MAX_DEFAULT,
        inflight_max: int = INFLIGHT_TRANSFERS_MAX,
        checkpoint_interval: int = CHECKPOINT_RECORDS_INTERVAL,
        map_size_bytes: int | None = None,
        clock_ns: Callable[[], int] | None = None,
        readonly: bool = False,
    ) -> Ledger:
        """Open (creating if missing) the ledger in directory `path` and recover it.

        Recovery replays and verifies the journal after the newest checkpoint before this
        returns. `checkpoint_interval` is the most records between two checkpoints, so the
        most an open replays; a checkpoint also writes the entry index, so one comes at the
        latest once `UNINDEXED_ENTRIES_MAX` (400,000) entries wait in memory for it.
        `clock_ns`: where timestamps come from, nanoseconds since the epoch (the wall clock,
        `time.time_ns`, by default); a clock of your own is read once for each decision, so
        each gets the time it gives (made strictly increasing). With the wall clock a thread expires pending transfers
        as their deadlines pass (within `EXPIRY_INTERVAL_S`); with a clock of your own (a
        test's, a replay's) nothing runs behind your back: call `expire_pending()`. Either
        way, what expired while the ledger was closed expires as it opens.

        With `readonly=True` the ledger must exist; it is read beside whatever process writes
        it, without its lock, and every write raises `ReadOnlyLedger` (`engine._readonly`;
        the options that concern writing are checked, then unused).

        Raises `LedgerLocked` if another live holder has the directory, `JournalCorrupted`
        (naming the LSN) if a record fails verification, and `NotALedger` if `path` is a file.
        """
        if clock_ns is not None:
            if not callable(clock_ns):
                raise InvalidRequest(f"clock_ns must be None or a function returning nanoseconds, got {shown(clock_ns)}")
            clock_ns = checked_clock(clock_ns)
            clock_ns()  # a clock that gives no int fails here, before anything is opened
        wait_s = check_timeout_s(timeout_s)
        path = check_path(path)
        for name, value, low, high in (
            ("dispatcher_threads", dispatcher_threads, 1, 64),
            ("actors_live_max", actors_live_max, 1, 2**31),
            ("inflight_max", inflight_max, 1, 2**31),
            ("checkpoint_interval", checkpoint_interval, 1, 2**62),
            ("map_size_bytes", 1 << 20 if map_size_bytes is None else map_size_bytes, 1 << 16, 1 << 40),
        ):
            if type(value) is not int or not low <= value <= high:
                raise InvalidRequest(f"{name} must be an int in {low}..{high}, got {shown(value)}")
        if readonly is not True and readonly is not False:
            raise InvalidRequest(f"readonly must be a bool, got {shown(readonly)}")
        _refuse_open_here(path, readonly)
        if readonly:
            from engine._readonly import open_readonly  # it subclasses Ledger

            return open_readonly(path, wait_s)
        options: dict[str, Any] = {"index_names": INDEX_NAMES}
        if map_size_bytes is not None:
            options["map_size_bytes"] = map_size_bytes
        with ledger_errors():
            journal = Journal.open(path, **options)
        try:
            with ledger_errors():
                return cls(journal, timeout_s=wait_s, dispatcher_threads=dispatcher_threads,
                           actors_live_max=actors_live_max, inflight_max=inflight_max,
                           checkpoint_interval=checkpoint_interval, clock_ns=clock_ns)
        except BaseException:
            journal.close(seal=False)  # what went wrong is found again by the next open
            raise

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self) -> _Call:
        """Enter a public call: refuse it if closed, count it until it returns (so `close`
        can wait for it), and turn a `JournalError` from inside into its `LedgerError`."""
        return _Call(self)

    def _read(self) -> _Call:
        """`_call` for a read of the journal that may be long (pages, entries, events, a
        snapshot's reads, `state_hash`, a balance at an LSN or a time): its reads let the
        threads waiting for the interpreter have it between two chunks
        (`Journal.reading_in_chunks`). A page of 10,000 transfers read straight through kept the
        writer and every caller deciding a transfer out for its whole length (`journal._chunks`
        says why). A read of a few records (`get_transfer`, `outcome`, a live `balance`) does
        without: it would never fill a chunk. (A balance at an LSN in a past from before hold
        rows reads up to a checkpoint interval of records; a live one after the journal failed
        replays as many, and pauses too.)"""
        return _Read(self)

    def create_account(self, id: str, *, currency: str, overdraft_limit: int | None = 0, code: int = 0,
                       metadata: Mapping[str, str | int] | None = None) -> Account:
        """Open an account; return once it is durable. Idempotent for identical parameters.

        `code` is a type the host defines (0..65535); `metadata`, at most 16 `str` keys of
        at most 64 characters, each to a `str` of at most 256 characters or an `int`.
        Raises `InvalidRequest` for a malformed id, currency, limit, code or metadata, and
        `AccountExists` if the id exists with different parameters.
        """
        account = checked_account(id, currency, overdraft_limit, code, metadata)
        with self._call():
            self._journal.wait_durable(self._open_account(account), self.timeout_s)
            return account

    def _open_account(self, account: Account) -> int:
        """`create_account` up to its wait: journal a new account (or find it); the LSN to wait
        for. Never waits but for the sequencer lock. Raises `AccountExists`."""
        sequencer = self._sequencer
        with sequencer.lock:
            existing = sequencer.accounts.get(account.id)
            if existing is None:
                return sequencer.open_account(account, Completion(account))
            lsn = sequencer.account_lsns[account.id]
        if existing != account:
            raise _exists(existing)
        return lsn

    def create_accounts(self, accounts: Sequence[Account]) -> list[Account | LedgerError]:
        """Open many accounts at once: one outcome per item, in order, as if `create_account`
        were called for each in turn; returns once every outcome is durable.

        Each item is an `Account` (its fields are `create_account`'s arguments; `metadata`
        may be any mapping). Its outcome is the account, or the `LedgerError` that call would
        have raised: `InvalidRequest` (a field malformed, or the item not an `Account`), or
        `AccountExists` (the id exists, or came earlier in the list, with other fields).
        Accounts are journaled in blocks of `ACCOUNTS_PER_BLOCK_MAX`, each under one hold of
        the sequencer lock. Raises `InvalidRequest` if `accounts` is not a sequence.
        """
        results = checked_accounts(accounts)
        with self._call():
            self._journal.wait_durable(self._open_accounts(results), self.timeout_s)
        return results

    def _open_accounts(self, results: list[Account | LedgerError]) -> int:
        """`create_accounts` up to its wait: journal the new accounts of `results`, block by
        block, turning each that exists otherwise into `AccountExists`; the LSN to wait for.
        The journal failing (or closing) at the first block raises; at a later one, that
        block's items and the rest get its error, the earlier blocks being journaled."""
        sequencer, last = self._sequencer, 0
        for first in range(0, len(results), ACCOUNTS_PER_BLOCK_MAX):
            try:
                with sequencer.lock:
                    last = max(last, self._open_block(results, first))
            except JournalError as error:
                if not first:
                    raise
                failure = ledger_error(error)
                results[first:] = [failure if isinstance(result, Account) else result for result in results[first:]]
                return last
        return last

    def _open_block(self, results: list[Account | LedgerError], first: int) -> int:
        """`create_accounts` of `results[first:first + ACCOUNTS_PER_BLOCK_MAX]` (call under the
        sequencer lock): journal the new ones as one block, turn each existing one that
        differs into `AccountExists`; the LSN to wait for."""
        sequencer = self._sequencer
        known, lsns = sequencer.accounts, sequencer.account_lsns
        new: dict[str, Account] = {}
        last = 0
        for i in range(first, min(first + ACCOUNTS_PER_BLOCK_MAX, len(results))):
            account = results[i]
            if not isinstance(account, Account):
                continue
            existing = known.get(account.id) or new.get(account.id)
            if existing is None:
                new[account.id] = account
            elif existing != account:
                results[i] = _exists(existing)
            elif account.id in lsns:
                last = max(last, lsns[account.id])
        if new:
            try:
                last = sequencer.open_accounts(list(new.values()))
            except InvalidRequest as error:  # a bad reading of a clock of one's own: this block is not opened
                for i in range(first, min(first + ACCOUNTS_PER_BLOCK_MAX, len(results))):
                    account = results[i]
                    if isinstance(account, Account) and account.id in new:
                        results[i] = error
        return last

    def accounts(self) -> list[Account]:
        """Every durable account, in creation order."""
        with self._call():
            sequencer = self._sequencer
            with sequencer.lock:
                listed = [(sequencer.account_lsns[a.id], a) for a in sequencer.accounts.values()]
            durable = self._journal.durable_lsn
            return [account for lsn, account in listed if lsn <= durable]

    def account(self, id: str) -> Account:
        """The durable account `id`. Raises `InvalidRequest` for a malformed id and
        `AccountNotFound` for an unknown one."""
        with self._call():
            return self._account(id)

    def _account(self, account_id: str) -> Account:
        check_id(account_id, "account id")
        account = self._sequencer.accounts.get(account_id)
        if account is None:
            raise AccountNotFound(f"no account {account_id!r}")
        self._journal.wait_durable(self._sequencer.account_lsns[account_id], self.timeout_s)
        return account

    # --- transfers -----------------------------------------------------------------

    def transfer(self, id: str, *, source: str, destination: str, amount: int, code: int = 0,
                 reference: str | None = None, metadata: Mapping[str, str | int] | None = None,
                 pending: bool = False, timeout_s: int | None = None) -> Transfer:
        """Move `amount` from `source` to `destination`; return once the outcome is durable.

        `code` (0..65535), `reference` (the request that started it, at most 256 characters)
        and `metadata` (as for `create_account`) are kept with it. With `pending=True` the
        debit is decided now and the amount held on the source (a pending transfer: `kind`
        and `status` "pending") until `post_pending` or `void_pending`, or until it expires
        `timeout_s` seconds (an int, allowed only with `pending`) after its timestamp.

        A retry with the same id and fields returns the original Transfer, or
        raises the original refusal again. Raises `InvalidRequest`,
        `AccountNotFound`, `CurrencyMismatch`, `InsufficientFunds`,
        `BalanceOverflow`, `IdempotencyConflict`, or `LedgerTimeout` (outcome
        unknown: retry with the same id).
        """
        request = transfer_request(id, source, destination, amount, code, reference, metadata, pending,
                                   timeout_s)
        with self._call():
            return self._coordinator.transfer(request, self.timeout_s)

    def post_pending(self, id: str, *, pending_id: str, amount: int | None = None,
                     reference: str | None = None, metadata: Mapping[str, str | int] | None = None) -> Transfer:
        """Post `amount` (None: all of it) of the pending transfer `pending_id` from its source
        to its destination, releasing the rest of its hold; a new Transfer of kind "post".

        Raises `PendingTransferNotFound`, `PendingTransferAlreadyPosted`,
        `PendingTransferAlreadyVoided`, `PendingTransferExpired`, `ExceedsPendingAmount`
        (each journaled and final for `id`), and as `transfer` does.
        """
        with self._call():
            return self._coordinator.transfer(
                resolution_request(id, pending_id, amount, reference, metadata, False), self.timeout_s)

    def void_pending(self, id: str, *, pending_id: str, reference: str | None = None,
                     metadata: Mapping[str, str | int] | None = None) -> Transfer:
        """Release the whole hold of the pending transfer `pending_id`; a new Transfer of kind
        "void" carrying the amount released. Raises as `post_pending` does."""
        with self._call():
            return self._coordinator.transfer(
                resolution_request(id, pending_id, None, reference, metadata, True), self.timeout_s)

    def transfer_linked(self, requests: Sequence[TransferRequest]) -> list[Transfer]:
        """Apply 1 to 1,000 transfers (distinct ids) as one atomic unit, in list order, each
        seeing the effects of those before it; return their Transfers once durable.

        If one is refused nothing moves, and `LinkedTransferFailed` is raised with `.index`
        (the first refused) and `.cause` (its own error, e.g. `InsufficientFunds`); the
        refusal is journaled and final for every id of the chain.
        """
        with self._call():
            return self._coordinator.transfer_linked(requests, self.timeout_s)

    def expire_pending(self) -> int:
        """Expire every pending transfer whose deadline has come by the ledger's clock, now;
        return how many, once their expiry is durable. (With the wall clock, a thread of the
        ledger does this on its own.)"""
        with self._call():
            expired, lsn = self._coordinator.expire_due()
            self._journal.wait_durable(lsn, self.timeout_s)
            return expired

    def _expire_while_open(self) -> None:
        """The expirer thread: every `EXPIRY_INTERVAL_S` at most (sooner for a nearer deadline).
        A timeout (the writer not keeping up) is tried again after `EXPIRY_INTERVAL_S`; a
        failed journal ends it (every call reports that failure)."""
        sequencer, stopping = self._sequencer, self._stopping
        timed_out = False
        while True:
            deadline = sequencer.next_deadline()
            wait_s = EXPIRY_INTERVAL_S if deadline is None or timed_out else min(
                EXPIRY_INTERVAL_S, max(0.0, (deadline - sequencer.clock()) / 1e9))
            if stopping.wait(wait_s):
                return
            timed_out = False
            try:
                with self._call():
                    self._coordinator.expire_due()
            except LedgerClosed:
                return
            except (LedgerTimeout, JournalTimeoutError):  # the writer not keeping up, for now: nothing written
                logger.warning("expiring pending transfers timed out; trying again", exc_info=True)
                timed_out = True
            except (LedgerError, JournalError):  # the journal failed: the ledger reports it to every call
                logger.exception("expiring pending transfers failed")
                return

    def transfer_many(self, requests: Sequence[TransferRequest]) -> list[Transfer | LedgerError]:
        """One outcome per request, in order: as if applied one after another.

        Each item is the Transfer or the `LedgerError` it would have raised.
        Returns once every outcome is durable.
        """
        items, refused = checked_many(requests)
        with self._call():
            return self._transfer_many(items, refused)

    def _transfer_many(self, items: list[TransferRequest | Resolution],
                       refused: dict[int, LedgerError]) -> list[Transfer | LedgerError]:
        """`transfer_many` of `checked_many`'s items, in a call entered already (`AsyncLedger`'s,
        entered on its loop before it hands the batch to a worker, where `close` may have begun)."""
        if not refused:
            return self._coordinator.transfer_many(items, self.timeout_s)
        rest = iter(self._coordinator.transfer_many([item for i, item in enumerate(items) if i not in refused],
                                                    self.timeout_s))
        return [refused[i] if i in refused else next(rest) for i in range(len(items))]

    def _decide_many(self, requests: Sequence[TransferRequest | Resolution]) -> list[Transfer | LedgerError]:
        """`transfer_many` whose items may also be posts and voids (`Resolution`), decided in
        one batch (engine-internal: `engine._shard` posts a batch's cross-shard transfers so)."""
        with self._call():
            return self._coordinator.transfer_many(list(requests), self.timeout_s)

    def get_transfer(self, id: str) -> Transfer | None:
        """The durable committed Transfer with this id, or None (unknown or refused), with its
        status as of now (a pending transfer's: pending, posted, voided or expired). Never scans."""
        check_id(id, "transfer id")
        with self._call():
            journal = self._journal
            durable = self._history.end()  # (before the snapshot: a record committed to LMDB but not
            # yet released to its callers is not shown, as `entries` and `balance` do not show it;
            # read-only, the records this reader has caught up with)
            with journal.snapshot() as txn:
                return transfer_at(journal, id, durable, txn)

    def outcome(self, id: str) -> Transfer | LedgerError | None:
        """What became of the transfer id `id`, as far as it is durable: its Transfer (as
        `get_transfer` gives it), the `LedgerError` its refusal raises (for a leg of a refused
        linked chain, the chain's `LinkedTransferFailed`), or None if no outcome of it is
        durable (never used, or still in flight). Never scans, never submits anything: after a
        `LedgerTimeout` it tells a host what happened without a retry."""
        check_id(id, "transfer id")
        with self._call():
            return outcome_now(self._journal, id, self._history.end())

    # --- reads ---------------------------------------------------------------------

    def events(self, after_lsn: int = 0, *, follow: bool = False, timeout_s: float | None = None) -> Iterator[Event]:
        """Every business event after `after_lsn`, in LSN order: one per journal record, a
        checkpoint's excepted (`Event`). Only durable records are read; a consumer resumes,
        after any restart of either side, with the LSN of the last event it processed.

        Without `follow` it ends at the last durable record. With `follow` it then waits for
        new ones, each wait bounded, and ends when the ledger closes or when `timeout_s`
        (None: never) passes without a new record. Nothing is held between two events (the
        iterator reads a chunk at a time, in short read transactions). Raises `LedgerClosed`
        now if the ledger is closed, and (not following) if it closes before the end;
        `JournalCorrupted` at a record that fails its checks. An `after_lsn` past the durable
        end reads as nothing yet (a follower waits for the journal to reach it); one that is
        no LSN (an int in 0..2**64-1) is `InvalidRequest`, as in every read of history."""
        check_lsn("after_lsn", after_lsn)
        if type(follow) is not bool:
            raise InvalidRequest(f"follow must be a bool, got {shown(follow)}")
        wait_s = seconds_of(timeout_s)
        if timeout_s is not None and not (wait_s is not None and 0 <= wait_s <= threading.TIMEOUT_MAX):
            raise InvalidRequest(f"timeout_s must be None or a number of seconds in [0, "
                                 f"{threading.TIMEOUT_MAX:.0f}], got {shown(timeout_s)}")
        with self._call():
            pass  # a closed ledger says so here, not at the first event
        return follow_events(self, after_lsn, follow, None if wait_s is None else float(wait_s))

    def _events_last_lsn(self) -> int | None:
        """The last LSN `events` may read (None: the end of the snapshot)."""
        return self._journal.durable_lsn

    def _await_records(self, after_lsn: int, wait_s: float) -> None:
        """Wait (at most `wait_s`, less once the journal closes) for a durable record after
        `after_lsn`; `LedgerUnavailable` if the journal failed (no record will come)."""
        journal = self._journal
        if not journal.wait_past(after_lsn, wait_s) and isinstance(journal.failure, JournalError):
            raise ledger_error(journal.failure) from journal.failure

    def balance(self, account: str, *, at_lsn: int | None = None, at_timestamp: int | None = None) -> Balance:
        """Posted; pending (held by its pending transfers and for outgoing transfers in
        flight); available (posted - pending); incoming (its pending transfers toward it).

        Asks the account's actor, then waits until what it saw is durable, so a
        balance never shows money a crash could take back.

        With `at_lsn` or `at_timestamp` (at most one; nanoseconds since the epoch, as
        `Transfer.timestamp`): the balance after the last record at or before it, counting the
        pending transfers open then (reservations for transfers in flight are not history:
        none is counted). Read from the journal in a time logarithmic in the account's entries;
        `InvalidRequest` for an LSN past the durable end or a time still to come,
        `AccountNotFound` if the account was opened after it.
        """
        if at_lsn is not None or at_timestamp is not None:
            with self._read():  # (a past from before hold rows is read from its records: `_holds_read`)
                history = self._history
                return history.balance(account, history.lsn_of(at_lsn, at_timestamp))
        with self._call():
            self._account(account)
            journal = self._journal
            if journal.failure is not None:
                return self._durable_balance(account)
            # A record durable now may have been queued by a thread still under the sequencer's
            # lock, which hands the accounts its postings after queueing it (and the writer may
            # make it durable at once): once that hold ends, the postings are in the mailboxes
            # ahead of the ask below, so the balance shows every record a read before this call
            # (`get_transfer`, `outcome`, `entries`, the caller's own write) showed. Only when
            # the sequencer has not yet said it handed over everything durable is it waited for.
            sequencer = self._sequencer
            if sequencer.delivered_lsn < journal.durable_lsn and not _lock_free_within(sequencer.lock,
                                                                                       self.timeout_s):
                raise LedgerTimeout(f"balance of {account!r}: the ledger was deciding for {self.timeout_s} s; "
                                    "retry")
            directory = self._directory
            handle = directory.pin(account)
            try:
                posted, pending, incoming, lsn = handle.snapshot(self.timeout_s)
            finally:
                directory.unpin(account)
            try:
                journal.wait_durable(lsn, self.timeout_s)
            except JournalWriteError:  # the journal failed meanwhile: what the actor saw may never be
                return self._durable_balance(account)
            return Balance(posted, pending, posted - pending, incoming)

    def _durable_balance(self, account_id: str) -> Balance:
        """The balance as the journal holds it, for reads after the journal failed (the actors
        may have applied entries that never became durable): replayed from the newest
        checkpoint. No reservation is left: no transfer can be decided any more."""
        with self._journal.reading_in_chunks():  # a replay from the newest checkpoint: a long read (`_read`)
            return balance_of(replay(self._journal, load_checkpoint(self._journal)), account_id)

    def entries(self, account: str, after: int = 0, limit: int | None = None) -> list[Entry]:
        """The account's durable entries with seq > `after`, in seq order, at most `limit`."""
        check_page(after, limit)
        with self._read():
            self._account(account)
            journal = self._journal
            unindexed = self._sequencer.unindexed.rows(account, journal.durable_lsn)  # before the snapshot
            return entries_of(journal, account, after, limit, unindexed)

    def snapshot(self, *, max_age_s: float = SNAPSHOT_AGE_S_DEFAULT) -> Snapshot:
        """A consistent view of the ledger at the durable end of its journal now (`.lsn`,
        `.timestamp`), unaffected by what lands while it is open: `.balance(account)`,
        `.balances(accounts=None)` (None: every account open then), `.entries(account, after,
        limit)`, `.get_transfer(id)`, `.transfers(...)`. Use it as a context manager.

        Each of its reads opens an LMDB read transaction for that read alone: it reads history,
        which never changes, so it holds no reader while idle and stalls neither the writer nor
        the growth of the map. It answers for `max_age_s` seconds (in (0, 3600]; 60 by default),
        then raises `SnapshotExpired`, as it does once left, and `LedgerClosed` once the
        ledger closes: a view of the past used as if it were current is a bug to hear of."""
        max_age_s = check_max_age(max_age_s)
        with self._read():
            history = self._history
            return Snapshot(history, history.end(), max_age_s, self._read, self._opened_lsns)

    def _now(self) -> int:
        """The ledger's time: its clock's, or the last time stamped or answered for if later
        (the clock stepped back; `Sequencer.answered_at`)."""
        sequencer = self._sequencer
        return max(sequencer.clock(), sequencer.last_timestamp)

    def _settled_end(self, timestamp: int) -> int:
        """The durable end once every record stamped before this call is durable, for a read at
        `timestamp`, which from then on no decision is stamped at or before (so the answer
        never changes, even if the clock steps back): the last LSN appended, read under the
        sequencer's lock (a decision reads the clock and queues its record under it), waited
        for (bounded by `timeout_s`)."""
        journal, lock = self._journal, self._sequencer.lock
        if not lock.acquire(timeout=self.timeout_s):
            raise LedgerTimeout(f"the ledger was deciding for {self.timeout_s} s; retry")
        try:
            self._sequencer.answered_at(timestamp)
            last = journal.last_lsn
        finally:
            lock.release()
        try:
            journal.wait_durable(last, self.timeout_s)
        except JournalWriteError:  # the journal failed: nothing past its durable end will land, so that is final
            pass
        return journal.durable_lsn

    def _opened_lsns(self) -> Mapping[str, int]:
        """Each account's opening LSN (read without a lock; it only grows)."""
        return self._sequencer.account_lsns

    def transfers(self, *, account: str | None = None, code: int | None = None, kind: str | None = None,
                  after_lsn: int = 0, until_lsn: int | None = None, limit: int = 100,
                  reverse: bool = False) -> list[Transfer]:
        """Durable transfers in LSN order (newest first with `reverse`) made by the records in
        (`after_lsn`, `until_lsn`] (`until_lsn` None: the durable end): those of `account` (as
        source or destination), of `code`, of `kind` ("single", "pending", "post", "void")
        only, when given; each with its status as of now (as `get_transfer` gives it).

        A page holds at most `limit` (1..10,000) transfers, and never splits the legs of one
        linked chain (which share an LSN): it ends before a chain that would take it past
        `limit`, unless the chain alone is longer. Paging: the next page forward is
        `after_lsn=page[-1].lsn`; backward (`reverse`), `until_lsn=page[-1].lsn - 1`. With
        `account` it reads the account's own entries and hold rows, never the whole journal;
        without, the journal's records from the cursor on. An `after_lsn` past the durable end
        reads as nothing yet (`[]`); one that is no LSN (an int in 0..2**64-1), or an
        `until_lsn` past the durable end, is `InvalidRequest`, and an unknown `account` is
        `AccountNotFound`."""
        with self._read():
            return self._history.transfers(account=account, code=code, kind=kind, after_lsn=after_lsn,
                                           until_lsn=until_lsn, limit=limit, reverse=reverse)

    def state_hash(self) -> str:
        """SHA-256 over every account and all its entries (seq, transfer, amount, balance).

        Journal positions (LSNs) are left out, so a replay into a fresh ledger
        hashes the same. Waits until everything already decided is durable. For a ledger at
        rest (no write in flight, as after a run): while writes go on, its parts are read at
        moments a few records apart, so the hash may be of no state the ledger was ever in.
        """
        with self._read():
            journal = self._journal
            if journal.failure is None:  # else only what is durable counts, and it already is
                journal.wait_durable(journal.last_lsn, self.timeout_s)
            sequencer = self._sequencer
            if journal.failure is None:
                with sequencer.lock:
                    pending = list(sequencer.pending.values())
            else:  # the projection may be past what is durable
                pending = list(replay(journal, load_checkpoint(journal)).pending.values())
            unindexed = sequencer.unindexed.all_rows(journal.durable_lsn)
            return state_hash(journal, self.accounts(), pending, unindexed=unindexed)

    def head(self) -> Head:
        """The durable head of the journal's hash chain: the last durable LSN and the chain's
        digest there (`Head`). Note it down outside the ledger: `tally verify --expect-head
        LSN:DIGEST` proves later that the ledger still extends it.

        Read from memory, in any thread: it never blocks, and moves once a group commit is
        durable (a call decided and not yet durable is not in it). Raises `LedgerClosed`."""
        with self._call():
            return head_of(self._journal.head())

    def stats(self) -> dict[str, int]:
        """Counters for operators and benchmarks (commits, records, live actors...)."""
        with self._call():
            stats = dict(self._journal.stats())
            stats.update(
                accounts=len(self._sequencer.accounts),
                actors_live=self._directory.live,
                activations=self._directory.activations,
                passivations=self._directory.passivations,
                in_flight=self._coordinator.admission.in_flight,
            )
            return stats

    # --- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Finish the calls under way (bounded by `timeout_s`), then stop every thread and
        release the directory. Idempotent; every later call raises `LedgerClosed`.

        A call still under way after that bound ends with a `LedgerError`: `LedgerClosed` if
        nothing was written for it, or its outcome as the journal made it durable. If the
        chain of checkpoints an open would read back has grown long, it journals a checkpoint
        of every account (`Sequencer.checkpoint_on_close`). What was
        journaled is written before this returns (bounded; `LedgerTimeout` if the writer
        cannot drain, and then a retry after reopening learns each outcome). Then, if the
        journal never failed, it checks every page of the data file as an open would and
        seals what it checked, so the next open of those bytes need not (README.md,
        "Damage"): about half a microsecond a B-tree node, seconds for a million accounts.
        A close made while another thread closes the ledger returns once that one has
        (`LedgerTimeout` if it has not within `CLOSE_WAITS` x `timeout_s`)."""
        with self._state:
            closing = self._closed
            if not closing:
                self._closed = True
                self._state.wait_for(lambda: not self._calls, timeout=self.timeout_s)
        if closing:
            if self._forked_from is None and not self._shut.wait(CLOSE_WAITS * self.timeout_s):
                raise LedgerTimeout(f"the ledger at {self.path} is still being closed by another call to close")
            return
        try:
            self._shut_down()
        finally:
            self._shut.set()

    def _shut_down(self) -> None:
        """`close` once the calls under way are done (or its wait for them ran out)."""
        _OPEN.discard(self)
        self._stopping.set()
        if self._expirer is not None:
            self._expirer.join(timeout=self.timeout_s)
        self._stop_workers()
        try:
            self._checkpoint_on_close()
        finally:  # an interrupt in it too: the journal still closes, the directory is let go
            drained = False
            try:
                with ledger_errors():
                    self._journal.close()
                drained = True
            finally:
                self._coordinator.close(drained)

    def _stop_workers(self) -> None:
        """Stop the threads that run calls (those made so far, for an open that fails)."""
        if hasattr(self, "_coordinator"):
            self._coordinator.claims.stop()
        if hasattr(self, "_directory"):
            self._directory.stop()
        self._dispatcher.stop()

    def _checkpoint_on_close(self) -> None:
        """Journal a checkpoint of every account if the next open would otherwise read many
        more rows (`Sequencer.checkpoint_on_close`). Nothing depends on it: one not written
        (a failed journal, a timeout) leaves the open to walk back the checkpoints."""
        if self._journal.failure is not None:
            return
        try:
            self._sequencer.checkpoint_on_close(self.timeout_s)
        except Exception:  # a failed journal, a timeout, no memory for the rows: the chain stays
            logger.exception("no checkpoint journaled at close: the next open walks back the checkpoints")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failure(self) -> LedgerError | None:
        """The error every write gets since the journal failed (a full disk: until the ledger is
        reopened), or None while it can write: for a host's health check (`tally serve`'s
        `GET /health`). Reads go on showing what is durable either way."""
        failure = self._journal.failure
        if failure is None:
            return None
        if isinstance(failure, JournalError):
            return ledger_error(failure)
        return LedgerUnavailable(f"the journal failed: {failure}")


def _lock_free_within(lock: threading.Lock, timeout_s: float) -> bool:
    """Wait, at most `timeout_s`, until no one holds `lock` (taken and given back at once)."""
    if not lock.acquire(timeout=timeout_s):
        return False
    lock.release()
    return True


def balance_of(books: Projection, account_id: str) -> Balance:
    """The account's balance in a projection of the journal (no reservation: none is journaled)."""
    _, posted, _ = books.states[account_id]
    held = books.held.get(account_id, 0)
    return Balance(posted, held, posted - held, books.incoming.get(account_id, 0))


def checked_account(account_id: object, currency: object, overdraft_limit: object, code: object,
                    metadata: object) -> Account:
    """`create_account`'s arguments, each checked (in this order), as an Account; raises
    `InvalidRequest` for the first malformed one."""
    return Account(check_id(account_id, "account id"), check_currency(currency),
                   check_overdraft_limit(overdraft_limit), check_code(code), check_metadata(metadata))


def check_timeout_s(timeout_s: object) -> float:
    """`Ledger.open`'s `timeout_s`, as a float; `InvalidRequest` unless a number of seconds a
    lock can wait."""
    wait_s = seconds_of(timeout_s)
    if not (wait_s is not None and 0 < wait_s <= threading.TIMEOUT_MAX):  # False for NaN
        raise InvalidRequest(f"timeout_s must be a number of seconds in (0, {threading.TIMEOUT_MAX:.0f}] "
                             f"(the most a lock can wait), got {shown(timeout_s)}")
    return float(wait_s)


def checked_accounts(accounts: object) -> list[Account | LedgerError]:
    """`create_accounts`' items, each checked: the Account, or the `InvalidRequest` it is.
    Raises `InvalidRequest` if `accounts` is not a sequence."""
    if not isinstance(accounts, Sequence) or isinstance(accounts, (str, bytes)):
        raise InvalidRequest(f"create_accounts takes a sequence of Account, got {type(accounts).__name__}")
    results: list[Account | LedgerError] = []
    for item in items_of(accounts, "create_accounts"):
        try:
            if not isinstance(item, Account):
                raise InvalidRequest(f"create_accounts takes Account items, got {type(item).__name__}")
            results.append(checked_account(item.id, item.currency, item.overdraft_limit, item.code, item.metadata))
        except LedgerError as error:
            results.append(error)
    return results


def checked_many(requests: object) -> tuple[list[TransferRequest | Resolution], dict[int, LedgerError]]:
    """`transfer_many`'s items, and the `InvalidRequest` of each that is a post or a void by
    its index. Raises `InvalidRequest` if `requests` is not a sequence."""
    if not isinstance(requests, Sequence) or isinstance(requests, (str, bytes)):
        raise InvalidRequest(f"transfer_many takes a sequence of TransferRequest, got {type(requests).__name__}")
    items: list[TransferRequest | Resolution] = items_of(requests, "transfer_many")
    refused: dict[int, LedgerError] = {
        i: InvalidRequest(f"transfer_many takes TransferRequest items, not a post or a void of pending transfer "
                          f"{item.pending_id!r}: call post_pending or void_pending")
        for i, item in enumerate(items) if type(item) is Resolution}
    return items, refused


def check_page(after: object, limit: object) -> None:
    """`entries`' `after` and `limit`; `InvalidRequest` if malformed."""
    if type(after) is not int or after < 0:
        raise InvalidRequest(f"after must be an int >= 0, got {shown(after)}")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise InvalidRequest(f"limit must be None or an int >= 0, got {shown(limit)}")


_OPEN: weakref.WeakSet[Ledger] = weakref.WeakSet()
"""Every ledger open in this process, for `_after_fork`."""


def _refuse_open_here(path: str, readonly: bool) -> None:
    """`LedgerLocked` if the ledger at `path` is open in this process and one of the two opens
    is read-only (two writers meet the directory lock), before any file of it is touched: a
    second open of one LMDB environment in a process, even one refused, closes a descriptor
    of `lock.mdb`, which drops the locks that tell other processes this one reads it (and a
    writer opening next would then reset the table of readers under it)."""
    where = os.path.realpath(path)
    for ledger in list(_OPEN):
        if (readonly or ledger._journal.readonly) and ledger._journal.directory == where:  # (as resolved then)
            raise LedgerLocked(f"the ledger at {path} is open in this process already: use that Ledger")
    if _INHERITED and not _INHERITED.isdisjoint(files_of(where)):
        raise LedgerLocked(f"the ledger at {path} was open in the process this one was forked from, and LMDB keeps "
                           "its files held here by the copy of that environment this process inherited: open it in a "
                           "process started with multiprocessing's 'spawn' or 'forkserver' method")


_INHERITED: set[tuple[int, int]] = set()
"""The files (device, inode) of the ledgers open in the process this one was forked from
(`_after_fork`): py-lmdb refuses them here, as open in this process, by the same keys. A ledger
made anew at one of their paths is other files, and opens."""


def _after_fork() -> None:
    """In a child made by `fork()`: every ledger the parent had open is closed here, at once
    and without touching its threads (which the child does not have) or LMDB (which must not
    be used across a fork); its calls raise `LedgerClosed` saying why, instead of waiting out
    their timeout. The child lets go of its copy of the directory lock, so the lock is the
    parent's alone again."""
    for ledger in list(_OPEN):
        ledger._forked_from = os.getppid()
        ledger._closed = True
        ledger._journal.release_after_fork()
        _INHERITED.update(ledger._journal.files)
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork)


class _Call:
    """`Ledger._call`: a context manager that is a plain object (no generator per call)."""

    __slots__ = ("_ledger",)

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def __enter__(self) -> None:
        ledger = self._ledger
        ledger._calls.append(None)  # before the look at `_closed`: `close` waits for us or we see it
        if ledger._closed:
            self._leave()
            if ledger._forked_from is not None:
                raise LedgerClosed(f"the ledger at {ledger.path} belongs to process {ledger._forked_from}, which "
                                   "opened it: a process made by fork() must open the ledger itself (once the "
                                   "other has closed it)")
            raise LedgerClosed(f"the ledger at {ledger.path} is closed")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: Any) -> None:
        self._leave()
        if isinstance(error, JournalError):
            raise ledger_error(error) from error

    def _leave(self) -> None:
        ledger = self._ledger
        ledger._calls.pop()
        if ledger._closed:
            with ledger._state:
                ledger._state.notify_all()


class _Read(_Call):
    """`Ledger._read`: `_Call`, with the journal's reads in chunks on this thread until left."""

    __slots__ = ("_chunks",)

    def __enter__(self) -> None:
        super().__enter__()
        self._chunks = self._ledger._journal.reading_in_chunks()
        self._chunks.__enter__()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: Any) -> None:
        self._chunks.__exit__(None, None, None)  # (it only restores this thread's state)
        super().__exit__(kind, error, _tb)
