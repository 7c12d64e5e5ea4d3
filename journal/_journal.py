"""The journal: an ordered, checksummed, durable sequence of opaque records.

It knows nothing about accounts or money. A record is bytes the caller made;
the journal gives it the next LSN (strictly increasing, gapless from 1), stores
it framed with a checksum, and writes the caller's index entries in the same
LMDB transaction, so an index never points at a record that is not there.

Threads: any thread may `append`, `wait_durable` and read. Exactly one thread,
the writer, ever opens a write transaction.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from journal._completion import Completion
from journal._errors import (
    JournalClosedError,
    JournalError,
    JournalCorruptedError,
    JournalLockedError,
    JournalNotFoundError,
)
from journal._format import key_lsn, lsn_key, unframe, unframe_keyed
from journal._limits import MAP_SIZE_BYTES_DEFAULT
from journal._store import DATA_FILE, LMDB_LOCK_FILE, Store
from journal._writer import IndexPut, IndexPuts, Writer

LOCK_FILE = "tally.lock"
_OURS = {LOCK_FILE, DATA_FILE, LMDB_LOCK_FILE}
"""A journal's files (`data.mdb` too: another opener may be making it right now)."""


def _lock_directory(path: str) -> int:
    """Take an exclusive flock on the directory's lock file; it dies with the process."""
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise _directory_error(f"cannot lock {path!r} as a ledger directory", error) from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise JournalLockedError(
                f"{path} is open in another live process or another Ledger in this one"
            ) from error
        raise
    return fd


def refuse_foreign(path: str) -> None:
    """Raise `JournalNotFoundError` if directory `path` holds no journal yet but other files
    (hidden ones and a file system's `lost+found` aside): never scatter a journal into
    something else. One that cannot be listed passes: nothing to tell."""
    if os.path.exists(os.path.join(path, DATA_FILE)):
        return
    try:
        names = os.listdir(path)
    except OSError:
        return
    others = sorted(name for name in names if name not in _OURS and not name.startswith(".") and name != "lost+found")
    if others:
        raise JournalNotFoundError(
            f"{path} is not a Tally ledger (it holds other files, {others[0]!r} among them): "
            "give a ledger or a new or empty directory"
        )


def _prepare_directory(path: str, create: bool) -> None:
    """Check `path` can be a journal directory, making it if missing (with `create`)."""
    try:
        path.encode()
    except UnicodeEncodeError:  # an undecodable byte in the name: LMDB takes paths in UTF-8
        raise JournalNotFoundError(f"{path!r} cannot be a ledger directory: its name is not UTF-8") from None
    if os.path.isdir(path):
        if create:
            refuse_foreign(path)
        return
    if os.path.exists(path):
        raise JournalNotFoundError(f"{path} is a file, not a ledger directory")
    if not create:
        raise JournalNotFoundError(f"{path} does not exist")
    try:
        os.makedirs(path, exist_ok=True)
    except (OSError, ValueError) as error:
        raise _directory_error(f"{path!r} cannot be made a ledger directory", error) from error


_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EACCES, errno.EPERM,
                          errno.ELOOP, errno.ENAMETOOLONG})
"""Errors that say the path cannot hold a ledger (under a file, no permission, a dangling link...)."""


def _directory_error(what: str, error: Exception) -> JournalError:
    """`JournalNotFoundError` if `error` is about the path itself; else a plain `JournalError`
    (out of space, too many open files, a read-only disk: the ledger may be fine)."""
    if isinstance(error, ValueError) or getattr(error, "errno", None) in _PATH_ERRNOS:
        return JournalNotFoundError(f"{what}: {error}")
    return JournalError(f"{what}: {error}")


