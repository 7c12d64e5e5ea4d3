"""The LMDB environment: creating it, opening it only once it is checked, reads, and map growth.

Options, passed at the call site on purpose (house style 10):
- `subdir=True`: the ledger directory holds `data.mdb` and `lock.mdb`.
- `sync=False`, `metasync=False`: LMDB flushes nothing itself. With `Store.open(sync=True)`
  (the product's; a test may turn it off for speed, never the product) each commit is
  followed by one flush of the data file (`Store.flush`), which makes its data pages and its
  meta page durable together: what makes an acknowledged transfer durable. LMDB's own
  `sync` would flush twice a commit, the data pages and then the meta page, so that a
  power loss can never leave a meta page whose pages are not on disk; one flush can, if the
  machine stops during it. That commit was never acknowledged (its flush did not return),
  and the snapshot before it is whole (LMDB never writes a page that snapshot holds), so
  opening takes that snapshot back (`journal._unfinished`), saying so, and nothing
  acknowledged is lost. The argument in full is in `bench/README.md` ("One flush a commit, landed").
- `map_size`: starts at `map_size_bytes` and doubles when a write reports the map
  full (`grow`), so a ledger is never capped by a guess made at creation.
- `max_dbs`: the records, the metadata and the caller's named indexes.
- `max_readers`: generous, because every client thread may read at once.
- `lock=True`: LMDB's own reader table; exclusivity of the writer is our flock.
- `writemap=False`: pages are written with write(2), never through a writable map a
  stray pointer could scribble on.
- `meminit=True`: LMDB zeroes each page buffer it newly allocates; the buffers it
  reuses held only this ledger's own pages, so the part of a page no node uses (its
  free middle) never holds other bytes of the process. Without it that part was
  written as it was on the heap, and a process that had held another ledger wrote that
  ledger's ids and amounts into this one's data file (`tests/test_storage.py`).
- `create=False` for every open of an existing file, and its named databases opened
  without creating them: LMDB initialises an empty or missing data file as a new,
  empty database, which would serve a damaged ledger as an empty one and write over it.
  Only `create` makes a data file, in a staging directory, renamed into place once
  whole (so a creation that dies leaves no half-made `data.mdb`).

Before LMDB reads an existing data file it is checked (`journal._check`): meta pages, every
page, the free list, every index entry. Then every read goes through `reading()`, a gate the
writer closes while it grows the map (LMDB allows that only while no transaction is open in
the process), and any LMDB error on a read becomes `JournalCorruptedError` naming what was
being read (`journal._errors.lmdb_read_error`). A failed write says why, a full disk or a file
size limit (`space_error`; making the files, `os_error`). The files LMDB keeps
beside the data (its lock file, made ahead), how a file is known (`file_identity`) and the
reader slots dead processes left are `journal._lmdb_files`'.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lmdb

from journal._anchor import AnchorState, create_anchor, new_ledger_id, sync_directory
from journal._check import Opened, check_before_mapping, check_snapshot
from journal._marks import commit_mark, marked_databases
from journal._seen import Seen
from journal._errors import (JournalCorruptedError, JournalCutOffError, JournalError, JournalLockedError,
                             JournalWriteError, lmdb_read_error, space_error)
from journal._lmdb_files import allocate_lock_file, clear_dead_readers, file_identity, files_of
from journal._limits import DBS_MAX, FORMAT_VERSION, GROW_WAIT_S_MAX, MAP_SIZE_BYTES_MAX, READERS_MAX
from journal._names import (COMMIT_MARK_KEY, DATA_FILE, FORMAT_KEY, LEDGER_ID_KEY, LMDB_LOCK_FILE, META_DB, RECORDS_DB,
                            STAGING_DIR)
from journal._unfinished import Unfinished, flush_failed, take_back, unfinished

logger = logging.getLogger("tally.journal")


def _cut_off(found: Unfinished, damage: JournalCorruptedError) -> JournalCutOffError:
    """What a read-only open says of `damage` that is a last commit cut off in its flush (`found`)."""
    return JournalCutOffError(f"{found.says(damage)}; opening the ledger for writing takes that snapshot back",
                              lsn=damage.lsn, where=damage.where)


class Store:
    """One LMDB environment with its record, meta and index databases."""

    def __init__(self, path: str, env: lmdb.Environment, dbs: dict[bytes, Any], opened: Opened,
                 readonly: bool, lock_file: tuple[int, int] | None) -> None:
        self.opened = opened
        self.path = path
        self.env = env
        self.readonly = readonly
        self.dbs = dbs
        """Every database by name (b"records", b"meta", and the indexes)."""
        self.records = dbs[RECORDS_DB]
        self.meta = dbs[META_DB]
        self.indexes = {name.decode(): db for name, db in dbs.items() if name not in (RECORDS_DB, META_DB)}
        self.marked = [dbs[name] for name in marked_databases(dbs)]
        """The databases whose shape each commit's mark holds, in its order (`journal._marks.commit_mark`)."""
        self.format_version = opened.format_version
        self.ledger_id = opened.ledger_id
        self.layout = opened.layout
        self._gate = threading.Condition()
        self._readers = 0
        self._growing = False
        self.directory = os.path.realpath(path)
        """The directory `path` named when opened, absolute and with its links resolved as the
        kernel resolved them for LMDB (a host may change its working directory, or re-point
        a link on the way)."""
        self._identity = file_identity(os.path.join(self.directory, DATA_FILE))
        """The data file's (device, inode) when it was opened, for `in_place`."""
        self.files = files_of(self.directory, self._identity, lock_file)  # (not looked at again)
        self._lock_fd = -1
        """A writer's descriptor of LMDB's lock file, for `journal._lmdb_files.rewind_reader_table`,
        open as long as the environment is: closing any descriptor of a file drops every POSIX
        lock the process holds on it, LMDB's own among them."""
        if not readonly:
            try:
                self._lock_fd = os.open(os.path.join(self.directory, LMDB_LOCK_FILE), os.O_RDWR | os.O_CLOEXEC)
            except OSError as error:
                raise os_error(path, error) from error
        self._seen = Seen(self.directory, os.path.join(self.directory, DATA_FILE), self._identity,
                          opened.layout.meta.page_bytes) if readonly else None
        """A read-only store's: makes each snapshot durable before it is read (`journal._seen`)."""
        """(device, inode) of LMDB's files as opened: py-lmdb knows the environment by them."""
        self.sync = False
        """Whether each commit is flushed (`flush`): `Store.open(sync=...)` of a writer."""
        self.foreign: str | None = None
        """Why the data file is no longer what this journal wrote (its writer found it so:
        overwritten in place while open), or None. Every read from then on is refused: it would
        serve what the file holds now, not the ledger."""

    # --- making and opening ----------------------------------------------------------

    @staticmethod
    def create(path: str, *, map_size_bytes: int, index_names: Sequence[str]) -> AnchorState:
        """Make a new, empty journal in directory `path` (which holds none), and its anchor.

        The data file is made in a staging directory, with its databases, format version
        and ledger id committed, and renamed into `path` only then; the anchor follows. A
        creation that dies leaves either nothing (the staging directory is cleared by the
        next open) or a whole data file without its anchor (adopted by the next open)."""
        staging = os.path.join(path, STAGING_DIR)
        shutil.rmtree(staging, ignore_errors=True)
        ledger_id = new_ledger_id()
        try:
            os.mkdir(staging)
            allocate_lock_file(staging)
            env = _lmdb_open(staging, map_size_bytes=map_size_bytes, readonly=False, create=True)
            try:
                with env.begin(write=True) as txn:
                    made = {name: env.open_db(name, txn=txn, create=True)
                            for name in (RECORDS_DB, META_DB, *(name.encode() for name in index_names))}
                    meta = made[META_DB]
                    txn.put(FORMAT_KEY, str(FORMAT_VERSION).encode(), db=meta)
                    txn.put(LEDGER_ID_KEY, ledger_id, db=meta)
                    txn.put(COMMIT_MARK_KEY, commit_mark(txn, [made[name] for name in marked_databases(made)]), db=meta)
                env.sync(True)  # (LMDB flushes nothing itself: see the module docstring)
            finally:
                env.close()
            os.rename(os.path.join(staging, DATA_FILE), os.path.join(path, DATA_FILE))
            sync_directory(path)
            anchor = create_anchor(path, ledger_id, FORMAT_VERSION)
        except lmdb.Error as error:
            raise space_error(path, error) from error
        except OSError as error:
            raise os_error(path, error) from error
        shutil.rmtree(staging, ignore_errors=True)
        return anchor

    @classmethod
    def open(cls, path: str, *, map_size_bytes: int, sync: bool, index_names: Sequence[str], readonly: bool,
             anchor: AnchorState | None, index_damage_kept: bool = False) -> Store:
        """Open the existing journal in `path`, once its data file checks out.

        Raises `JournalCorruptedError` naming where the data file is damaged, and never
        writes to it, but in one case: a writer opening after the machine stopped during the
        last commit's flush takes back the snapshot before that commit, which was never
        acknowledged (`journal._unfinished`). With `readonly`, a live writer in another process may go on: the check
        then reads the snapshot of a read transaction held meanwhile (`journal._check`); with
        `index_damage_kept` too, an index entry that fails its checksum is kept
        (`Opened.index_damage`), not raised, unless it is the tear of a last commit cut off in
        its flush (raised as such, as any damage of such a commit is)."""
        assert readonly or not index_damage_kept, "a writer never goes on past a damaged index"
        data_file = os.path.join(path, DATA_FILE)
        try:
            store = cls._open_checked(path, data_file, map_size_bytes=map_size_bytes, sync=sync,
                                      index_names=index_names, readonly=readonly, anchor=anchor,
                                      index_damage_kept=index_damage_kept)
        except JournalCorruptedError as damage:
            found = unfinished(data_file, index_names, anchor)
            if found is None:
                raise
            if readonly:  # never written here: said
                raise _cut_off(found, damage) from damage
            take_back(data_file, found, damage)
            return cls._open_checked(path, data_file, map_size_bytes=map_size_bytes, sync=sync,
                                     index_names=index_names, readonly=readonly, anchor=anchor)
        kept = store.opened.index_damage
        if kept is not None:
            try:  # a torn last commit's pages may fail an index entry: said as when it is raised
                found = unfinished(data_file, index_names, anchor)
            except BaseException:
                store.close()
                raise
            if found is not None:
                store.close()
                raise _cut_off(found, kept) from kept
        return store

    @classmethod
    def _open_checked(cls, path: str, data_file: str, *, map_size_bytes: int, sync: bool, index_names: Sequence[str],
                      readonly: bool, anchor: AnchorState | None, index_damage_kept: bool = False) -> Store:
        check_before_mapping(data_file)
        try:
            lock_file = allocate_lock_file(path, readonly)
        except OSError as error:
            raise os_error(path, error) from error
        env = _lmdb_open(path, map_size_bytes=map_size_bytes, readonly=readonly, create=False)
        try:
            if not readonly:
                _settle_last_writer(env)
            dbs, opened = check_snapshot(env, data_file, index_names, anchor, None if readonly else path,
                                         index_damage_kept)
            store = cls(path, env, dbs, opened, readonly, lock_file)
        except BaseException:
            env.close()
            raise
        if sync and not readonly:
            store.sync = True
            store._flush_opened()
        return store

    def _flush_opened(self) -> None:
        """Flush at a writable open. The last commit may never have been flushed (its writer
        was killed between its commit and its flush): it is made durable before anything is
        built on it, so the snapshot a take-back would return to is one that was
        (`journal._unfinished`), and an idempotent retry answered from it is durable. If that
        flush fails, whether that commit is on disk is unknown, and nothing here can tell (the
        page cache shows it either way; it may have been acknowledged, or served by a reader,
        if it was flushed before a power loss the anchor lags): the open fails, saying so,
        and closes the store."""
        try:
            self.env.sync(True)
        except lmdb.Error as error:
            self.close()
            raise JournalWriteError(
                f"flushing {os.path.join(self.directory, DATA_FILE)} when opening it failed ({error}): whether its "
                "last commit is on disk is unknown (the page cache shows it either way). The disk is failing: "
                "restart the machine before opening the ledger again, so that what it holds is read from the disk "
                "alone") from error
        except BaseException:
            self.close()
            raise

    def flush(self, txnid: int) -> None:
        """Make the last commit, of LMDB transaction `txnid`, durable: its data and meta pages
        in one flush of the data file (with `sync`; see the module docstring). Only the one
        writing calls it, right after the commit and before anyone learns of it. If it fails,
        the commit is taken back at once, and `JournalWriteError` says whether it was
        (`journal._unfinished.flush_failed`)."""
        if not self.sync:
            return
        try:
            self.env.sync(True)
        except lmdb.Error as error:
            raise flush_failed(self.directory, self._lock_fd, txnid, error) from error

    # --- reading -----------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[Any]:
        """A read-only snapshot transaction. Blocks only while the map is being grown.

        A reader of a ledger another process writes finds the map resized under it when that
        process grows it; it then takes the new size (with no transaction open) and retries.
        A reader table full of slots that dead processes left is cleared once (LMDB does not
        on its own); full of live readers, it is `JournalError`. A data file its writer found
        overwritten (`foreign`) is `JournalCorruptedError`."""
        cleared = False
        while True:
            if self.foreign is not None:
                raise JournalCorruptedError(self.foreign, where=os.path.join(self.directory, DATA_FILE))
            with self._gate:
                while self._growing:
                    self._gate.wait(timeout=1.0)
                self._readers += 1
            try:
                try:
                    txn = self.env.begin(write=False, buffers=False)
                except lmdb.MapResizedError:
                    txn = None
                except lmdb.ReadersFullError as error:
                    if cleared:
                        raise JournalError(f"LMDB's table of {READERS_MAX} readers is full: too many readers "
                                           "at once (in this process and others)") from error
                    self.env.reader_check()  # slots of processes that died (a full table: LMDB's own check)
                    cleared = True
                    continue
                except lmdb.Error as error:
                    raise lmdb_read_error(error, self.path) from error
                if txn is not None:
                    with txn:
                        if self._seen is not None:
                            self._seen.durable(txn.id(), self.ledger_id)
                        yield txn
                    return
            finally:
                with self._gate:
                    self._readers -= 1
                    if self._readers == 0:
                        self._gate.notify_all()
            self._resize(0, "taking the map size another process gave the journal")

    def grow(self) -> int:
        """Double the map size once no reader is open (new readers are held off meanwhile).
        Writer thread only.

        Every reader ends on its own (none waits, while it reads, on more than a bounded turn
        of an event loop, `Journal.reading_in_chunks`), but one may be long: `state_hash` reads
        every entry in one snapshot. Failing the journal after a bound would turn that into an
        outage until reopen; so the grow waits, and says so every `GROW_WAIT_S_MAX` seconds."""
        size = self.env.info()["map_size"]
        if size >= MAP_SIZE_BYTES_MAX:
            raise JournalWriteError(f"the journal map is at its bound of {MAP_SIZE_BYTES_MAX} bytes")
        return self._resize(min(size * 2, MAP_SIZE_BYTES_MAX), "the journal map is full: growing it")

    def _resize(self, size: int, what: str) -> int:
        """Set the map size (0: the size another process gave the file) with no reader open."""
        with self._gate:
            self._growing = True
            try:
                waited = 0.0
                while not self._gate.wait_for(lambda: not self._readers, timeout=GROW_WAIT_S_MAX):
                    waited += GROW_WAIT_S_MAX
                    logger.warning("%s waits for %d reader(s) to close (%.0f s so far)", what, self._readers, waited)
                mapped = self.env.info()["map_size"]
                if size > mapped:  # (LMDB unmaps the old size first: what it needs more is the difference)
                    _check_mappable(size - mapped, size)
                self.env.set_mapsize(size)
                return int(self.env.info()["map_size"])
            finally:
                self._growing = False
                self._gate.notify_all()

    def in_place(self) -> bool:
        """Whether the data file at the store's path is still the one it opened: not removed,
        nor moved away (and another put there) while open. A path that cannot be looked at for
        another reason passes: that is no sign of it."""
        if self._identity is None:  # it could not be looked at when opened: nothing to compare
            return True
        return file_identity(os.path.join(self.directory, DATA_FILE)) in (self._identity, None)

    def close(self) -> None:
        try:
            self.env.close()
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
            if self._seen is not None:
                self._seen.close()


