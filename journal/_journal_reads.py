"""The journal's reads: records, index entries and the chain, as a snapshot holds them.

`JournalReads` is the base class of `journal._journal.Journal`, which opens the store these
methods read and holds what they use (the per-thread pauses between two chunks of a read,
`journal._chunks`; each index's checksum seed); opening, the writes (`journal._writer`),
the durable head and closing are `Journal`'s own. Every read verifies what it returns: a
record's checksum (`journal._format`), an index entry's, and LSNs that follow one by one; a
read error from LMDB becomes `JournalCorruptedError` naming where. Any thread may read; no
read takes a lock the writer needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from itertools import takewhile
from typing import TYPE_CHECKING, Any

import lmdb

from journal._chain import ChainHead, ChainReport, walk_chain
from journal._chunks import Chunks, Pause
from journal._errors import JournalClosedError, JournalCorruptedError, lmdb_read_error
from journal._format import GENESIS, key_lsn, lsn_key, unframe, unframe_chained, unframe_index_value, unframe_keyed
from journal._limits import LSN_MAX
from journal._store import Store

if TYPE_CHECKING:
    from journal._writer import Writer


class JournalReads:
    """The reads of `journal._journal.Journal`, which holds (and sets up) what they read."""

    _store: Store
    _open: bool
    _seeds: dict[str, int] | None
    _chunks: Chunks
    _writer: Writer | None
    format_version: int

    @property
    def durable_lsn(self) -> int:
        """The journal's (`Journal.durable_lsn`)."""
        raise NotImplementedError

    def head_at(self, lsn: int, txn: Any | None = None) -> ChainHead:
        """The chain's head at `lsn`, as its record carries it (`GENESIS` at 0, or where the
        record predates the chain): its checksum verified, its link not (`verify_chain` walks
        the whole chain). For a reader following a live writer elsewhere, past the LSN it
        opened at. Raises `JournalCorruptedError` if no record `lsn` is stored."""
        if lsn == 0:
            return ChainHead(0, GENESIS)
        if txn is None:
            with self.snapshot() as txn:
                return self.head_at(lsn, txn)
        value = self._stored(lsn, txn)
        if value is None:
            raise JournalCorruptedError(f"LSN {lsn} is missing", lsn)
        digest = unframe_chained(lsn, bytes(value))[0]
        return ChainHead(lsn, GENESIS if digest is None else digest)

    def verify_chain(self, expected: ChainHead | None = None, txn: Any | None = None) -> ChainReport:
        """Walk the whole chain of the snapshot (every record read, its checksum and link
        checked: `journal._chain.walk_chain`); with `expected`, whether the journal extends
        that head. Writing, up to `durable_lsn` (a record past it may be in LMDB before it
        is released); read-only, every record of the snapshot `txn` (what another process
        committed is durable), so that a caller reading the rest in the same `txn` reads the
        same records while a live writer elsewhere goes on. Reads only; costs a hash a
        record (about 1.7 s a million records). Raises `JournalCorruptedError` only for a
        data file LMDB cannot read."""
        if txn is None:
            with self.snapshot() as txn:
                return self.verify_chain(expected, txn)
        last_key = lsn_key(self.durable_lsn) if self._writer is not None else None
        try:
            cursor = txn.cursor(db=self._store.records)
            cursor.first()
            records = cursor.iternext(keys=True, values=True)
            stored = records if last_key is None else takewhile(lambda item: item[0] <= last_key, records)
            return walk_chain(stored, self.format_version, expected)
        except lmdb.Error as error:
            raise lmdb_read_error(error, "the records") from error

    @contextmanager
    def snapshot(self) -> Iterator[Any]:
        """A consistent read-only view (an LMDB read transaction) for several reads."""
        self._check_open()
        with self._store.reading() as txn:
            yield txn

    def reading_in_chunks(self, between: Callable[[], None] | None = None) -> AbstractContextManager[None]:
        """Until left, the calling thread's reads (`read`, `scan`, `index_get`, `index_range`
        and `index_range_reverse`) call `between()` after every `READ_CHUNK_RECORDS` records or
        index entries, on this thread, in the middle of a read transaction, so that the threads
        waiting for the interpreter meanwhile get it (`journal._chunks` says why): a `Pause` if
        None. Inside another such context, the outer one's `between` stays. Other threads'
        reads are not affected. Not for reads made under a lock the engine's writing threads
        need (the sequencer's, the writer's): they would wait out every pause."""
        return self._chunks.calling(Pause() if between is None else between)

    def read(self, lsn: int, txn: Any | None = None) -> bytes | None:
        """The verified payload at `lsn`, or None if no such record is in the snapshot (none is
        past `LSN_MAX`)."""
        if lsn > LSN_MAX:  # (no key holds it)
            return None
        if txn is None:
            with self.snapshot() as txn:
                return self.read(lsn, txn)
        value = self._stored(lsn, txn)
        self._chunks.step()
        return None if value is None else unframe(lsn, value)

    def _stored(self, lsn: int, txn: Any) -> bytes | None:
        """The record at `lsn` as stored in `txn` (framed, unverified), or None."""
        try:
            return txn.get(lsn_key(lsn), db=self._store.records)  # type: ignore[no-any-return]
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the record at LSN {lsn}") from error

    def scan(self, after_lsn: int = 0, txn: Any | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield `(lsn, payload)` for every durable record after `after_lsn`, verified.

        Checks each checksum and that LSNs continue one by one; the first failure
        raises `JournalCorruptedError` naming the LSN where it is.
        """
        if txn is None:
            with self.snapshot() as txn:
                yield from self.scan(after_lsn, txn)
            return
        expected = after_lsn + 1
        # Writing, up to `durable_lsn`: a record past it is one being made durable, or one of a
        # commit whose flush failed (`journal._store.Store.flush`), which must not be served.
        end = self.durable_lsn if self._writer is not None else LSN_MAX
        if expected > end:  # (past LSN_MAX no key holds it)
            return
        step = self._chunks.step
        try:
            cursor = txn.cursor(db=self._store.records)
            if not cursor.set_range(lsn_key(expected)):
                return
            for key, value in cursor:
                if key != lsn_key(expected):
                    lsn = key_lsn(key) if len(key) == 8 else key
                    raise JournalCorruptedError(f"LSN {expected} is missing (next stored is {lsn!r})", expected)
                step()
                yield expected, unframe_keyed(key, value, expected)
                if expected == end:
                    return
                expected += 1
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the records after LSN {expected - 1}") from error

    def stored_lsns(self, after_lsn: int, txn: Any | None = None) -> Iterator[int]:
        """The LSN of every record stored after `after_lsn`, in order, gaps and all: keys only,
        nothing verified (a salvage lists by them what it lost, where a damaged key may make the
        last LSN far larger than the records)."""
        if txn is None:
            with self.snapshot() as txn:
                yield from self.stored_lsns(after_lsn, txn)
            return
        try:
            cursor = txn.cursor(db=self._store.records)
            if not cursor.set_range(lsn_key(after_lsn + 1)):
                return
            for key in cursor.iternext(keys=True, values=False):
                yield key_lsn(key)
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the records after LSN {after_lsn}") from error

    def records_count(self, txn: Any) -> int:
        """How many records the snapshot holds (LMDB's count, checked against the pages at open)."""
        try:
            return int(txn.stat(self._store.records)["entries"])
        except lmdb.Error as error:
            raise lmdb_read_error(error, "the records") from error

    def index_count(self, name: str, txn: Any) -> int:
        """How many entries index `name` holds in the snapshot (checked against the pages at open)."""
        try:
            return int(txn.stat(self._store.indexes[name])["entries"])
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the {name} index") from error

    def _value(self, name: str, key: bytes, stored: bytes) -> bytes:
        """An index entry's value, its checksum verified (formats that have one)."""
        seeds = self._seeds
        return stored if seeds is None else unframe_index_value(seeds[name], name, key, stored)

    def index_get(self, name: str, key: bytes, txn: Any | None = None) -> bytes | None:
        """The value of `key` in index `name`, verified, or None."""
        if txn is None:
            with self.snapshot() as txn:
                return self.index_get(name, key, txn)
        try:
            stored = txn.get(key, db=self._store.indexes[name])
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the {name} index") from error
        self._chunks.step()
        return None if stored is None else self._value(name, key, stored)

    def index_keys(self, name: str, txn: Any, after: bytes | None = None) -> Iterator[bytes]:
        """Every key of index `name` (after `after`, if given), in key order. Keys only, so
        their checksums are not verified here: for counting, or for loading a filter that
        only gives hints."""
        try:
            cursor = txn.cursor(db=self._store.indexes[name])
            if after is None:
                found = cursor.first()
            else:
                found = cursor.set_range(after)
                if found and cursor.key() == after:
                    found = cursor.next()
            if found:
                yield from cursor.iternext(keys=True, values=False)
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the {name} index") from error

    def index_last(self, name: str, txn: Any | None = None) -> bytes | None:
        """The greatest key of index `name` (its entry verified), or None if it is empty."""
        if txn is None:
            with self.snapshot() as txn:
                return self.index_last(name, txn)
        try:
            cursor = txn.cursor(db=self._store.indexes[name])
            if not cursor.last():
                return None
            key, stored = cursor.item()
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the {name} index") from error
        self._value(name, key, stored)
        return bytes(key)

    def index_last_before(self, name: str, stop: bytes, txn: Any) -> tuple[bytes, bytes] | None:
        """The index entry with the greatest key below `stop` (verified), or None."""
        try:
            cursor = txn.cursor(db=self._store.indexes[name])
            found = cursor.prev() if cursor.set_range(stop) else cursor.last()
            if not found:
                return None
            key, stored = cursor.item()
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the {name} index") from error
        return key, self._value(name, key, stored)

    def index_range(
        self, name: str, start: bytes, stop: bytes, limit: int | None = None, txn: Any | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Index entries with `start <= key < stop`, in key order, at most `limit`, verified."""
        if txn is None:
            with self.snapshot() as txn:
                return self.index_range(name, start, stop, limit, txn)
        found: list[tuple[bytes, bytes]] = []
        step = self._chunks.step
        try:
            cursor = txn.cursor(db=self._store.indexes[name])
            if not cursor.set_range(start):
                return found
            for key, stored in cursor:
                if key >= stop or (limit is not None and len(found) >= limit):
                    break
                step()
                found.append((key, stored))
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the {name} index") from error
        if self._seeds is not None:
            value = self._value
            found = [(key, value(name, key, stored)) for key, stored in found]
        return found

    def index_range_reverse(
        self, name: str, start: bytes, stop: bytes, limit: int | None = None, txn: Any | None = None
    ) -> list[tuple[bytes, bytes]]:
        """`index_range`, in descending key order: the entries with `start <= key < stop`,
        greatest first, at most `limit`, verified."""
        if txn is None:
            with self.snapshot() as txn:
                return self.index_range_reverse(name, start, stop, limit, txn)
        found: list[tuple[bytes, bytes]] = []
        step = self._chunks.step
        try:
            cursor = txn.cursor(db=self._store.indexes[name])
            more = cursor.prev() if cursor.set_range(stop) else cursor.last()
            while more and (limit is None or len(found) < limit):
                key, stored = cursor.item()
                if key < start:
                    break
                step()
                found.append((bytes(key), bytes(stored)))
                more = cursor.prev()
        except lmdb.Error as error:
            raise lmdb_read_error(error, f"the {name} index") from error
        value = self._value
        return [(key, value(name, key, stored)) for key, stored in found]

    def _check_open(self) -> None:
        if not self._open:
            raise JournalClosedError("the journal is closed")
