"""The sequencer: the one place where decisions get their journal order and their time.

A decision (open an account; commit or refuse a transfer, a post or a void of a pending
transfer, a linked chain; expire pending transfers) is made by the rules (`rules.decide`)
from the projection, stamped with its LSN and timestamp (`coordinator._stamps`, the base
class of `Sequencer`), and appended to the journal under one short lock, and what it does to
each account is handed to the account inside that same lock. So every account receives its entries in LSN order, which is the order replay applies
them in, and an entry's seq and balance are decided exactly once, here.

The lock covers deciding, stamping and queueing only (microseconds), never a wait: the
protocol before it (reserving funds in the sources' mailboxes) runs in parallel.

Timestamps: nanoseconds since the epoch from `clock`, made strictly increasing in LSN order
(a clock that steps back, or repeats, gets the last timestamp + 1), also across a reopen:
the projection carries the last one journaled. The wall clock is read once for a chunk of
plain transfers and chains of single transfers decided together in turn (each after the first
gets the last timestamp + 1); a clock
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
from typing import TYPE_CHECKING, Any

from journal import CRASH_POINT_ARMED, Behind, Completion, Journal, JournalError, crash_point

from coordinator._checkpoint_rows import CheckpointRows
from coordinator._entries import Unindexed, Joined, UnindexedEntries, first_key, hold_row_lsn, newest_checkpoint_lsn
from coordinator._history import resolution_of
from coordinator._limits import (
    CHECKPOINT_ACCOUNTS_MAX,
    CHECKPOINT_RECORDS_INTERVAL,
    CLOSE_CHECKPOINT_ROWS,
    EXPIRY_RECORD_IDS_MAX,
    UNINDEXED_ENTRIES_MAX,
)
from coordinator._participant import reservations
from coordinator._records import (
    ACCOUNT4,
    ACCOUNTS_INDEX,
    CHECKPOINT4,
    CHECKPOINTS_INDEX,
    ENTRIES_INDEX,
    EXPIRY3,
    HOLDS_FROM_KEY,
    INDEXED_TO_KEY,
    TRANSFERS_INDEX,
    encode,
    encode_holds,
    holds_key,
    id_key,
    lsn_value,
    resolution_key,
)
from coordinator._rules import NOTHING, Leg, Refusal, enter, expire, holds_expired
from coordinator._stamps import Chunk, Pin, Stamping
from coordinator._state import NO_ENTRIES, Pending, Posting, Projection
from coordinator._values import PENDING, SINGLE, Account, Request, TransferStatus

if TYPE_CHECKING:
    from coordinator._claims import Ticket

Deliver = Callable[[list[Posting]], None]

logger = logging.getLogger("tally.coordinator")


class Sequencer(Stamping):
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
        self.last_timestamp = books.last_timestamp
        self.index_entries = books.index_entries
        self._deadlines: list[tuple[int, str]] = [(p.deadline, p.id) for p in books.pending.values() if p.deadline]
        heapq.heapify(self._deadlines)
        self._journaled_timestamp = books.last_timestamp
        """The last stamp of a record queued (set as each is: `_append`, `_opened`, `expire`),
        which a checkpoint holds: `last_timestamp` may be past it (a read's `answered_at`, a
        stamp whose record was not queued)."""
        self._resolved: dict[str, TransferStatus] = {}
        """Pending transfers resolved by records not yet durable (the index answers for the rest)."""
        self._resolved_at: deque[tuple[int, str]] = deque()
        self._unentered: tuple[Sequence[Request], list[Leg], int, int] = ((), [], 0, 0)
        """What `stamp` decided without entering it (`enter_stamped`)."""
        self.rows = CheckpointRows(books)
        """What the next checkpoint holds, and the chain an open would read back."""
        with journal.snapshot() as txn:
            self._holds_from_due = journal.index_get(ENTRIES_INDEX, HOLDS_FROM_KEY, txn) is None
            """No `HOLDS_FROM_KEY` yet: the next block appended (never a checkpoint: one follows
            another record) carries it, with its own LSN, and the baseline hold rows."""
            marked = journal.index_get(ENTRIES_INDEX, INDEXED_TO_KEY, txn) is not None
            self._indexed_to: int | None = None if marked else newest_checkpoint_lsn(journal, txn)
            """No `INDEXED_TO_KEY` yet, so readers take the newest checkpoint for it: its LSN. The
            first checkpoint with rows to write behind it writes the key with its record, naming
            this one, before any of them."""
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

    # --- accounts ----------------------------------------------------------------------

    def open_account(self, account: Account, completion: Completion) -> int:
        """Journal a new account. The caller checked, under `lock`, that the id is free."""
        assert self.lock.locked()
        assert account.id not in self.accounts, account.id
        metadata = None if account.metadata is None else account.metadata.as_dict()
        payload = encode([ACCOUNT4, self.timestamp(), account.id, account.currency, account.overdraft_limit,
                          account.code, metadata])
        lsn = self._journal.last_lsn + 1
        index = [(ACCOUNTS_INDEX, id_key(account.id), lsn_value(lsn))]
        if self._holds_from_due:
            marks = iter(self._marked({}, lsn)[ENTRIES_INDEX])
            index += ((ENTRIES_INDEX, key, value) for key, value in zip(marks, marks, strict=True))
        try:
            appended = self._journal.append(payload, index, completion)
        finally:
            self._opened((account,), lsn)
        assert appended == lsn, (appended, lsn)
        self._appended()
        return lsn

    def open_accounts(self, accounts: Sequence[Account]) -> int:
        """Journal new accounts as one block (`open_account` of each, in order); the LSN of
        the last. The caller checked, under `lock`, that every id is free and none repeats."""
        assert self.lock.locked()
        payloads: list[bytes] = []
        keys: list[bytes] = []
        first = lsn = self._journal.last_lsn + 1
        readings = [self.clock() for _ in accounts]  # every reading first: a bad one raises before anything moved
        for account, now in zip(accounts, readings, strict=True):
            timestamp = self.timestamp(1, now)
            metadata = None if account.metadata is None else account.metadata.as_dict()
            payloads.append(encode([ACCOUNT4, timestamp, account.id, account.currency, account.overdraft_limit,
                                    account.code, metadata]))
            keys += (id_key(account.id), lsn_value(lsn))
            lsn += 1
        try:
            appended = self._journal.append_block(payloads, self._marked({ACCOUNTS_INDEX: keys}, first),
                                                  [None] * len(payloads))
        finally:
            self._opened(accounts, first)
        assert appended == first, (appended, first)
        self._appended(len(payloads))
        return first + len(payloads) - 1

    def _opened(self, accounts: Sequence[Account], first: int) -> None:
        """The projection takes the accounts journaled from `first` on, if their records were
        queued: also when an interrupt came out of the append after it queued them (else a
        retry would find the ids free and journal them twice)."""
        if self._journal.last_lsn < first:
            return
        self._journaled_timestamp = self.last_timestamp
        self._holds_from_due = False
        self.index_entries += len(accounts)
        account_lsns, states, known = self.account_lsns, self.states, self.accounts
        for lsn, account in enumerate(accounts, first):
            account_lsns[account.id] = lsn
            states[account.id] = NO_ENTRIES
            known[account.id] = account  # last: threads that find it there (without the lock) find the rest

    # --- decisions (stamping them: `coordinator._stamps`) ------------------------------

    def broken(self, error: BaseException) -> None:
        """A bug met after the projection (or an account) moved past a decision and before
        all of it reached the journal and the accounts: fail the journal, so nothing is
        written on top of memory the journal does not hold; reopening rebuilds it."""
        logger.error("the ledger's memory and its journal disagree after %r: refusing writes until reopened", error)
        self._journal.refuse_writes(f"refusing writes until the ledger is reopened: {error!r} was raised while a "
                                    "decision was being applied")

    def enter_stamped(self) -> None:
        """Move the projection past the legs `stamp` decided without `enter_now`."""
        requests, legs, lsn, timestamp = self._unentered
        enter(self, requests, legs, lsn, timestamp)

    def _not_appended(self, error: BaseException, lsn: int, counts: tuple[int, int]) -> None:
        """After `error` came out of appending the record stamped at `lsn`: forget what its
        stamp counted (`_undo_counts`), unless it was queued all the same, or `error` is an
        interrupt, which may have landed partway through what `_append` puts in memory: then
        memory cannot be trusted to follow the journal, and writes stop (`broken`)."""
        if self._journal.last_lsn >= lsn or not isinstance(error, Exception):
            self.broken(error)
        else:
            self._undo_counts(*counts)

    def _undo_counts(self, index_entries: int, resolved: int) -> None:
        """Forget what stamps counted for records the journal refused to queue: the index
        entries they would have put, the pending transfers they would have resolved."""
        self.index_entries = index_entries
        while len(self._resolved_at) > resolved:
            self._resolved.pop(self._resolved_at.pop()[1], None)

    def _marked(self, index: dict[str, Any], lsn: int) -> dict[str, Any]:
        """`index` (the puts of a block starting at `lsn`), with `HOLDS_FROM_KEY` and the
        baseline hold rows if still due (written at once, in the block's transaction)."""
        if self._holds_from_due:
            holds = index.get(ENTRIES_INDEX)
            index[ENTRIES_INDEX] = [*(holds or ()), HOLDS_FROM_KEY, lsn_value(lsn), *self._baseline]
        return index

    def commit(self, ticket: Ticket, deliver: Deliver, reserved: bool, pin: Pin | None = None,
               refused: tuple[Deliver, list[Posting]] | None = None) -> list[Leg] | Refusal:
        """The mailbox path's decision, once every source has reserved its debits (`reserved`;
        or a ticket with none to reserve): decide the ticket from the projection, journal it
        (committed or refused), and deliver what it does to each account (the postings, which
        end the sources' reservations). The writer releases the ticket once its record is
        durable.

        `pin`, for a caller that did not pin every account the decision may touch beforehand
        (a post or a void: its pending transfer may have opened since it looked), pins the
        accounts the legs touch, under `lock` and before the projection moves: an account
        activated later starts from a projection past this decision, one activated earlier
        gets its postings, never both.

        `refused`: `(release, releases)`, the sources' reservations to hand back if it is refused,
        in the same hold of the lock as the refusal is queued (as `reject` does)."""
        chunk = Chunk()
        with self.lock:
            lsn = self._journal.last_lsn + 1
            counts = self.index_entries, len(self._resolved_at)
            try:  # from the stamp on: an interrupt between it and the append moved the counts
                decided = self.stamp(chunk, ticket, lsn, NOTHING, pin, enter_now=False)
                appended = self._append(chunk, lsn)
            except BaseException as error:
                self._not_appended(error, lsn, counts)
                raise
            assert appended == lsn, (appended, lsn)
            if type(decided) is not Refusal:
                try:
                    self.enter_stamped()
                    crash_point("after-commit-queued")
                    made = postings(decided, lsn, reserved)  # type: ignore[arg-type]
                    if CRASH_POINT_ARMED and len(decided) > 1:
                        deliver(made[:2])  # the first leg's
                        crash_point("mid-linked-chain")
                        made = made[2:]
                    deliver(made)
                except BaseException as error:  # a bug, or an interrupt: memory is behind the queued record
                    self.broken(error)
                    raise
            elif refused is not None and refused[1]:
                refused[0](refused[1])
            self._appended()
        return decided

    def reject(self, ticket: Ticket, index: int, code: str, release: Deliver | None = None,
               releases: list[Posting] | None = None) -> int:
        """Journal a refusal decided before the sequencer (a source refused its debit in its
        mailbox); it consumes every id of the ticket. The writer releases it once durable.
        `release(releases)`: the other sources' reservations handed back, once it is queued
        and in the same hold (a balance that waits for the hold sees them gone)."""
        chunk = Chunk()
        with self.lock:
            lsn = self._journal.last_lsn + 1
            counts = self.index_entries, len(self._resolved_at)
            try:  # from the stamp on, as in `commit`
                self.stamp_refusal(chunk, ticket, lsn, self.timestamp(len(ticket.requests)), index, code)
                appended = self._append(chunk, lsn)
            except BaseException as error:
                self._not_appended(error, lsn, counts)
                raise
            assert appended == lsn, (appended, lsn)
            if release is not None and releases:
                release(releases)  # (only queues: a reservation is not journaled, so the record does not wait on it)
            self._appended()
        return lsn

    def expire(self, deliver: Deliver, pin: Pin) -> tuple[int, int]:
        """Journal the expiry of every open pending transfer whose deadline has come by the
        clock (read once: the first expiry record's timestamp), at most `EXPIRY_RECORD_IDS_MAX`
        a record, and deliver the holds it releases: (how many expired, the LSN of the last
        expiry record, 0 if none). `pin`: as for `commit`."""
        expired = last = 0
        with self.lock:
            deadlines, pending = self._deadlines, self.pending
            cutoff = max(self.clock(), self.last_timestamp + 1)  # one reading: what is due by it expires
            while deadlines:
                now = max(cutoff, self.last_timestamp + 1)  # `timestamp`, spent only if a record is made
                due: list[Pending] = []
                while deadlines and deadlines[0][0] <= cutoff and len(due) < EXPIRY_RECORD_IDS_MAX:
                    deadline, pending_id = heapq.heappop(deadlines)
                    found = pending.get(pending_id)
                    if found is not None and found.deadline == deadline:
                        due.append(found)
                if not due:
                    break
                self.last_timestamp = now
                lsn = self._journal.last_lsn + 1
                ids = [found.id for found in due]
                index: list[bytes] = []
                key_lsn = lsn_value(lsn)
                for pending_id in ids:
                    index += (resolution_key(pending_id), key_lsn)
                holders: list[str] = []
                holds: list[bytes] = []
                self._hold_rows(holds_expired(due, self.held, self.incoming), key_lsn, holders, holds)
                self.unindexed_holds.add(holders, holds)
                try:
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
                    deliver([posting for found in due for posting in _releasing(found, lsn)])
                except BaseException as error:
                    if self._journal.last_lsn >= lsn:  # queued (a bug, or an interrupt, after): memory is behind it
                        self.broken(error)
                        raise
                    self.unindexed_holds.remove(holders)
                    for found in due:  # not expired after all: due again next time
                        heapq.heappush(deadlines, (found.deadline, found.id))
                    raise
                expired += len(ids)
                last = lsn
                self._appended()
        return expired, last

    def next_deadline(self) -> int | None:
        """The earliest deadline of an open pending transfer (or a stale one: a hint)."""
        deadlines = self._deadlines
        return deadlines[0][0] if deadlines else None

    # --- appending -------------------------------------------------------------------------

    def append_chunk(self, chunk: Chunk, last_lsn: int, wake_writer: bool = True) -> int:
        """Journal the records stamped in `chunk` (under `lock`, at consecutive LSNs from the
        journal's `last_lsn + 1` up to `last_lsn`, the projection already past them); return
        the first LSN. The caller made room with `journal.wait_room` under this same hold of
        `lock`, so this never waits: it raises only if the journal failed, and then nothing
        was queued.
        `wake_writer` False: the caller commits them itself (`Journal.commit_inline`)."""
        first = self._append(chunk, last_lsn, room_made=True, wake_writer=wake_writer)
        self._appended(len(chunk))
        return first

    def _append(self, chunk: Chunk, last_lsn: int, room_made: bool = False, wake_writer: bool = True) -> int:
        """Queue the chunk's records (stamped up to `last_lsn`), their entries unindexed ones
        from before the records are queued (the writer may make them durable at once); a chunk
        the journal refuses leaves no entry behind, and its LSNs go to the next records."""
        assert self.lock.locked()
        self.unindexed.add(chunk.accounts, chunk.entries)
        if chunk.holds:
            self.unindexed_holds.add(chunk.holders, chunk.holds)
        index: dict[str, Any] = {TRANSFERS_INDEX: chunk.transfers}
        if self._holds_from_due:
            self._marked(index, self._journal.last_lsn + 1)
        try:
            appended = self._journal.append_block(chunk.payloads, index, chunk.completions, room_made, wake_writer)
        except BaseException:
            if self._journal.last_lsn < last_lsn:  # not queued (an interrupt may land after it was)
                self.unindexed.remove(chunk.accounts)
                if chunk.holds:
                    self.unindexed_holds.remove(chunk.holders)
            raise
        finally:
            if self._journal.last_lsn >= last_lsn:  # queued (also if an interrupt came out after)
                self._journaled_timestamp = self.last_timestamp
                self._holds_from_due = False  # (the mark went with it)
        return appended

    def _appended(self, records: int = 1) -> None:
        """Count records appended; journal a checkpoint when one is due. The records are
        queued already, so a checkpoint that cannot be queued must not fail them: it is
        logged and tried again after the next record (the writer reports its own failure).
        Every path that queues a record calls it once it has handed over that record's
        postings (`delivered_lsn`)."""
        self.delivered_lsn = self._journal.last_lsn
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

    def checkpoint(self, whole: bool = False) -> int:
        """Journal the projection as of now (call with `lock` held), as a CHECKPOINT4: the rows
        of the accounts that changed or opened since the last checkpoint, and of a slice of
        the others (the sweep, see `coordinator._records`), or with `whole` of every account
        (`checkpoint_on_close`); every open pending transfer; the
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
        pendings = [list(pending) for pending in self.pending.values()]
        lsn = self._journal.last_lsn + 1
        index: dict[str, list[bytes]] = {CHECKPOINTS_INDEX: [lsn_value(lsn), b""]}
        carried = Joined(sorted(self.unindexed.ordered_parts() + self.unindexed_holds.ordered_parts(), key=first_key))
        behind: Behind | None = None
        if len(carried):  # else the index holds every row before it already: the mark may stay
            behind = (ENTRIES_INDEX, carried, {ENTRIES_INDEX: [INDEXED_TO_KEY, lsn_value(lsn)]})
            if self._indexed_to is not None:
                index[ENTRIES_INDEX] = [INDEXED_TO_KEY, lsn_value(self._indexed_to)]
        payload = encode([CHECKPOINT4, self._journaled_timestamp, self.index_entries + 1, previous, total, sweep_next, rows,
                          pendings])
        try:
            appended = self._journal.append_block([payload], index, [None], behind=behind)  # may time out: nothing changed
            self.index_entries += 1
            assert appended == lsn, (appended, lsn)
            if behind is None:  # both empty: nothing to carry, nor to release
                if self._indexed_to is not None:
                    self._indexed_to = lsn
            else:
                self._indexed_to = None
                self.unindexed.carry(lsn)
                self.unindexed_holds.carry(lsn)
            crash_point("during-checkpoint")
            self._since_checkpoint = 0
            self.rows.journaled(lsn, len(rows), previous, sweep_next, total)
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
        crash) is followed by one at close even if nothing was written meanwhile."""
        if not self.lock.acquire(timeout=timeout_s):
            return None
        collecting = gc.isenabled()
        gc.disable()  # millions of new tuples, in no cycle: each collection on the way walks all of them
        try:
            if self.rows.rows_an_open_reads(len(self.accounts)) <= CLOSE_CHECKPOINT_ROWS * len(self.accounts):
                return None
            return self.checkpoint(whole=True)
        finally:
            if collecting:
                gc.enable()
            self.lock.release()


def postings(legs: Sequence[Leg], lsn: int, reserved: bool) -> list[Posting]:
    """What decided legs do to each account, in order: per leg, the source's then the
    destination's. `reserved`: the sources reserved for them (the mailbox path), which these
    release (a chain's: each source's whole reservation with its first debit)."""
    made: list[Posting] = []
    releasing = reservations(legs) if reserved and len(legs) > 1 else None
    for kind, source, destination, amount, stamp, pending in legs:
        released = amount if reserved and (kind == SINGLE or kind == PENDING) else 0
        if releasing is not None and released:
            released = releasing.pop(source, 0)
        if kind == SINGLE:
            assert stamp is not None
            made += (Posting(source, stamp[0], -amount, stamp[1], lsn, released, 0, 0),
                     Posting(destination, stamp[2], amount, stamp[3], lsn, 0, 0, 0))
        elif kind == PENDING:
            made += (Posting(source, 0, 0, 0, lsn, released, amount, 0), Posting(destination, 0, 0, 0, lsn, 0, 0, amount))
        else:
            assert pending is not None
            if stamp is None:  # a void
                made += _releasing(pending, lsn)
            else:
                made += (Posting(source, stamp[0], -amount, stamp[1], lsn, 0, -pending.amount, 0),
                         Posting(destination, stamp[2], amount, stamp[3], lsn, 0, 0, -pending.amount))
    return made


def _releasing(pending: Pending, lsn: int) -> tuple[Posting, Posting]:
    """The postings that release a pending transfer's hold, on both of its accounts."""
    return (Posting(pending.source, 0, 0, 0, lsn, 0, -pending.amount, 0),
            Posting(pending.destination, 0, 0, 0, lsn, 0, 0, -pending.amount))