def _check_mappable(more: int, size: int) -> None:
    """`JournalWriteError` unless the process can map `more` bytes more, to grow its map to
    `size` (an address-space limit, `ulimit -v`). LMDB unmaps the data file before it maps it
    anew, and a map that then fails leaves the environment unusable: reads too would fail
    until the ledger is reopened. Tried first on an anonymous mapping that reserves address
    space only (no access, so no memory is committed), the failed grow fails the writes alone."""
    try:
        mmap.mmap(-1, more, flags=mmap.MAP_PRIVATE, prot=0).close()
    except (OSError, OverflowError, ValueError) as error:
        raise JournalWriteError(f"the journal map cannot grow to {size} bytes: this process cannot map that much "
                                f"({error}); reads go on, writes need the ledger reopened with more address space") \
            from error


def _lmdb_open(path: str, *, map_size_bytes: int, readonly: bool, create: bool) -> lmdb.Environment:
    try:
        return lmdb.open(
            path,
            map_size=map_size_bytes,
            subdir=True,
            sync=False,  # each commit is flushed once, by `Store.flush` (see the module docstring)
            metasync=False,
            max_dbs=DBS_MAX,
            max_readers=READERS_MAX,
            lock=True,
            writemap=False,
            meminit=True,  # (the module docstring says why)
            create=create,
            readonly=readonly,
        )
    except lmdb.Error as error:
        if "already open in this process" in str(error):
            raise JournalLockedError(f"{path} is already open in this process") from error
        if isinstance(error, (lmdb.CorruptedError, lmdb.InvalidError, lmdb.VersionMismatchError)):
            raise JournalCorruptedError(f"LMDB cannot open it: {error}", where=os.path.join(path, DATA_FILE)) from error
        raise JournalError(f"cannot open the journal in {path}: {error}") from error


def _settle_last_writer(env: lmdb.Environment) -> None:
    """Begin and abort a write transaction before the writer reads anything: it writes nothing,
    and makes LMDB's reader table name the newest commit in the data file.

    Why: a writer killed inside a commit after its meta page was written but before the table
    (`lock.mdb`) learnt the new transaction id leaves the table one commit behind the file.
    When no other process has the ledger open, the next open rebuilds the table from the
    file; but while another process does (a read-only follower, `tally tail`, `tally
    balance`), the table lives on, and read transactions, which take the id from the table,
    see the commit before. Opening would then recover from it and write its own records over
    LSNs that the newest commit holds. LMDB repairs the table when the next write
    transaction takes the lock that the killed writer held; this takes it first."""
    try:
        env.begin(write=True).abort()
    except lmdb.Error as error:
        raise lmdb_read_error(error, "the journal, settling after its last writer") from error
    clear_dead_readers(env)


def os_error(path: str, error: OSError) -> JournalError:
    """The journal error an OS error preparing the ledger in `path` becomes."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return space_error(path, error)
    return JournalError(f"cannot prepare the journal in {path}: {error}")
