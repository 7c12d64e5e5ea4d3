"""`Ledger`: the engine a host process embeds.

Threads inside a ledger: one journal writer, `dispatcher_threads` workers that
run every account actor, and the callers' own threads. Every public method is
safe to call from any number of threads at once, and every wait it makes is
bounded by `timeout_s` (raising `LedgerTimeout`).

Here: opening, the writes (transfers, pending transfers, linked chains, batches, expiry) and
the journal's health (`failure`). Its base classes hold the rest: opening accounts
(`engine._ledger_accounts`, `AccountCreating`), closing (`engine._ledger_close`, `Closing`)
and the reads (`engine._ledger_reads`, `LedgerReads`, the base of both); a call's lifetime and
the ledgers a process has open are `engine._calls`', the checks of a call's arguments
`engine._checks`'.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coordinator import (
    INDEX_NAMES,
    CHECKPOINT_RECORDS_INTERVAL,
    EXPIRY_INTERVAL_S,
    INFLIGHT_TRANSFERS_MAX,
    TIMEOUT_S_DEFAULT,
    Coordinator,
    InvalidRequest,
    LedgerClosed,
    LedgerError,
    LedgerTimeout,
    LedgerUnavailable,
    Resolution,
    Sequencer,
    Transfer,
    TransferRequest,
    check_ids_against_records,
    checked_clock,
    check_path,
    ledger_error,
    ledger_errors,
    recover,
    shown,
    resolution_request,
    transfer_request,
)
from journal import Journal, JournalError, JournalTimeoutError

from engine._calls import OPEN_LEDGERS, refuse_open_here
from engine._checks import check_timeout_s, checked_many
from engine._directory import Directory
from engine._history import History
from engine._ledger_accounts import AccountCreating
from engine._ledger_close import Closing
from engine._runtime import Dispatcher

ACTORS_LIVE_MAX_DEFAULT = 65_536
DISPATCHER_THREADS_DEFAULT = 1

logger = logging.getLogger("tally.engine")


class Ledger(AccountCreating, Closing):
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
            self._closer: threading.Thread | None = None
            """The thread of the first `close`, while and after it runs (see `Closing._await_closed`)."""
            self._close_failure: Exception | None = None
            """What the first `close` raised, if it failed: every later close raises it too."""
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
        OPEN_LEDGERS.add(self)

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
        refuse_open_here(path, readonly)
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
        one batch (engine-internal: `engine._shard_steps` posts a batch's cross-shard transfers so)."""
        with self._call():
            return self._coordinator.transfer_many(list(requests), self.timeout_s)

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