class Journal:
    """Open with `Journal.open`; close exactly once with `close` (idempotent)."""

    def __init__(self, store: Store, lock_fd: int | None, path: str) -> None:
        self._store = store
        self._lock_fd = lock_fd
        self._open = True
        self.path = path
        self.readonly = store.readonly
        last = store.last_lsn_key()
        self._last_lsn_read = key_lsn(last) if last is not None else 0
        self._writer = None if store.readonly else Writer(store, self._last_lsn_read)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        index_names: Sequence[str] = (),
        map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT,
        sync: bool = True,
        create: bool = True,
    ) -> Journal:
        """Lock the directory and open (or create) its journal.

        Raises `JournalLockedError` if another holder is live, `JournalNotFoundError`
        for a path that is a file (or missing, without `create`), and
        `JournalCorruptedError` for an unknown format version.
        """
        path = os.fsdecode(path)  # a str; bytes become one, undecodable ones refused below
        _prepare_directory(path, create)
        if not create and not os.path.exists(os.path.join(path, DATA_FILE)):
            Store.refuse_missing(path)
        fd = _lock_directory(path)
        try:
            store = Store(path, map_size_bytes=map_size_bytes, sync=sync, index_names=index_names, create=create)
        except BaseException:
            os.close(fd)
            raise
        try:
            return cls(store, fd, path)
        except BaseException:
            store.close()
            os.close(fd)
            raise

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str], *, index_names: Sequence[str] = ()) -> Journal:
        """Open an existing journal for reading only: no lock is taken, nothing is written,
        and a live writer in another process may go on (LMDB readers see a snapshot)."""
        path = os.fsdecode(path)
        _prepare_directory(path, create=False)
        store = Store(path, map_size_bytes=MAP_SIZE_BYTES_DEFAULT, sync=True, index_names=index_names,
                      create=False, readonly=True)
        return cls(store, None, path)

    @property
    def _writing(self) -> Writer:
        if self._writer is None:
            raise JournalClosedError("the journal is open read-only")
        return self._writer

    # --- writing -----------------------------------------------------------------

    def append(
        self, payload: bytes, index: Sequence[IndexPut] = (), completion: Completion | None = None
    ) -> int:
        """Queue a record and return its LSN at once; see `Writer.append`."""
        return self._writing.append(payload, index, completion)

    def append_block(
        self,
        payloads: Sequence[bytes],
        index: IndexPuts,
        completions: Sequence[Completion | None],
        room_made: bool = False,
    ) -> int:
        """Queue records under consecutive LSNs, with their index entries (by index name)
        and one completion (or None) each; return the first LSN. See `Writer.append_block`."""
        return self._writing.append_block(payloads, index, completions, room_made)

    def wait_room(self, records: int) -> None:
        """Block (bounded) until `records` more can be queued without waiting."""
        self._writing.wait_room(records)

    def wait_durable(self, lsn: int, timeout_s: float) -> None:
        """Block (at most `timeout_s`) until every record up to `lsn` is on disk."""
        if self._writer is None:
            return
        self._writer.wait_durable(lsn, timeout_s)

    @property
    def last_lsn(self) -> int:
        """The LSN most recently assigned (possibly not yet durable)."""
        return self._writer.last_lsn if self._writer is not None else self._last_lsn_read

    @property
    def durable_lsn(self) -> int:
        return self._writer.durable_lsn if self._writer is not None else self._last_lsn_read

    @property
    def failure(self) -> Exception | None:
        return self._writer.failure if self._writer is not None else None

    def stats(self) -> dict[str, int]:
        writer = self._writing
        return {"commits": writer.commits, "records_written": writer.records_written, "durable_lsn": writer.durable_lsn}

    # --- reading -----------------------------------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[Any]:
        """A consistent read-only view (an LMDB read transaction) for several reads."""
        self._check_open()
        with self._store.reading() as txn:
            yield txn

    def read(self, lsn: int, txn: Any | None = None) -> bytes | None:
        """The verified payload at `lsn`, or None if no such record is durable."""
        if txn is None:
            with self.snapshot() as txn:
                return self.read(lsn, txn)
        value = txn.get(lsn_key(lsn), db=self._store.records)
        return None if value is None else unframe(lsn, value)

    def scan(self, after_lsn: int = 0, txn: Any | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield `(lsn, payload)` for every durable record after `after_lsn`, verified.

        Checks each checksum and that LSNs continue one by one; the first failure
        raises `JournalCorruptedError` naming the LSN where it is.
        """
        if txn is None:
            with self.snapshot() as txn:
                yield from self.scan(after_lsn, txn)
            return
        cursor = txn.cursor(db=self._store.records)
        expected = after_lsn + 1
        if not cursor.set_range(lsn_key(expected)):
            return
        for key, value in cursor:
            if key != lsn_key(expected):
                lsn = key_lsn(key)
                raise JournalCorruptedError(f"LSN {expected} is missing (next stored is {lsn})", expected)
            yield expected, unframe_keyed(key, value, expected)
            expected += 1

    def index_get(self, name: str, key: bytes, txn: Any | None = None) -> bytes | None:
        if txn is None:
            with self.snapshot() as txn:
                return self.index_get(name, key, txn)
        return txn.get(key, db=self._store.indexes[name])

    def index_keys(self, name: str, txn: Any, after: bytes | None = None) -> Iterator[bytes]:
        """Every key of index `name` (after `after`, if given), in key order (for rebuilding
        in-memory filters)."""
        cursor = txn.cursor(db=self._store.indexes[name])
        if after is None:
            found = cursor.first()
        else:
            found = cursor.set_range(after)
            if found and cursor.key() == after:
                found = cursor.next()
        if found:
            yield from cursor.iternext(keys=True, values=False)

    def index_last(self, name: str, txn: Any | None = None) -> bytes | None:
        """The greatest key of index `name`, or None if it is empty."""
        if txn is None:
            with self.snapshot() as txn:
                return self.index_last(name, txn)
        cursor = txn.cursor(db=self._store.indexes[name])
        return cursor.key() if cursor.last() else None

    def index_last_before(self, name: str, stop: bytes, txn: Any) -> tuple[bytes, bytes] | None:
        """The index entry with the greatest key below `stop`, or None."""
        cursor = txn.cursor(db=self._store.indexes[name])
        found = cursor.prev() if cursor.set_range(stop) else cursor.last()
        return cursor.item() if found else None

    def index_range(
        self, name: str, start: bytes, stop: bytes, limit: int | None = None, txn: Any | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Index entries with `start <= key < stop`, in key order, at most `limit`."""
        if txn is None:
            with self.snapshot() as txn:
                return self.index_range(name, start, stop, limit, txn)
        cursor = txn.cursor(db=self._store.indexes[name])
        found: list[tuple[bytes, bytes]] = []
        if not cursor.set_range(start):
            return found
        for key, value in cursor:
            if key >= stop or (limit is not None and len(found) >= limit):
                break
            found.append((key, value))
        return found

    def _check_open(self) -> None:
        if not self._open:
            raise JournalClosedError("the journal is closed")

    # --- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Drain the writer, close LMDB and release the directory lock. Idempotent."""
        if not self._open:
            return
        self._open = False
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._store.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
