"""What one group commit writes, and how: the writer's half that meets LMDB.

The values appenders queue (`IndexPut`, `IndexPuts`, `Behind`; a `Block` of records, the
`EntriesBehind` a record still has to write) and `Committing`, the base class of
`journal._writer.Writer`: one group commit's LMDB transaction. It frames the batch, takes
the slices of index entries written behind durable records (`journal._writer` says how
many a commit carries), checks the data file still ends where this writer left it, stages
it all with one `putmulti` per database (`put_all`), commits, and makes or advances the
anchor. The writer thread, the inline commit, the pending list, the waits, publishing the
durable LSN and failing the journal stay in `journal._writer`; `journal._journal.Journal`
is the facade that calls the writer.

The hash chain (`journal._chain`): whoever writes a batch (the writer thread, or a caller
in `commit_inline`; one at a time, under `_writing`) frames it, a SHA-256 a record, chained
from the digest of the last record written, before it takes the append lock, so appenders
are not held up by the hashing. The digest moves on only once the batch is committed, and
`durable_head` (LSN and digest, one value) with the durable LSN.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from itertools import chain, islice

import lmdb

from journal._anchor import Anchor, create_anchor, new_ledger_id
from journal._marks import commit_mark
from journal._completion import Completion
from journal._crash import crash_point
from journal._errors import JournalWriteError
from journal._format import CHAINED_HEADER_SIZE, HEADER_SIZE, frame_all, framed_pairs, key_lsn, lsn_key
from journal._limits import (
    BEHIND_PAIRS_MIN,
    BEHIND_PAIRS_PER_RECORD,
    BEHIND_SLICES_MAX,
    DATA_FILE_LOOK_S,
    READER_CHECK_S,
    RECORD_VERSION,
)
from journal._names import COMMIT_MARK_KEY, LEDGER_ID_KEY
from journal._lmdb_files import clear_dead_readers
from journal._store import Store

logger = logging.getLogger("tally.journal")


IndexPut = tuple[str, bytes, bytes]
"""(index name, key, value) written in the same transaction as its record."""

IndexPuts = Mapping[str, Collection[bytes]]
"""Index entries by index name, each flat: key, value, key, value... written with their
records. Flat, so that queueing and writing an entry allocates nothing per entry for the
garbage collector to track (a tuple is tracked from its creation). Any sized iterable
will do: the writer only counts and iterates it, never copies it."""


Behind = tuple[str, Collection[bytes], IndexPuts]
"""Index entries to write behind a record, in the group commits after its own: (index name,
its entries flat and in key order, the `final` puts written with the last of them)."""


class EntriesBehind:
    """Index entries being written behind the record at `lsn`, a slice a group commit."""

    __slots__ = ("lsn", "name", "items", "left", "final")

    def __init__(self, lsn: int, behind: Behind) -> None:
        self.lsn = lsn
        self.name, puts, self.final = behind
        assert len(puts) % 2 == 0, len(puts)
        self.items = iter(puts)
        self.left = len(puts) // 2
        """Entries not yet taken for a slice."""


class Block:
    """Records queued together: consecutive LSNs from `first_lsn`, one payload and one
    completion (or None) each, and all their index entries."""

    __slots__ = ("first_lsn", "payloads", "index", "completions")

    def __init__(
        self, first_lsn: int, payloads: Sequence[bytes], index: IndexPuts, completions: Sequence[Completion | None]
    ) -> None:
        assert len(payloads) == len(completions) >= 1, (len(payloads), len(completions))
        self.first_lsn = first_lsn
        self.payloads = payloads
        self.index = index
        self.completions = completions

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + len(self.payloads) - 1


def put_all(txn: lmdb.Transaction, db: lmdb._Database, parts: Sequence[Collection[bytes]], append: bool,
             seed: int | None = None) -> None:
    """Put the flat key, value, key, value... pairs of every part, in order. `zip` hands
    `putmulti` one tuple that it reuses for every pair (`putmulti` lets go of each before
    asking for the next), and the parts are chained, not copied into one list: a young list
    of a checkpoint's ~100,000 entries costs every garbage collection that meets it ~10 ms
    (a visit to each entry's header)."""
    total = 0
    for part in parts:
        assert len(part) % 2 == 0, len(part)
        total += len(part)
    if not total:
        return
    if seed is None:
        pairs = chain.from_iterable(parts)
        items: Iterable[tuple[bytes, bytes]] = zip(pairs, pairs, strict=True)
    else:
        items = chain.from_iterable(framed_pairs(seed, part) for part in parts)
    consumed, added = txn.cursor(db=db).putmulti(items, append=append)
    # Appending, a key out of order is skipped, not refused: count what was added.
    if consumed != total // 2 or (append and added != consumed):
        raise lmdb.Error(f"wrote {added} of {total // 2} items")


class Committing:
    """The group commit of `journal._writer.Writer`, which holds (and sets up) the state these
    methods read and move; only the one writing (`_writing`: the writer thread, or a caller in
    `commit_inline`) calls them."""

    _store: Store
    _anchor: Anchor | None
    _seeds: Mapping[str, int] | None
    _cond: threading.Condition
    _chain_digest: bytes
    _behind: deque[EntriesBehind]
    _look_at: float
    _readers_checked_at: float
    durable_lsn: int
    flushed_txnid: int
    """The LMDB transaction id of the last commit flushed (0 before the first)."""

    def _commit(self, batch: list[Block]) -> int | None:
        """Write and commit `batch` with the slices of index entries behind records it carries;
        the LSN whose entries behind it are all in now (None: none are finished)."""
        assert not batch or batch[0].first_lsn == self.durable_lsn + 1, (batch[0].first_lsn, self.durable_lsn)
        store = self._store
        if self._anchor is None:
            self._make_anchor()
        # Framed (and hashed, a SHA-256 a record) before the append lock is taken: appenders
        # go on queueing meanwhile. Only the one writing frames, in LSN order, so each batch
        # chains from the last record of the one before.
        records, digest = self._frame(batch)
        behind, indexed, sliced = self._take_behind(len(records) // 2)
        while True:
            txn = store.env.begin(write=True)
            try:
                # Stage the batch while holding the append lock. py-lmdb releases the
                # GIL around every put; with appenders locked out, no other thread is
                # waiting to grab it, so the writer keeps it instead of handing the
                # interpreter back and forth once per put. The fsync below runs
                # unlocked, while callers prepare the next batch.
                with self._cond:
                    self._check_tail(txn)
                    self._stage(txn, batch, records, behind)
                    txn.put(COMMIT_MARK_KEY, commit_mark(txn, store.marked), db=store.meta)  # (last: it holds their shape)
                if store.ledger_id is None:
                    assert self._anchor is not None
                    txn.put(LEDGER_ID_KEY, self._anchor.state.ledger_id, db=store.meta)
                now = time.monotonic()
                if batch and now >= self._look_at:  # (`DATA_FILE_LOOK_S`)
                    self._look_at = now + DATA_FILE_LOOK_S
                    if not store.in_place():  # the file is no longer the ledger's: write nothing into it
                        raise JournalWriteError(f"the data file of the ledger at {store.path} was removed or moved "
                                                "away while the ledger was open: nothing more is written")
                txnid = txn.id()
                txn.commit()
                store.flush(txnid)  # one flush: the data pages and the meta page durable together
                self.flushed_txnid = txnid
                self._chain_digest = digest
                if batch and now >= self._readers_checked_at:  # (`READER_CHECK_S`)
                    self._readers_checked_at = now + READER_CHECK_S
                    clear_dead_readers(store.env)
                if batch:
                    crash_point("after-commit-durable")
                if sliced:
                    crash_point("mid-checkpoint-entries")
                return indexed
            except lmdb.MapFullError:
                txn.abort()
                size = store.grow()
                logger.info("journal map grown to %d bytes", size)
            except BaseException:
                txn.abort()
                raise

    def _take_behind(self, records: int) -> tuple[dict[str, list[Collection[bytes]]], int | None, bool]:
        """The slices of index entries behind durable records that a commit of `records`
        records carries, by index name; the LSN whose entries they finish (None: none);
        whether they leave some of a record's behind for later. Taken once, before the
        transaction, so a retry of it (a full map) writes the same. Only the one writing
        calls it."""
        queue = self._behind
        if not queue:
            return {}, None, False
        with self._cond:  # appenders add to it
            waiting = sum(item.left for item in queue)
        budget = max(BEHIND_PAIRS_MIN, BEHIND_PAIRS_PER_RECORD * records, waiting // BEHIND_SLICES_MAX)
        puts: dict[str, list[Collection[bytes]]] = {}
        indexed = None
        while queue and budget > 0 and queue[0].lsn <= self.durable_lsn:
            item = queue[0]
            take = min(budget, item.left)
            part = list(islice(item.items, 2 * take))
            assert len(part) == 2 * take, (len(part), take)
            item.left -= take
            budget -= take
            if part:
                puts.setdefault(item.name, []).append(part)
            if item.left:
                return puts, indexed, True
            for name, flat in item.final.items():
                puts.setdefault(name, []).append(flat)
            queue.popleft()  # appenders only append, at the other end
            indexed = item.lsn
        return puts, indexed, False

    def _frame(self, batch: list[Block]) -> tuple[list[bytes], bytes]:
        """The batch's records framed and chained from the last one written, flat (key, record,
        key, record...), and the digest of its last record. Any thread, no lock: the batch's
        blocks were taken off the pending list."""
        records: list[bytes] = []
        digest = self._chain_digest
        if not batch:
            return records, digest
        expected = batch[0].first_lsn
        for block in batch:
            assert block.first_lsn == expected, (block.first_lsn, expected)
            framed, digest = frame_all(block.first_lsn, block.payloads, digest)
            records += framed
            expected = block.last_lsn + 1
        return records, digest

    def _check_tail(self, txn: lmdb.Transaction) -> None:
        """Raise `JournalWriteError` unless the records in `txn` end with the last one this
        writer committed (its LSN, and its chain digest if it has one). Anything else means the
        data file under the ledger is not the one it has been writing: copied over in place
        while open (`cp` keeps the file, so `Store.in_place` cannot see it), or written by a
        second writer. Appending there would acknowledge records into a file that, reopened,
        is refused for its gap or its history, or another ledger's. The store's reads are refused
        from then on (`Store.foreign`): they would serve that file. One seek a commit."""
        cursor = txn.cursor(db=self._store.records)
        key = bytes(cursor.key()) if cursor.last() else None
        expected = lsn_key(self.durable_lsn) if self.durable_lsn else None
        if key == expected:
            value = cursor.value() if key is not None else b""
            if not (len(value) > CHAINED_HEADER_SIZE and value[0] == RECORD_VERSION) or \
                    bytes(value[HEADER_SIZE:CHAINED_HEADER_SIZE]) == self._chain_digest:
                return
            found = f"its record at LSN {self.durable_lsn} is another than the one this ledger wrote there"
        else:
            found = f"its records end at LSN {key_lsn(key) if key is not None and len(key) == 8 else 0}"
        reason = (f"it no longer ends with LSN {self.durable_lsn}, the last this ledger committed: {found}. It was "
                  "overwritten while the ledger was open, or written by another writer: nothing more is written into "
                  "it or read from it (reopening checks it)")
        self._store.foreign = reason
        raise JournalWriteError(f"the data file of the ledger at {self._store.path}: {reason}")

    def _stage(self, txn: lmdb.Transaction, batch: list[Block], records: list[bytes],
               behind: Mapping[str, list[Collection[bytes]]]) -> None:
        """Write the batch's records (framed by `_frame`), their index entries and the slices
        `behind` (`_take_behind`): one `putmulti` per database.

        A single `put` releases and retakes the GIL; with any other thread runnable that
        costs a hand-off per put (measured ~20 us a put here, against ~3 us an item for
        `putmulti`, which loops in C). Order within the transaction does not matter: it
        commits as a whole, and no two puts of a batch share a key.
        """
        store = self._store
        by_index: dict[str, list[Collection[bytes]]] = {}
        for block in batch:
            for name, puts in block.index.items():
                by_index.setdefault(name, []).append(puts)
        for name, parts in behind.items():
            by_index.setdefault(name, []).extend(parts)
        split = len(records) // 4 * 2  # about half the records, at a key
        put_all(txn, store.records, (records[:split],), append=True)
        if records:
            crash_point("mid-group-commit")
        put_all(txn, store.records, (records[split:],), append=True)
        seeds = self._seeds
        for name, parts in by_index.items():
            put_all(txn, store.indexes[name], parts, append=False, seed=None if seeds is None else seeds[name])

    def _make_anchor(self) -> None:
        """Give a ledger that has no anchor one, durably, before its first commit here: with
        its data file's id, or a new one that this commit then writes into the data file (a
        ledger made before anchors and ids). The anchor comes first, so a data file that has
        an id always had an anchor: one found without its anchor lost it. Raises `OSError`."""
        store = self._store
        ledger_id = store.ledger_id if store.ledger_id is not None else new_ledger_id()
        state = create_anchor(store.directory, ledger_id, store.format_version, self.durable_lsn, self._chain_digest)
        self._anchor = Anchor(store.directory, state)

    def _advance_anchor(self, durable_lsn: int) -> None:
        """The anchor learns the new durable LSN before any caller hears of it; the store, the
        id this commit bound, if it bound one. Raises `OSError`."""
        anchor = self._anchor
        assert anchor is not None
        self._store.ledger_id = anchor.state.ledger_id
        anchor.advance(durable_lsn, self._chain_digest, self.flushed_txnid)  # (the digest of its last record)
