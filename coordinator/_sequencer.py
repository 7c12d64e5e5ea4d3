"""The sequencer: the one place where decisions get their journal order and their time.

A decision (open an account; commit or refuse a transfer, a post or a void of a pending
transfer, a linked chain; expire pending transfers) is made by the rules (`rules.decide`)
from the projection, stamped with its LSN and timestamp (`coordinator._stamps`, `Stamping`),
and appended to the journal under one short lock (`coordinator._appends`, `Appending`; an
account's record: `coordinator._account_opening`, `AccountOpening`; both base classes of
`Sequencer`, over `Stamping`), and what it does to each account (`coordinator._postings`) is
handed to the account inside that same lock. So every account receives its entries in LSN
order, which is the order replay applies them in, and an entry's seq and balance are decided
exactly once, here. The sequencer itself keeps the projection, expiry (the open pending
transfers' deadlines: `coordinator._deadlines`, `Deadlines`, its third base), counting what
was queued (`_appended`) and the checkpoints.

The lock covers deciding, stamping and queueing only (microseconds), never a wait: the
protocol before it (reserving funds in the sources' mailboxes) runs in parallel.

Timestamps: nanoseconds since the epoch from `clock`, made strictly increasing in LSN order
(a clock that steps back, or repeats, gets the last timestamp + 1), also across a reopen:
the projection carries the last one journaled. The wall clock is read once for a chunk of
decisions made together in turn on their own paths (plain transfers, chains of single
transfers, pending transfers, posts and voids of open ones: each after the first gets the last
timestamp + 1, so a post may be decided a little after its deadline by the wall clock, never by
its own timestamp, which replay decides it by again); a clock
of the caller's own (a test's, a replay's) is read once per decision, so it gives each
decision the time it says (`tally replay` sets every copied transfer's original timestamp so),
and a bad reading of it fails that decision alone (`InvalidRequest`, `checked_clock`), before
anything moved for it.

The sequencer keeps the journal-order projection (`Projection`: every account's state, the
open pending transfers and what they hold). It only grows by appending; the account actors
apply the same entries with the same pure `post` and must agree with it, so the projection
is both the stamp source and a cross-check. And it keeps the entries stamped since the
newest checkpoint (`unindexed`), which the next checkpoint has written to the entry index
behind it (see `coordinator._entries`). What a checkpoint holds is made by
`coordinator._checkpoint_rows`.
"""

from __future__ import annotations

import gc
import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

from journal import Behind, Journal, JournalError, crash_point

from coordinator._account_opening import AccountOpening
from coordinator._appends import Appending
from coordinator._checkpoint_rows import CheckpointRows, pending_rows
from coordinator._deadlines import Deadlines
from coordinator._entering import expire, holds_expired
from coordinator._entries import Unindexed, Joined, UnindexedEntries, first_key, hold_row_lsn, newest_checkpoint_lsn
from coordinator._history import resolution_of
from coordinator._limits import (
    CHECKPOINT_ACCOUNTS_MAX,
    CHECKPOINT_RECORDS_INTERVAL,
    CLOSE_CHECKPOINT_PENDING,
    CLOSE_CHECKPOINT_ROWS,
    EXPIRY_RECORD_IDS_MAX,
    UNINDEXED_ENTRIES_MAX,
)
from coordinator._postings import Deliver, releasing_hold
from coordinator._records import (
    CHECKPOINT5,
    CHECKPOINTS_INDEX,
    ENTRIES_INDEX,
    EXPIRY3,
    HOLDS_FROM_KEY,
    INDEXED_TO_KEY,
    TRANSFERS_INDEX,
    encode,
    encode_holds,
    holds_key,
    lsn_value,
    resolution_key,
)
from coordinator._rules import Leg
from coordinator._stamps import NOTHING_UNENTERED, Pin
from coordinator._state import Pending, Projection
from coordinator._values import Request, TransferStatus

logger = logging.getLogger("tally.coordinator")

_ID = attrgetter("id")


