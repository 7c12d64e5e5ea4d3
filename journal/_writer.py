"""The single writer thread: group commit.

Appenders put `(lsn, payload, index_puts, completion)` on a bounded pending list
and return at once. The writer drains everything waiting (up to
`BATCH_RECORDS_MAX`), writes it in one LMDB transaction, commits it with fsync,
publishes the new durable LSN, runs the batch's after-commit hook, and releases
the completions in LSN order. One fsync serves the whole batch: the more callers
wait, the larger the batch, which is what keeps the commit rate up when the GIL is
busy elsewhere.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Sequence

import lmdb

from journal._completion import Completion, relay
from journal._crash import crash_point
from journal._errors import JournalClosedError, JournalTimeoutError, JournalWriteError
from journal._format import frame, lsn_key
from journal._limits import (
    APPEND_WAIT_S_MAX,
    BATCH_RECORDS_MAX,
    COMMIT_DELAY_S_MAX,
    CLOSE_WAIT_S_MAX,
    PENDING_RECORDS_MAX,
    WRITER_IDLE_WAIT_S,
)
from journal._store import Store

logger = logging.getLogger("tally.journal")

IndexPut = tuple[str, bytes, bytes]
"""(index name, key, value) written in the same transaction as its record."""

Pending = tuple[int, bytes, Sequence[IndexPut], Completion | None]


def _put_all(txn: lmdb.Transaction, db: lmdb._Database, items: list[tuple[bytes, bytes]], append: bool) -> None:
    if not items:
        return
    consumed, _ = txn.cursor(db=db).putmulti(items, append=append)
    if consumed != len(items):
        raise lmdb.Error(f"wrote {consumed} of {len(items)} items")


class Writer:
    """Owns LSN assignment and the one thread that writes LMDB."""

    def __init__(self, store: Store, last_lsn: int) -> None:
        self._store = store
        self._cond = threading.Condition(threading.Lock())
        """Guards the pending list; the writer waits on it for work."""
        self._room = threading.Condition(self._cond._lock)  # type: ignore[attr-defined]
        """Same lock; appenders wait on it when the pending list is full."""
        self._writer_waiting = False
        self._pending: list[Pending] = []
        self._last_lsn = last_lsn
        self.durable_lsn = last_lsn
        self._waiters: list[tuple[int, int, Completion]] = []
        self._waiter_ids = 0
        self._failure: JournalWriteError | None = None
        self._closing = False
        self.commits = 0
        self.records_written = 0
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
        with self._cond:
            self._make_room(1, APPEND_WAIT_S_MAX)
            return self._queue(((payload, index, completion),))

    def wait_room(self, records: int, timeout_s: float = APPEND_WAIT_S_MAX) -> None:
        """Block until `records` more fit in the pending list (bounded); raise if the journal
        failed or is closing. The room stays for a caller that is the only appender."""
        with self._cond:
            self._make_room(records, timeout_s)

    def append_many(self, records: Sequence[tuple[bytes, Sequence[IndexPut], Completion | None]]) -> int:
        """Queue several records under consecutive LSNs; return the first. Never waits for
        room (see `wait_room`), so it fails only if the journal failed or is closing."""
        with self._cond:
            self._check_open()
            return self._queue(records)

    def _make_room(self, records: int, timeout_s: float) -> None:
        """With `_cond` held: wait (bounded) until `records` more fit; raise if not open."""
        self._check_open()
        records = min(records, PENDING_RECORDS_MAX)
        if len(self._pending) + records > PENDING_RECORDS_MAX:
            if not self._room.wait_for(
                lambda: len(self._pending) + records <= PENDING_RECORDS_MAX or self._failure or self._closing,
                timeout=timeout_s,
            ):
                raise JournalTimeoutError("the journal writer is not keeping up")
            self._check_open()

    def _queue(self, records: Sequence[tuple[bytes, Sequence[IndexPut], Completion | None]]) -> int:
        """With `_cond` held and the journal open: give `records` the next LSNs, queue them,
        wake the writer; return the first LSN."""
        first = self._last_lsn + 1
        lsn = self._last_lsn
        pending = self._pending
        for payload, index, completion in records:
            lsn += 1
            pending.append((lsn, payload, index, completion))
        self._last_lsn = lsn
        if self._writer_waiting:
            self._cond.notify()
        return first

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise JournalClosedError("the journal is closed")

    def wait_durable(self, lsn: int, timeout_s: float) -> None:
        """Block until every record up to `lsn` is durable (bounded by `timeout_s`)."""
        if self.durable_lsn >= lsn:
            return
        completion = Completion()
        with self._cond:
            if self.durable_lsn >= lsn:
                return
            if self._failure is not None:
                raise self._failure
            self._waiter_ids += 1
            heapq.heappush(self._waiters, (lsn, self._waiter_ids, completion))
        if not completion.wait(timeout_s):
            raise JournalTimeoutError(f"LSN {lsn} not durable within {timeout_s} s")
        if completion.error is not None:
            raise completion.error

    def _run(self) -> None:
        batch_size_last = 0
        while True:
            with self._cond:
                self._writer_waiting = True
                while not self._pending and not self._closing:
                    self._cond.wait(timeout=WRITER_IDLE_WAIT_S)
                if not self._pending:
                    return
                if len(self._pending) < batch_size_last // 2 and not self._closing:
                    # Commit delay: the callers released by the last commit are still
                    # on their way back; give them a moment to join this batch.
                    target = batch_size_last // 2

                    def rejoined(target: int = target) -> bool:
                        return len(self._pending) >= target or self._closing

                    self._cond.wait_for(rejoined, COMMIT_DELAY_S_MAX)
                self._writer_waiting = False
                batch = self._pending[:BATCH_RECORDS_MAX]
                del self._pending[:BATCH_RECORDS_MAX]
                batch_size_last = len(batch)
                self._room.notify_all()
            try:
                self._commit(batch)
            except Exception as error:  # the writer's loop: any failure fails the journal
                logger.exception("journal write failed")
                self._fail(batch, error)
                return
            try:
                self._publish(batch)
            except Exception as error:  # a bug after a durable commit: stop, and say so to all
                logger.exception("releasing a durable group commit failed")
                self._fail(batch, error)
                return

    def _commit(self, batch: list[Pending]) -> None:
        assert batch[0][0] == self.durable_lsn + 1, (batch[0][0], self.durable_lsn)
        store = self._store
        while True:
            txn = store.env.begin(write=True)
            try:
                # Stage the batch while holding the append lock. py-lmdb releases the
                # GIL around every put; with appenders locked out, no other thread is
                # waiting to grab it, so the writer keeps it instead of handing the
                # interpreter back and forth once per put. The fsync below runs
                # unlocked, while callers prepare the next batch.
                with self._cond:
                    self._stage(txn, batch)
                txn.commit()
                crash_point("after-commit-durable")
                return
            except lmdb.MapFullError:
                txn.abort()
                size = store.grow()
                logger.info("journal map grown to %d bytes", size)
            except BaseException:
                txn.abort()
                raise

    def _stage(self, txn: lmdb.Transaction, batch: list[Pending]) -> None:
        """Write the batch's records and index entries: one `putmulti` per database.

        A single `put` releases and retakes the GIL; with any other thread runnable that
        costs a hand-off per put (measured ~20 us a put here, against ~3 us an item for
        `putmulti`, which loops in C). Order within the transaction does not matter: it
        commits as a whole, and no two puts of a batch share a key.
        """
        store = self._store
        expected = batch[0][0]
        records: list[tuple[bytes, bytes]] = []
        by_index: dict[str, list[tuple[bytes, bytes]]] = {}
        for lsn, payload, index, _ in batch:
            assert lsn == expected, (lsn, expected)
            expected += 1
            records.append((lsn_key(lsn), frame(lsn, payload)))
            for name, key, value in index:
                puts = by_index.get(name)
                if puts is None:
                    puts = by_index[name] = []
                puts.append((key, value))
        split = len(batch) // 2
        _put_all(txn, store.records, records[:split], append=True)
        crash_point("mid-group-commit")
        _put_all(txn, store.records, records[split:], append=True)
        for name, puts in by_index.items():
            _put_all(txn, store.indexes[name], puts, append=False)

    def _publish(self, batch: list[Pending]) -> None:
        last = batch[-1][0]
        self.commits += 1
        self.records_written += len(batch)
        with self._cond:
            self.durable_lsn = last
            ready: list[Completion] = []
            while self._waiters and self._waiters[0][0] <= last:
                ready.append(heapq.heappop(self._waiters)[2])
        relayed: list[Completion] = []
        for _, _, _, completion in batch:
            if completion is not None:
                if completion.relayed:
                    relayed.append(completion)
                else:
                    completion.resolve()
        for completion in ready:
            completion.resolve()
        if relayed:
            relay(relayed)

    def _fail(self, batch: list[Pending], error: Exception) -> None:
        failure = JournalWriteError(f"journal write failed: {error}")
        failure.__cause__ = error
        with self._cond:
            self._failure = failure
            failed = batch + self._pending
            self._pending = []
            waiters = [entry[2] for entry in self._waiters]
            self._waiters = []
            self._cond.notify_all()
            self._room.notify_all()
        for _, _, _, completion in failed:
            if completion is not None:
                completion.resolve(failure)
        for completion in waiters:
            completion.resolve(failure)

    @property
    def failure(self) -> JournalWriteError | None:
        return self._failure

    def close(self) -> None:
        """Stop accepting appends, write what is queued, and join the thread (bounded)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._room.notify_all()
        self._thread.join(timeout=CLOSE_WAIT_S_MAX)
        if self._thread.is_alive():
            raise JournalTimeoutError("the journal writer did not drain in time")
