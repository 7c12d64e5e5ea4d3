"""The LMDB environment: opening it with explicit options, reads, and map growth.

Options, passed at the call site on purpose (house style 10):
- `subdir=True`: the ledger directory holds `data.mdb` and `lock.mdb`.
- `sync=True`, `metasync=True`: a commit returns only after fsync of data and meta
  pages. This is what makes an acknowledged transfer durable; a test may turn
  `sync` off for speed, never the product.
- `map_size`: starts at `map_size_bytes` and doubles when a write reports the map
  full (`grow`), so a ledger is never capped by a guess made at creation.
- `max_dbs`: the records, the metadata and the caller's named indexes.
- `max_readers`: generous, because every client thread may read at once.
- `lock=True`: LMDB's own reader table; exclusivity of the writer is our flock.
- `writemap=False`, `meminit=False`: pages are written with write(2), never
  through a writable map a stray pointer could scribble on; we never leave
  uninitialised bytes in a value, so zero-filling is wasted work.

Growing the map is only allowed while no transaction is open in this process,
so every read goes through `reading()`, a gate the writer closes while it grows.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lmdb

from journal._errors import (
    JournalCorruptedError,
    JournalLockedError,
    JournalNotFoundError,
    JournalWriteError,
)
from journal._limits import DBS_MAX, FORMAT_VERSION, GROW_WAIT_S_MAX, MAP_SIZE_BYTES_MAX, READERS_MAX

logger = logging.getLogger("tally.journal")

DATA_FILE = "data.mdb"
"""LMDB's data file: a directory that has one holds a journal."""
LMDB_LOCK_FILE = "lock.mdb"
"""LMDB's reader table, made before the data file."""

RECORDS_DB = b"records"
META_DB = b"meta"
_FORMAT_KEY = b"format_version"


class Store:
    """One LMDB environment with its record, meta and index databases."""

    def __init__(
        self,
        path: str,
        *,
        map_size_bytes: int,
        sync: bool,
        index_names: Sequence[str],
        create: bool,
        readonly: bool = False,
    ) -> None:
        if not create and not os.path.exists(os.path.join(path, DATA_FILE)):
            self.refuse_missing(path)
        self.readonly = readonly
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size_bytes,
                subdir=True,
                sync=sync,
                metasync=sync,
                max_dbs=DBS_MAX,
                max_readers=READERS_MAX,
                lock=True,
                writemap=False,
                meminit=False,
                create=create,
                readonly=readonly,
            )
        except lmdb.Error as error:
            if "already open in this process" in str(error):
                raise JournalLockedError(f"{path} is already open in this process") from error
            raise JournalNotFoundError(f"cannot open the journal in {path}: {error}") from error
        assert len(index_names) + 2 <= DBS_MAX, index_names
        try:
            self.records = self.env.open_db(RECORDS_DB, create=not readonly)
            self.meta = self.env.open_db(META_DB, create=not readonly)
            self.indexes = {name: self.env.open_db(name.encode(), create=not readonly) for name in index_names}
        except lmdb.Error as error:
            self.env.close()
            raise JournalNotFoundError(f"{path} is not a Tally ledger: {error}") from error
        self._gate = threading.Condition()
        self._readers = 0
        self._growing = False
        try:
            self._check_format()
        except BaseException:
            self.env.close()
            raise

    @staticmethod
    def refuse_missing(path: str) -> None:
        """Raise the error for a directory that holds no journal (touching nothing)."""
        if not os.listdir(path):
            raise JournalNotFoundError(f"{path} is an empty directory, not a Tally ledger")
        raise JournalNotFoundError(f"{path} is not a Tally ledger (it holds no journal)")

    def _check_format(self) -> None:
        with self.env.begin(write=not self.readonly, db=self.meta) as txn:
            stored = txn.get(_FORMAT_KEY)
            if stored is None and self.readonly:
                raise JournalCorruptedError("the format version is missing")
            if stored is None:
                if txn.stat(self.records)["entries"]:
                    raise JournalCorruptedError("records exist but the format version is missing")
                txn.put(_FORMAT_KEY, str(FORMAT_VERSION).encode())
                return
        if stored != str(FORMAT_VERSION).encode():
            version = stored.decode(errors="replace")
            newer = version.isdigit() and int(version) > FORMAT_VERSION
            raise JournalCorruptedError(
                f"format version {version} is "
                + ("newer than this Tally reads" if newer else "not one this Tally understands")
                + f" (it reads version {FORMAT_VERSION})"
            )

    @contextmanager
    def reading(self) -> Iterator[Any]:
        """A read-only snapshot transaction. Blocks only while the map is being grown."""
        with self._gate:
            while self._growing:
                self._gate.wait(timeout=1.0)
            self._readers += 1
        try:
            with self.env.begin(write=False, buffers=False) as txn:
                yield txn
        finally:
            with self._gate:
                self._readers -= 1
                if self._readers == 0:
                    self._gate.notify_all()

    def grow(self) -> int:
        """Double the map size once no reader is open (new readers are held off meanwhile).
        Writer thread only.

        Every reader ends on its own (none waits on anything while it reads), but one may be
        long: `state_hash` reads every entry in one snapshot. Failing the journal after a
        bound would turn that into an outage until reopen; so the grow waits, and says so
        every `GROW_WAIT_S_MAX` seconds."""
        with self._gate:
            self._growing = True
            try:
                waited = 0.0
                while not self._gate.wait_for(lambda: not self._readers, timeout=GROW_WAIT_S_MAX):
                    waited += GROW_WAIT_S_MAX
                    logger.warning("the journal map is full: growing it waits for %d reader(s) to close (%.0f s so far)",
                                   self._readers, waited)
                size = self.env.info()["map_size"]
                if size >= MAP_SIZE_BYTES_MAX:
                    raise JournalWriteError(f"the journal map is at its bound of {MAP_SIZE_BYTES_MAX} bytes")
                self.env.set_mapsize(min(size * 2, MAP_SIZE_BYTES_MAX))
                return int(self.env.info()["map_size"])
            finally:
                self._growing = False
                self._gate.notify_all()

    def last_lsn_key(self) -> bytes | None:
        with self.reading() as txn:
            cursor = txn.cursor(db=self.records)
            return cursor.key() if cursor.last() else None

    def close(self) -> None:
        self.env.close()