class Sequencer(AccountOpening, Appending, Deadlines):
    """Owns journal order. Every method is called with no lock held and returns at once,
    unless it says to hold `lock`. It is the `rules.Book` decisions read."""

    def __init__(
        self,
        journal: Journal,
        books: Projection,
        checkpoint_interval: int = CHECKPOINT_RECORDS_INTERVAL,
        unindexed: Unindexed | None = None,
        unindexed_holds: Unindexed | None = None,
        since_checkpoint: int = 0,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """`books`: the projection recovery rebuilt (taken over, not copied); `unindexed` holds
        the entries of the commits after the newest checkpoint, which `since_checkpoint`
        records follow (both from recovery; none for a new journal). `clock`: nanoseconds
        since the epoch."""
        self.lock = threading.Lock()
        self.delivered_lsn = journal.last_lsn
        """Every record up to it has had its postings handed to its accounts: set under `lock`,
        once a record is queued and its postings are (`_appended`); a read that finds it behind
        the durable LSN waits for the hold of `lock` in progress to end (`Ledger.balance`)."""
        self.checkpoint_interval = checkpoint_interval
        self._since_checkpoint = since_checkpoint
        self.unindexed = UnindexedEntries(unindexed)
        self.unindexed_holds = UnindexedEntries(unindexed_holds, hold_row_lsn)
        """The hold rows of the records since the newest checkpoint (which `unindexed_holds`
        holds for a sequencer taking over from recovery), written by the next one."""
        self._prefixes: dict[str, bytes] = {}
        """Entry-index key prefix per account, computed once."""
        self._journal = journal
        self.clock = clock
        self.accounts = books.accounts
        """Every account, in creation order. Read freely; written only under `lock`."""
        self.account_lsns = books.account_lsns
        self.states = books.states
        """Journal-order projection of every account; written only under `lock`."""
        self.held = books.held
        self.incoming = books.incoming
        self.pending = books.pending
        """The open pending transfers: read freely (to route a post), written under `lock`."""
        self.opened_since = books.opened_since
        self.closed_since = books.closed_since
        """The pending transfers opened and closed since the last checkpoint (the next holds
        the first still open, and names the others)."""
        self._pending_sweep = books.pending_sweep
        """Where the next checkpoint's sweep of the open pending transfers starts (`pending_rows`)."""
        self._pending_base = books.checkpoint_chain[0] if books.checkpoint_chain is not None else 0
        """The checkpoint `opened_since` and `closed_since` count from (0: none known, so the
        next checkpoint holds every open pending transfer)."""
        self.last_timestamp = books.last_timestamp
        self.index_entries = books.index_entries
        self._set_up_deadlines(books.pending)
        self._journaled_timestamp = books.last_timestamp
        """The last stamp of a record queued (set as each is: `_append`, `_opened`, `expire`),
        which a checkpoint holds: `last_timestamp` may be past it (a read's `answered_at`, a
        stamp whose record was not queued)."""
        self._resolved: dict[str, TransferStatus] = {}
        """Pending transfers resolved by records not yet durable (the index answers for the rest)."""
        self._resolved_at: deque[tuple[int, str]] = deque()
        self._unentered: tuple[Sequence[Request], list[Leg], int, int] = NOTHING_UNENTERED
        """What `stamp` decided without entering it (`enter_stamped`), until it is entered or
        its record was not queued (`_not_appended`): `NOTHING_UNENTERED` again."""
        self.rows = CheckpointRows(books)
        """What the next checkpoint holds, and the chain an open would read back."""
        with journal.snapshot() as txn:
            self._holds_from_due = journal.index_get(ENTRIES_INDEX, HOLDS_FROM_KEY, txn) is None
            """No `HOLDS_FROM_KEY` yet: the next block appended (never a checkpoint: one follows
            another record) carries it, with its own LSN, and the baseline hold rows."""
            marked = journal.index_get(ENTRIES_INDEX, INDEXED_TO_KEY, txn) is not None
            self._indexed_to: int | None = None if marked else newest_checkpoint_lsn(journal, txn)
            """No `INDEXED_TO_KEY` yet, so readers take the newest checkpoint for it: its LSN. The
            first checkpoint writes the key with its record, naming this one, whatever it
            carries (its own mark follows behind it, once its rows are in)."""
        self._baseline: list[bytes] = []
        """The baseline hold rows (`coordinator._records.holds_key` at LSN 0) of a ledger from
        before hold rows: every account's pending amounts as the records before the mark leave
        them, which are the projection's now, before anything is appended."""
        if self._holds_from_due:
            for account in {**self.held, **self.incoming}:
                held, incoming = self.held.get(account, 0), self.incoming.get(account, 0)
                if held or incoming:
                    self._baseline += (holds_key(account, 0), encode_holds(held, incoming))

    # --- the rules' view of the books ------------------------------------------------

    @property
    def last_lsn(self) -> int:
        """The journal's last LSN, appended if not yet durable (read without `lock`: it only grows)."""
        return self._journal.last_lsn

    @property
    def clock_per_decision(self) -> bool:
        """Whether `clock` is read for each decision, not once a chunk: a clock other than
        the wall clock (see the module docstring)."""
        return self.clock is not time.time_ns

    def resolution(self, pending_id: str) -> TransferStatus | None:
        """What resolved a pending transfer no longer open; call under `lock`."""
        status = self._resolved.get(pending_id)
        if status is not None:
            return status
        with self._journal.snapshot() as txn:
            return resolution_of(self._journal, pending_id, txn)

    def answered_at(self, timestamp: int) -> None:
        """A read is answering for `timestamp` (call under `lock`, before it settles the end it
        reads to): every decision from now on is stamped after it, whatever the clock reads
        (it may step back), so the answer never changes."""
        if timestamp > self.last_timestamp:
            self.last_timestamp = timestamp

    # --- decisions (accounts opened: `coordinator._account_opening`; stamped:
    # `coordinator._stamps`; queued, and the mailbox path's: `coordinator._appends`) ---------

    def expire(self, deliver: Deliver, pin: Pin) -> tuple[int, int]:
        """Journal the expiry of every open pending transfer whose deadline has come by the
        clock (read once: the first expiry record's timestamp), at most `EXPIRY_RECORD_IDS_MAX`
        a record, and deliver the holds it releases: (how many expired, the LSN of the last
        expiry record, 0 if none). `pin`: as for `commit`."""
        expired = last = 0
        with self.lock:
            pending = self.pending
            cutoff = max(self.clock(), self.last_timestamp + 1)  # one reading: what is due by it expires
            while True:
                now = max(cutoff, self.last_timestamp + 1)  # `timestamp`, spent only if a record is made
                due: list[Pending] = []
                holders: list[str] = []
                lsn = 0
                added = False
                try:  # (an interrupt before the record's hold rows are added: what it took is due again)
                    taken: set[str] = set()
                    while len(due) < EXPIRY_RECORD_IDS_MAX:
                        top = self._due_top(cutoff)  # (the heaps, read again after each `_appended`)
                        if top is None:
                            break
                        heap, (deadline, pending_id) = top
                        found = pending.get(pending_id)
                        if found is not None and found.deadline == deadline and pending_id not in taken:
                            due.append(found)
                            taken.add(pending_id)  # (a second copy of an entry: see `Deadlines._compact_deadlines`)
                        elif self._deadlines_stale:  # a stale one gone (perhaps not one counted)
                            self._deadlines_stale -= 1
                        heapq.heappop(heap)  # only once `due` holds it: an interrupt leaves a copy, never none
                    if not due:
                        break
                    self.last_timestamp = now
                    lsn = self._journal.last_lsn + 1
                    ids = [found.id for found in due]
                    index: list[bytes] = []
                    key_lsn = lsn_value(lsn)
                    for pending_id in ids:
                        index += (resolution_key(pending_id), key_lsn)
                    holds: list[bytes] = []
                    self._hold_rows(holds_expired(due, self.held, self.incoming), key_lsn, holders, holds)
                    added = True
                    self.unindexed_holds.add(holders, holds)
                    appended = self._journal.append_block([encode([EXPIRY3, now, ids])],
                                                          self._marked({TRANSFERS_INDEX: index}, lsn), [None])
                    self._journaled_timestamp = now
                    assert appended == lsn, (appended, lsn)
                    self._holds_from_due = False
                    for pending_id in ids:
                        self._resolved[pending_id] = "expired"
                        self._resolved_at.append((lsn, pending_id))
                    self.index_entries += len(ids)
                    crash_point("during-expiry")
                    pin([name for found in due for name in (found.source, found.destination)])
                    expire(self, ids)
                    deliver([posting for found in due for posting in releasing_hold(found, lsn)])
                except BaseException as error:
                    if lsn and self._journal.last_lsn >= lsn:  # queued (a bug, or an interrupt, after): memory is behind it
                        self.broken(error)
                        raise
                    if added:
                        if not isinstance(error, Exception):  # an interrupt, perhaps partway through the add:
                            self.broken(error)  # memory may hold rows of a record never queued, as `_not_appended`
                            raise
                        self.unindexed_holds.remove(holders)
                    for found in due:  # not expired after all: due again next time
                        heapq.heappush(self._deadlines, (found.deadline, found.id))
                    raise
                expired += len(ids)
                last = lsn
                self._appended()
        return expired, last

    # --- appending (what every path that queues a record calls) ---------------------------

    def _marked(self, index: dict[str, Any], lsn: int) -> dict[str, Any]:
        """`index` (the puts of a block starting at `lsn`), with `HOLDS_FROM_KEY` and the
        baseline hold rows if still due (written at once, in the block's transaction)."""
        if self._holds_from_due:
            holds = index.get(ENTRIES_INDEX)
            index[ENTRIES_INDEX] = [*(holds or ()), HOLDS_FROM_KEY, lsn_value(lsn), *self._baseline]
        return index

    def _appended(self, records: int = 1) -> None:
        """Count records appended; journal a checkpoint when one is due. The records are
        queued already, so a checkpoint that cannot be queued must not fail them: it is
        logged and tried again after the next record (the writer reports its own failure).
        Every path that queues a record calls it once it has handed over that record's
        postings (`delivered_lsn`), and it has entered everything it stamped: so the stale
        deadlines are compacted here, a step at a time (`Deadlines._compact_deadlines`, which
        says why here)."""
        self.delivered_lsn = self._journal.last_lsn
        if not self._unentered[1]:  # (a stamp left unentered: only an interrupt between a failed append and
            # `_not_appended` leaves one; its deadline could be dropped, so no compaction then, nor a failed write)
            self._tidy_deadlines(records)
        self._since_checkpoint += records
        durable, indexed = self._journal.durable_lsn, self._journal.indexed_lsn
        self.unindexed.release(indexed)
        self.unindexed_holds.release(indexed)
        resolved_at = self._resolved_at
        while resolved_at and resolved_at[0][0] <= durable:  # the index answers for these now
            self._resolved.pop(resolved_at.popleft()[1], None)
        unindexed = self.unindexed
        holds = self.unindexed_holds
        if (self._since_checkpoint >= self.checkpoint_interval
                or unindexed.count + holds.count >= UNINDEXED_ENTRIES_MAX
                or len(unindexed.current) + len(holds.current) >= CHECKPOINT_ACCOUNTS_MAX):
            try:
                self.checkpoint()
                self.delivered_lsn = self._journal.last_lsn  # (a checkpoint has no postings)
            except JournalError:
                logger.exception("checkpoint not journaled; trying again after the next record")

    def checkpoint(self, whole: bool = False, pending_whole: bool = False) -> int:
        """Journal the projection as of now (call with `lock` held), as a CHECKPOINT5: the rows
        of the accounts that changed or opened since the last checkpoint, and of a slice of
        the others (the sweep, see `coordinator._records`), or with `whole` of every account
        (`checkpoint_on_close`); likewise the open pending transfers opened since, a slice of
        the others, and the ids of those closed since (`pending_rows`), or with `whole` or
        `pending_whole` every one; the
        last timestamp; and behind it, in slices over the group commits after it, the entry
        index rows of every record since the last (their entries, and their hold rows), then
        `INDEXED_TO_KEY` (see `coordinator._entries`). The first checkpoint a sequencer
        writes without knowing the one before it (`Projection.checkpoint_chain` is None)
        holds every account.

        Opening the ledger starts from the newest checkpoint and replays only the
        records after it; a full replay checks every checkpoint it passes.
        """
        assert self.lock.locked()
        rows, previous, sweep_next, total = self.rows.next(self.unindexed.current, whole)
        # Pending transfers are packed as lists are: a list each made here cost ~1 us (the collector).
        share = len(rows) / total if previous else 0.0
        pendings, pending_base, pending_next = pending_rows(
            self.pending, self.opened_since, self.closed_since,
            0 if whole or pending_whole else self._pending_base, self._pending_sweep, share)
        closed = list(map(_ID, self.closed_since)) if pending_base else []
        lsn = self._journal.last_lsn + 1
        index: dict[str, list[bytes]] = {CHECKPOINTS_INDEX: [lsn_value(lsn), b""]}
        carried = Joined(sorted(self.unindexed.ordered_parts() + self.unindexed_holds.ordered_parts(), key=first_key))
        # The mark goes behind it even with no rows to carry (a close's checkpoint after another): the
        # writer puts it once the rows of the checkpoints before are in. (Left naming the one
        # before, an open would derive entries from the records since, this one among them.)
        behind: Behind = (ENTRIES_INDEX, carried, {ENTRIES_INDEX: [INDEXED_TO_KEY, lsn_value(lsn)]})
        if self._indexed_to is not None:  # (no key yet: written with the record, whatever it carries)
            index[ENTRIES_INDEX] = [INDEXED_TO_KEY, lsn_value(self._indexed_to)]
        payload = encode([CHECKPOINT5, self._journaled_timestamp, self.index_entries + 1, previous, total, sweep_next, rows,
                          pendings, pending_base, closed, len(self.pending), pending_next[1]])
        try:
            appended = self._journal.append_block([payload], index, [None], behind=behind)  # may time out: nothing changed
            self.index_entries += 1
            assert appended == lsn, (appended, lsn)
            self._indexed_to = None
            self.unindexed.carry(lsn)
            self.unindexed_holds.carry(lsn)
            crash_point("during-checkpoint")
            self._since_checkpoint = 0
            self.rows.journaled(lsn, len(rows), previous, sweep_next, total)
            self.opened_since.clear()
            self.closed_since.clear()
            self._pending_base, self._pending_sweep = lsn, pending_next
        except BaseException as error:
            if self._journal.last_lsn >= lsn:  # queued (an interrupt after it): memory is behind it
                self.broken(error)
            raise
        return lsn

    def checkpoint_on_close(self, timeout_s: float) -> int | None:
        """Journal a checkpoint of every account if an open would otherwise read more than
        `CLOSE_CHECKPOINT_ROWS` times as many rows (`CheckpointRows.rows_an_open_reads`: up to about twice
        as many, see `coordinator._records`); its LSN, or None. What a database's shutdown
        checkpoint is: the close pays (~1 s a million accounts) what the next open then need
        not (about a third of its time, measured). An open that read a long chain (after a
        crash) is followed by one at close even if nothing was written meanwhile. Else, one of
        every open pending transfer (and the accounts that changed) if the newest holds only
        some and more than `CLOSE_CHECKPOINT_PENDING` are open."""
        if not self.lock.acquire(timeout=timeout_s):
            return None
        collecting = gc.isenabled()
        gc.disable()  # millions of new tuples, in no cycle: each collection on the way walks all of them
        try:
            if self.rows.rows_an_open_reads(len(self.accounts)) > CLOSE_CHECKPOINT_ROWS * len(self.accounts):
                return self.checkpoint(whole=True)
            if self._pending_sweep[1] and len(self.pending) > CLOSE_CHECKPOINT_PENDING:  # the newest holds some
                return self.checkpoint(pending_whole=True)
            return None
        finally:
            if collecting:
                gc.enable()
            self.lock.release()

