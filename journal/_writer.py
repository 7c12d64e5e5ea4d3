"""The single writer thread: group commit.

Appenders put blocks of records (consecutive LSNs, their index entries, their
completions) on a bounded pending list and return at once. The writer drains everything waiting (up to
`BATCH_RECORDS_MAX`), writes it in one LMDB transaction, commits it with fsync,
publishes the new durable LSN, runs the batch's after-commit hook, and releases
the completions in LSN order. One fsync serves the whole batch: the more callers
wait, the larger the batch, which is what keeps the commit rate up when the GIL is
busy elsewhere.

Index entries may also go *behind* a record (`append_block`'s `behind`: a checkpoint's entry
index rows): they are written in key order, in slices, with the group commits after its own
(at least `BEHIND_PAIRS_MIN` a commit, `BEHIND_PAIRS_PER_RECORD` a record of it, and
1/`BEHIND_SLICES_MAX` of what waits), and alone when no record waits; the slice that ends them also writes their `final` puts (the mark that
says they are in), and `indexed_lsn` then moves to their record's LSN. Close writes what is
left. So no group commit carries all of a checkpoint's ~100,000 entries, and no record waits
behind them.

How a group commit is written (framing and the hash chain, the slices behind, the checks of
the data file, the anchor) is `journal._commits`: `Committing` is the writer's base class,
and the values queued here (`Block`, `EntriesBehind`) are defined there. The facade every
caller goes through is `journal._journal.Journal`.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import chain

from journal._anchor import Anchor
from journal._chain import ChainHead
from journal._commits import Behind, Block, Committing, EntriesBehind, IndexPut, IndexPuts
from journal._completion import Completion, resolve_all
from journal._errors import JournalClosedError, JournalError, JournalTimeoutError, JournalWriteError, space_error
from journal._follow import Progress
from journal._limits import (
    APPEND_WAIT_S_MAX,
    BATCH_RECORDS_MAX,
    COMMIT_DELAY_S_MAX,
    CLOSE_WAIT_S_MAX,
    PENDING_RECORDS_MAX,
    READER_CHECK_S,
    WRITER_IDLE_WAIT_S,
)
from journal._store import Store

logger = logging.getLogger("tally.journal")


class Writer(Committing):
    """Owns LSN assignment and the one thread that writes LMDB."""

    def __init__(self, store: Store, head: ChainHead, anchor: Anchor | None, seeds: Mapping[str, int] | None) -> None:
        self._store = store
        self._anchor = anchor
        """None until a ledger made before anchors gets one, with its first commit here."""
        self._seeds = seeds
        """Each index's checksum seed (None: a format without index checksums)."""

        self._cond = threading.Condition(threading.Lock())
        """Guards the pending list; the writer waits on it for work."""
        self._room = threading.Condition(self._cond._lock)  # type: ignore[attr-defined]
        """Same lock; appenders wait on it when the pending list is full."""
        self._writer_waiting = False
        self._writing = False
        """Someone (the writer thread, or a caller in `commit_inline`) is writing a batch:
        one at a time, so batches reach LMDB in LSN order."""
        self._pending: list[Block] = []
        self._pending_records = 0
        last_lsn = head.lsn
        self._last_lsn = last_lsn
        self.durable_lsn = last_lsn
        self.flushed_txnid = int(store.env.info()["last_txnid"])
        self.durable_head = head
        """The durable LSN and the chain's digest there, replaced (never changed) with
        `durable_lsn`, so a reader on any thread gets a matching pair."""
        self._chain_digest = head.digest
        """The digest of the last record written: the next batch chains from it. Only the
        one writing (`_writing`) reads or sets it."""
        if anchor is not None and store.sync:  # the open flushed the last commit (`Store.open`): the anchor says so,
            try:  # so a take-back never mistakes it for one cut off in its flush (`journal._unfinished`)
                anchor.advance(last_lsn, head.digest, self.flushed_txnid)  # (not `_advance_anchor`: it would bind
            except OSError as error:  # the ledger id in the store, which a ledger made before ids writes at its first commit)
                anchor.close()
                raise JournalError(f"the anchor of {store.directory} cannot be written: {error}") from error
        self._behind: deque[EntriesBehind] = deque()
        """Index entries written behind their records, oldest first: appended under `_cond`,
        taken from only by the one writing."""
        self.indexed_lsn = 0
        """The LSN of the newest record whose entries written behind it are all durable (0:
        none this process wrote)."""
        self._waiters: list[tuple[int, int, Completion]] = []
        self._waiter_ids = 0
        self._failure: JournalWriteError | None = None
        self._look_at = 0.0
        """When (`time.monotonic`) a commit next looks whether the data file is still in place."""
        self._readers_checked_at = time.monotonic() + READER_CHECK_S  # (the open cleared them: `_settle_last_writer`)
        """When a commit next looks for reader slots of processes that are gone (`clear_dead_readers`)."""
        self._closing = False
        self.commits = 0
        self.records_written = 0
        self.progress = Progress()
        """Followers wait on it for the durable LSN to move (`wait_past`)."""
        self._thread = threading.Thread(target=self._run, name="tally-journal-writer", daemon=True)
        self._thread.start()

    @property
    def last_lsn(self) -> int:
        return self._last_lsn

    def append(
        self, payload: bytes, index: Sequence[IndexPut] = (), completion: Completion | None = None
    ) -> int:
        """Assign the next LSN to `payload` and queue it; return the LSN without waiting.

        Waits (at most `APPEND_WAIT_S_MAX`) only when `PENDING_RECORDS_MAX` records
        are already queued. The completion, if any, is released once the record is
        durable, or with `error` set if it never will be.
        """
        puts: dict[str, list[bytes]] = {}
        for name, key, value in index:
            puts.setdefault(name, []).extend((key, value))
        with self._cond:
            self._make_room(1, APPEND_WAIT_S_MAX)
            return self._queue((payload,), puts, (completion,))

    def wait_room(self, records: int, timeout_s: float = APPEND_WAIT_S_MAX) -> None:
        """Block until `records` more fit in the pending list (bounded); raise if the journal
        failed or is closing. The room stays for a caller that is the only appender."""
        with self._cond:
            self._make_room(records, timeout_s)

    def append_block(
        self,
        payloads: Sequence[bytes],
        index: IndexPuts,
        completions: Sequence[Completion | None],
        room_made: bool = False,
        wake: bool = True,
        behind: Behind | None = None,
    ) -> int:
        """Queue several records under consecutive LSNs, with all their index entries and
        one completion (or None) per record; return the first LSN. `behind`: index entries
        written in slices after the last of them (see the module docstring). Waits for room as
        `append` does; with `room_made` (the caller, the only appender, called `wait_room`)
        it never waits, and fails only if the journal failed or is closing. With `wake`
        False the writer thread is not woken for them: the caller calls `commit_inline`
        once it holds no lock (the writer thread finds them within `WRITER_IDLE_WAIT_S` if not)."""
        with self._cond:
            if room_made:
                self._check_open()
                assert self._pending_records + len(payloads) <= max(PENDING_RECORDS_MAX, len(payloads)), "no room made"
            else:
                self._make_room(len(payloads), APPEND_WAIT_S_MAX)
            first = self._queue(payloads, index, completions, wake)
            if behind is not None:
                self._behind.append(EntriesBehind(first + len(payloads) - 1, behind))
            return first

    def _make_room(self, records: int, timeout_s: float) -> None:
        """With `_cond` held: wait (bounded) until `records` more fit; raise if not open."""
        self._check_open()
        records = min(records, PENDING_RECORDS_MAX)
        if self._pending_records + records > PENDING_RECORDS_MAX:
            if not self._room.wait_for(
                lambda: self._pending_records + records <= PENDING_RECORDS_MAX or self._failure or self._closing,
                timeout=timeout_s,
            ):
                raise JournalTimeoutError("the journal writer is not keeping up")
            self._check_open()

    def _queue(self, payloads: Sequence[bytes], index: IndexPuts, completions: Sequence[Completion | None],
               wake: bool = True) -> int:
        """With `_cond` held and the journal open: give the records the next LSNs, queue
        them as one block, wake the writer; return the first LSN."""
        block = Block(self._last_lsn + 1, payloads, index, completions)
        self._pending.append(block)
        self._pending_records += len(payloads)
        self._last_lsn = block.last_lsn
        if wake and self._writer_waiting:
            self._cond.notify()
        return block.first_lsn

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise JournalClosedError("the journal is closed")

    def durable_completion(self, lsn: int) -> Completion | None:
        """A completion the writer resolves once every record up to `lsn` is durable (or with
        the journal's failure); None if they are already. Never blocks but for a lock."""
        if self.durable_lsn >= lsn:
            return None
        completion = Completion()
        with self._cond:
            if self.durable_lsn >= lsn:
                return None
            if self._failure is not None:
                raise self._failure
            self._waiter_ids += 1
            heapq.heappush(self._waiters, (lsn, self._waiter_ids, completion))
        return completion

    def wait_durable(self, lsn: int, timeout_s: float) -> None:
        """Block until every record up to `lsn` is durable (bounded by `timeout_s`)."""
        completion = self.durable_completion(lsn)
        if completion is None:
            return
        if not completion.wait(timeout_s):
            raise JournalTimeoutError(f"LSN {lsn} not durable within {timeout_s} s")
        if completion.error is not None:
            raise completion.error

    def wait_past(self, lsn: int, timeout_s: float) -> bool:
        """Block (at most `timeout_s`; less once the journal closes or fails) until a record
        after `lsn` is durable; True if one is. For followers of the stream of records."""
        return self.durable_lsn > lsn or self.progress.wait(lambda: self.durable_lsn > lsn, timeout_s)

    def _take(self) -> list[Block]:
        """With `_cond` held: the blocks of the next group commit, at least one, then as
        many as fit in `BATCH_RECORDS_MAX` records."""
        pending = self._pending
        records = len(pending[0].payloads)
        count = 1
        while count < len(pending) and records + len(pending[count].payloads) <= BATCH_RECORDS_MAX:
            records += len(pending[count].payloads)
            count += 1
        batch = pending[:count]
        del pending[:count]
        self._pending_records -= records
        return batch

    def _run(self) -> None:
        batch_size_last = 0
        while True:
            with self._cond:
                self._writer_waiting = True
                while self._writing or not (self._pending or self._behind_due()):  # idle, or a caller writes
                    if self._closing and not self._writing:
                        return
                    self._cond.wait(timeout=WRITER_IDLE_WAIT_S)
                self._writing = True  # before the delay, which lets go of the lock: no one writes meanwhile
                if self._pending and self._pending_records < batch_size_last // 2 and not self._closing:
                    # Commit delay: the callers released by the last commit are still
                    # on their way back; give them a moment to join this batch.
                    target = batch_size_last // 2

                    def rejoined(target: int = target) -> bool:
                        return self._pending_records >= target or self._closing

                    self._cond.wait_for(rejoined, COMMIT_DELAY_S_MAX)
                self._writer_waiting = False
                if not self._pending and not self._behind_due():  # failed meanwhile (`_fail` took the queue)
                    self._writing = False
                    continue
                batch = self._take() if self._pending else []  # else index entries behind their records only
                if batch:
                    batch_size_last = batch[-1].last_lsn - batch[0].first_lsn + 1
                self._room.notify_all()
            try:
                written = self._write(batch)
            finally:
                with self._cond:
                    self._writing = False
            if not written:
                return

    def commit_inline(self) -> bool:
        """Write what is queued on the calling thread, if no one is writing: one group commit,
        as the writer thread would make it, without the two thread wake-ups of handing it
        over and back (most of a lone caller's wait, beside the device's flushes). True if it
        wrote. Call with no lock held that an appender may need: it blocks for the commit."""
        with self._cond:
            if self._writing or not self._pending or self._failure is not None:
                return False
            batch = self._take()
            self._writing = True
            self._room.notify_all()
        try:
            self._write(batch)
        finally:
            with self._cond:
                self._writing = False
                if self._pending or self._behind or self._closing:
                    self._cond.notify()  # the writer thread takes what queued meanwhile, or ends
        return True

    def _behind_due(self) -> bool:
        """With `_cond` held: index entries wait behind a durable record (a commit with no
        records may write them)."""
        return bool(self._behind) and self._behind[0].lsn <= self.durable_lsn

    def _write(self, batch: list[Block]) -> bool:
        """Commit `batch` (empty: only index entries behind durable records), advance the
        anchor, release its completions; False if the journal failed (then everything queued
        is failed too). The caller holds the right to write."""
        try:
            indexed = self._commit(batch)
        except Exception as error:  # any failure fails the journal
            logger.exception("journal write failed")
            self._fail(batch, error)
            return False
        if indexed is not None:
            self.indexed_lsn = indexed
        try:  # (a commit of no record moves no LSN: the anchor learns only that it was flushed)
            self._advance_anchor(batch[-1].last_lsn if batch else self.durable_lsn)
            anchor_failure = None
        except OSError as error:  # the batch is durable all the same: release it, then stop
            logger.exception("the anchor cannot be written")
            anchor_failure = JournalWriteError(f"the anchor cannot be written, so no more records are: {error}")
        if batch:  # (else no one to tell)
            try:
                self._publish(batch)
            except Exception as error:  # a bug after a durable commit: stop, and say so to all
                logger.exception("releasing a durable group commit failed")
                self._fail(batch, error)
                return False
        if anchor_failure is not None:
            self._fail([], anchor_failure)
            return False
        return True

    def _publish(self, batch: list[Block]) -> None:
        last = batch[-1].last_lsn
        self.commits += 1
        self.records_written += last - batch[0].first_lsn + 1
        with self._cond:
            self.durable_lsn = last
            self.durable_head = ChainHead(last, self._chain_digest)
            ready: list[Completion] = []
            while self._waiters and self._waiters[0][0] <= last:
                ready.append(heapq.heappop(self._waiters)[2])
        resolve_all(chain(chain.from_iterable(block.completions for block in batch), ready))
        self.progress.advanced()

    def _fail(self, batch: list[Block], error: Exception) -> None:
        failure = error if isinstance(error, JournalWriteError) else space_error(self._store.directory, error)
        if failure is not error:
            failure.__cause__ = error
        with self._cond:
            self._failure = failure
            failed = batch + self._pending
            self._pending = []
            self._behind.clear()
            self._pending_records = 0
            waiters = [entry[2] for entry in self._waiters]
            self._waiters = []
            self._cond.notify_all()
            self._room.notify_all()
        for block in failed:
            for completion in block.completions:
                if completion is not None:
                    completion.resolve(failure)
        for completion in waiters:
            completion.resolve(failure)
        self.progress.end()

    @property
    def failure(self) -> JournalWriteError | None:
        return self._failure

    def refuse_writes(self, reason: str) -> None:
        """Fail the journal as a write error would: every record queued and not yet being
        written, and every later append, gets `JournalWriteError(reason)`."""
        self._fail([], JournalWriteError(reason))

    def close(self) -> None:
        """Stop accepting appends, write what is queued, and join the thread (bounded)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._room.notify_all()
        self._thread.join(timeout=CLOSE_WAIT_S_MAX)
        self.progress.end()
        if self._thread.is_alive():
            raise JournalTimeoutError("the journal writer did not drain in time")
        with self._cond:  # what was never appended will never be durable: release its waiters now
            waiters, self._waiters = self._waiters, []
        closed = JournalClosedError("the journal closed before those records were written")
        for _, _, completion in waiters:
            completion.resolve(closed)
        if self._anchor is not None:
            try:
                self._anchor.close()
            except OSError as error:
                raise JournalWriteError(f"the anchor could not be flushed at close: {error}") from error
