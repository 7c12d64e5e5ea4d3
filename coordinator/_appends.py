"""Appending: the sequencer's half that queues stamped decisions in the journal.

`Appending` is a base class of `coordinator._sequencer.Sequencer`, which holds (and sets up)
the projection, the counters and the journal these methods read and move; each runs under the
sequencer's lock. `commit` and `reject` decide a ticket of the mailbox path, stamp it
(`coordinator._stamps`, `Stamping`) and queue its record in one hold of the lock, then hand
the accounts its postings (`coordinator._postings`); `append_chunk` queues the chunk the
accounts' turns stamped (`coordinator._turns`). A record the journal refused to queue leaves
nothing its stamp counted behind (`_not_appended`), and its LSN goes to the next record; one
queued before memory caught up with it (a bug, an interrupt) stops writes until the ledger is
reopened (`broken`). Counting what was queued, and the checkpoint that may follow, are the
sequencer's (`Sequencer._appended`).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from journal import CRASH_POINT_ARMED, Journal, crash_point

from coordinator._entering import enter
from coordinator._entries import UnindexedEntries
from coordinator._postings import Deliver, postings
from coordinator._records import TRANSFERS_INDEX
from coordinator._rules import NOTHING, Leg, Refusal
from coordinator._stamps import NOTHING_UNENTERED, Chunk, Pin, Stamping
from coordinator._state import Posting

if TYPE_CHECKING:
    from coordinator._tickets import Ticket

logger = logging.getLogger("tally.coordinator")


class Appending(Stamping):
    """The appending methods of `coordinator._sequencer.Sequencer`, which holds (and sets up)
    what they read and move; each is called with the sequencer's lock held, or takes it."""

    lock: threading.Lock
    _journal: Journal
    unindexed: UnindexedEntries
    unindexed_holds: UnindexedEntries
    _journaled_timestamp: int
    _holds_from_due: bool

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
        self._unentered = NOTHING_UNENTERED

    def _not_appended(self, error: BaseException, lsn: int, counts: tuple[int, int]) -> None:
        """After `error` came out of appending the record stamped at `lsn`: forget what its
        stamp counted (`_undo_counts`), unless it was queued all the same, or `error` is an
        interrupt, which may have landed partway through what `_append` puts in memory: then
        memory cannot be trusted to follow the journal, and writes stop (`broken`). Its stamp
        is never entered."""
        self._unentered = NOTHING_UNENTERED
        if self._journal.last_lsn >= lsn or not isinstance(error, Exception):
            self.broken(error)
        else:
            self._undo_counts(*counts)

    def _undo_counts(self, index_entries: int, resolved: int) -> None:
        """Forget what stamps counted for records the journal refused to queue: the index
        entries they would have put, the pending transfers they would have resolved (and the
        deadlines those would have left stale: each is still open, its stamp never entered)."""
        self.index_entries = index_entries
        pending = self.pending
        while len(self._resolved_at) > resolved:
            pending_id = self._resolved_at.pop()[1]
            self._resolved.pop(pending_id, None)
            found = pending.get(pending_id)
            if found is not None and found.deadline and self._deadlines_stale:
                self._deadlines_stale -= 1


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

