"""A ledger's reads: `LedgerReads`, the base class of `Ledger` (and so of `ReadingLedger`).

Every read answers from what is durable: the accounts, a transfer and what became of an id,
the event stream, a balance now or at an LSN or a time, an account's entries, pages of
transfers, a snapshot, the state hash, the head and the counters. Reads of history go through
`engine._history` (`History`); a read that may be long lets the interpreter go between two
chunks of records (`Ledger._read`). The writes and the opening are `Ledger`'s
(`engine._ledger`), which sets up what these read; opening accounts and closing are its other
bases' (`engine._ledger_accounts`, `AccountCreating`; `engine._ledger_close`, `Closing`), both
over this one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Mapping

from coordinator import (
    SNAPSHOT_AGE_S_DEFAULT,
    Account,
    AccountNotFound,
    Balance,
    Coordinator,
    Entry,
    Event,
    InvalidRequest,
    LedgerError,
    LedgerTimeout,
    Refused,
    Resolution,
    Sequencer,
    Transfer,
    TransferRequest,
    check_id,
    entries_of,
    ledger_error,
    load_checkpoint,
    outcome_now,
    replay,
    seconds_of,
    shown,
    state_hash,
    transfer_at,
    transfer_of,
)
from journal import Journal, JournalError, JournalWriteError

from engine._calls import LedgerCall, LedgerRead, lock_free_within
from engine._checks import balance_of, check_page
from engine._directory import Directory
from engine._follow import follow_events
from engine._head import Head, head_of
from engine._history import History, Snapshot, check_lsn, check_max_age


class LedgerReads:
    """The reads of `Ledger` (see the module docstring); `Ledger` holds what they read."""

    path: str
    timeout_s: float
    _journal: Journal
    _sequencer: Sequencer
    _coordinator: Coordinator
    _directory: Directory
    _history: History
    _calls: deque[None]
    _closed: bool
    _forked_from: int | None
    _state: threading.Condition

    @property
    def closed(self) -> bool:
        return self._closed

    def _call(self) -> LedgerCall:
        """Enter a public call: refuse it if closed, count it until it returns (so `close`
        can wait for it), and turn a `JournalError` from inside into its `LedgerError`."""
        return LedgerCall(self)

    def _read(self) -> LedgerCall:
        """`_call` for a read of the journal that may be long (pages, entries, events, a
        snapshot's reads, `state_hash`, a balance at an LSN or a time): its reads let the
        threads waiting for the interpreter have it between two chunks
        (`Journal.reading_in_chunks`). A page of 10,000 transfers read straight through kept the
        writer and every caller deciding a transfer out for its whole length (`journal._chunks`
        says why). A read of a few records (`get_transfer`, `outcome`, a live `balance`) does
        without: it would never fill a chunk. (A balance at an LSN in a past from before hold
        rows reads up to a checkpoint interval of records; a live one after the journal failed
        replays as many, and pauses too.)"""
        return LedgerRead(self)

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

    # --- reads ---------------------------------------------------------------------

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

    def _refused_request(self, id: str) -> TransferRequest | Resolution | None:
        """The request whose durable refusal is what became of transfer id `id`, as its caller
        made it (`outcome` gives only the error), or None (never used, committed, or not yet
        durable). Never scans (engine-internal: `engine._shard_steps` compares a retry of a
        cross-shard transfer's first step with a refusal an earlier release wrote)."""
        check_id(id, "transfer id")
        with self._call():
            durable = self._history.end()  # (read first, as `outcome` reads it)
            record = transfer_of(self._journal, id)
            if not isinstance(record, Refused) or record.lsn > durable:
                return None
            return next(request for request in record.requests if request.id == id)

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
            if sequencer.delivered_lsn < journal.durable_lsn and not lock_free_within(sequencer.lock,
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
