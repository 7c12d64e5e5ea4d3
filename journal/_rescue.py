"""The records of a data file too damaged to open, read page by page around the damage, for a
salvage (`tally recover --salvage`).

Opening checks every page before LMDB maps the file (`journal._pages`) and refuses the file at
the first fault, wherever it is: LMDB trusts its file, and a damaged page would misroute a
lookup, or a SIGBUS kill the process. That is right for an open that serves reads, and it left
a salvage nothing to copy when one page of any tree was damaged. `rescue` reads what can still
be trusted, with the same checks, never through LMDB:

1. a meta page that checks on its own, the newest first (`journal._meta.metas_each`: if the
   newest is damaged, the snapshot before it, which LMDB keeps whole until the next commit);
2. the main database and the meta database of that snapshot, whole (they say where the records
   are, whose ledger and which format they are): a fault in either stops the rescue, as does
   a ledger id or format that is not its anchor's;
3. the records tree, each page checked as opening checks it; a subtree that fails (a page
   zeroed, a branch damaged, pages swapped) is skipped, its fault noted, and the walk goes on
   with the next subtree. Keys stay strictly ascending across the whole walk, inside the bounds
   their parents give them, so no record is read twice or out of place. The index trees and the
   free list are not read: a salvage makes the indexes anew from the records.

What it read it writes, byte for byte (each record framed as stored: its checksum and its link
of the hash chain unchanged), into a new journal in a scratch directory, with the ledger's id,
its format and a copy of its anchor. That journal is opened and audited as any other
(`Journal.open_readonly`): a record the damage took shows as a gap, a record that fails its
checksum or its link as damage at its LSN, and a salvage copies everything before the first.

What this cannot tell: a record the damage took that the anchor never saw durable, past the last
one read, when the records database's own record (its entry count) is damaged too.
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lmdb

from journal._anchor import ANCHOR_FILE, AnchorState, read_anchor
from journal._check import expected_databases, open_data_file
from journal._directory import lock_directory
from journal._errors import JournalCorruptedError, os_read_error, space_error
from journal._format import key_lsn, lsn_key, unframe_chained
from journal._limits import DBS_MAX, FORMAT_VERSIONS_READ
from journal._marks import commit_mark, marked_databases
from journal._meta import NO_PAGE, Database, Meta, metas_each
from journal._names import COMMIT_MARK_KEY, DATA_FILE, FORMAT_KEY, LEDGER_ID_KEY, META_DB, RECORDS_DB
from journal._pages import PageWalk, Tree

RECORD_BYTES_MIN = 16
"""No record takes less of a page than this (an 8-byte key and a node header): a records
database can hold no more entries than its file's bytes over this, whatever its record says."""


@dataclass(frozen=True)
class Rescued:
    """What `rescue` read of a damaged data file, and where it wrote it."""

    scratch: str
    """The directory of the new journal holding every record read."""
    records: int
    """Records read (and written to `scratch`)."""
    through_lsn: int
    """The last LSN the records tree held, as far as can be told: the largest of the last key read,
    the LSN the anchor saw durable and, if a subtree was skipped, the entries the records
    database's record counts (bounded by what the file could hold). Every LSN up to it not in
    `scratch` was lost to the damage."""
    first_missing_lsn: int | None
    """The first LSN up to `through_lsn` not read (None: every one was)."""
    snapshot_faults: tuple[JournalCorruptedError, ...]
    """What was damaged of each newer snapshot than the one read: a meta page, its main database
    or its meta database (empty: the newest was read)."""
    records_faults: tuple[JournalCorruptedError, ...]
    """Each damaged subtree of the records skipped, first to last."""


class _RecordsWalk(PageWalk):
    """The page walk of `journal._pages`, but for the records tree a subtree that fails its
    check is noted in `faults` and skipped, and the walk goes on with the next one."""

    def __init__(self, fd: int, meta: Meta, data_file: str) -> None:
        super().__init__(fd, meta, data_file, None)
        self.faults: list[JournalCorruptedError] = []
        """Each subtree of the records skipped, first to last."""
        self.meta_faults: list[JournalCorruptedError] = []
        """Each meta page, main or meta database of a newer snapshot found damaged before this one."""

    def page(self, name: bytes, pgno: int, depth: int, low: bytes | None, high: bytes | None,
             found: Tree, integer_keys: bool) -> None:
        if name != RECORDS_DB:
            super().page(name, pgno, depth, low, high, found, integer_keys)
            return
        try:
            super().page(name, pgno, depth, low, high, found, integer_keys)
        except JournalCorruptedError as fault:  # (a branch's children each come back here: the deepest fault is noted)
            self.faults.append(fault)


def rescue(path: str, scratch: str, index_names: Sequence[str]) -> Rescued:
    """Read the records of the ledger at `path` around damaged pages and write them into a new
    journal at `scratch` (a directory this makes; see the module docstring), a leaf at a time.
    Locks `path` as a writer does while it reads (`JournalLockedError` while a live process
    holds it); writes nothing there. Raises `JournalCorruptedError` (no `lsn`: nothing of it is
    this ledger's to copy) where no meta page, main database or meta database can be read, or
    the file is not its anchor's; the caller removes `scratch` then."""
    held = lock_directory(path, readonly=True)
    try:
        anchor = read_anchor(path)
        data_file = os.path.join(path, DATA_FILE)
        found = Tree()
        fd = open_data_file(data_file)
        try:
            walk, meta_values, records = _read(fd, data_file)
            format_version, ledger_id = _identity(meta_values, anchor, data_file)
            with _Scratch(scratch, walk.file_pages * walk.page_bytes, anchor, data_file) as written:
                written.begin(format_version, ledger_id, index_names)
                walk.visit, walk.key_bytes = written.leaf, 8
                if records.root != NO_PAGE:
                    walk.page(RECORDS_DB, records.root, 1, None, None, found, False)
        except _Foreign as foreign:
            raise foreign.damage from None
        except lmdb.Error as error:  # (writing the scratch journal: a full disk, say)
            raise space_error(scratch, error) from error
        except OSError as error:
            raise os_read_error(error, data_file) from error
        finally:
            os.close(fd)
        if anchor is not None:
            shutil.copyfile(os.path.join(path, ANCHOR_FILE), os.path.join(scratch, ANCHOR_FILE))
    finally:
        if held is not None:
            held.release()
    capacity = walk.file_pages * walk.page_bytes // RECORD_BYTES_MIN
    last = key_lsn(found.last_key) if found.last_key is not None else 0
    claimed = min(records.entries, capacity) if walk.faults else 0  # (a tree walked whole lost nothing: a count past it is damage)
    through = max(last, claimed, anchor.durable_lsn if anchor is not None else 0)
    missing = written.first_missing_lsn if written.first_missing_lsn is not None else last + 1
    return Rescued(scratch, written.records, through, missing if missing <= through else None,
                   tuple(walk.meta_faults), tuple(walk.faults))


def _read(fd: int, data_file: str) -> tuple[_RecordsWalk, dict[bytes, bytes], Database]:
    """The walk of the newest snapshot whose meta page, main database and meta database read
    whole, what its meta database holds, and its records database's record."""
    metas, meta_faults = metas_each(fd, data_file, mmap.PAGESIZE)
    faults: list[JournalCorruptedError] = [*meta_faults]
    for meta in metas:
        walk = _RecordsWalk(fd, meta, data_file)
        try:
            meta_values, records = _databases(walk, data_file)
        except JournalCorruptedError as fault:
            faults.append(fault)
            continue
        walk.meta_faults = faults
        return walk, meta_values, records
    shown = "; ".join(str(fault) for fault in faults)
    raise JournalCorruptedError(f"nothing in it can be read: no snapshot's meta page, main database and meta database "
                                f"read whole ({shown})", where=data_file)


def _databases(walk: _RecordsWalk, data_file: str) -> tuple[dict[bytes, bytes], Database]:
    """What the meta database of `walk`'s snapshot holds, and its records database's record,
    the main database and the meta database walked whole."""
    catalog: dict[bytes, bytes] = {}
    walk.visit = lambda _name, keys, values: catalog.update(zip(keys, values, strict=True))
    walk.catalog = True
    walk.tree(b"", walk.meta.main)
    walk.catalog = False
    for name in (META_DB, RECORDS_DB):
        if name not in catalog:
            raise JournalCorruptedError(f"its main database names no {name.decode()} database",
                                        where=f"the main database of {data_file}")
    meta_values: dict[bytes, bytes] = {}
    walk.visit = lambda _name, keys, values: meta_values.update(zip(keys, values, strict=True))
    walk.tree(META_DB, Database.parse(catalog[META_DB]))
    return meta_values, Database.parse(catalog[RECORDS_DB])


def _identity(meta_values: dict[bytes, bytes], anchor: AnchorState | None, data_file: str) -> tuple[int, bytes | None]:
    """The format version and ledger id the meta database holds, once they are ones this reads
    and its anchor's (`JournalCorruptedError` if not: whose records these are is not known)."""
    stored = meta_values.get(FORMAT_KEY, b"")
    if not stored.isdigit() or int(stored) not in FORMAT_VERSIONS_READ:
        raise JournalCorruptedError(f"its meta database holds format version {stored[:16]!r}, not one this Tally reads",
                                    where=data_file)
    format_version, ledger_id = int(stored), meta_values.get(LEDGER_ID_KEY)
    if ledger_id is None and format_version >= 2:
        raise JournalCorruptedError("its meta database holds no ledger id: whose records these are is not known",
                                    where=data_file)
    if anchor is not None and (format_version != anchor.format_version
                               or ledger_id not in (None, anchor.ledger_id)):
        mine = ledger_id.hex() if ledger_id else "without an id"
        raise JournalCorruptedError(f"the data file belongs to ledger {mine} (format {format_version}), but the "
                                    f"directory's anchor to ledger {anchor.ledger_id.hex()} (format "
                                    f"{anchor.format_version}): a data file from elsewhere?", where=data_file)
    return format_version, ledger_id


class _Foreign(Exception):
    """The records are another history's (`_Scratch._check_anchor_digest`): raised through the
    walk, which goes on past damage in a page (a `JournalCorruptedError`), to `rescue`."""

    def __init__(self, damage: JournalCorruptedError) -> None:
        super().__init__(str(damage))
        self.damage = damage


class _Scratch:
    """The new journal `rescue` writes what it reads into: one LMDB write transaction, committed
    and flushed when the block ends whole (aborted if not), holding the records as stored, the
    meta database's format and ledger id, its indexes empty, and a commit mark. LMDB options as
    `journal._store`'s; its map is sized once, twice the damaged file (its records fit in it)."""

    def __init__(self, scratch: str, file_bytes: int, anchor: AnchorState | None, data_file: str) -> None:
        self.scratch = scratch
        self.map_size_bytes = 2 * file_bytes + (64 << 20)
        self.anchor = anchor
        self.data_file = data_file
        self.records = 0
        self.first_missing_lsn: int | None = None
        """The first LSN not read before one that was (None: none yet)."""
        self._next_lsn = 1
        self._txn: Any = None
        self._durable_key = lsn_key(anchor.durable_lsn) if anchor is not None and anchor.digest else None

    def __enter__(self) -> _Scratch:
        os.mkdir(self.scratch)
        self._env = lmdb.open(self.scratch, subdir=True, map_size=self.map_size_bytes, max_dbs=DBS_MAX, sync=True,
                              metasync=True, lock=True, writemap=False, meminit=True, create=True, readahead=False)
        return self

    def begin(self, format_version: int, ledger_id: bytes | None, index_names: Sequence[str]) -> None:
        self._txn = self._env.begin(write=True)
        self._dbs = {name: self._env.open_db(name, txn=self._txn, create=True)
                     for name in sorted(expected_databases(index_names))}
        self._txn.put(FORMAT_KEY, str(format_version).encode(), db=self._dbs[META_DB])
        if ledger_id is not None:
            self._txn.put(LEDGER_ID_KEY, ledger_id, db=self._dbs[META_DB])
        self._cursor = self._txn.cursor(db=self._dbs[RECORDS_DB])

    def leaf(self, _name: bytes, keys: list[bytes], values: list[bytes]) -> None:
        """A leaf of the records, checked by the walk: written as it is, after the one before."""
        if self._durable_key is not None and keys[0] <= self._durable_key <= keys[-1]:
            self._check_anchor_digest(keys, values)
        first, last = key_lsn(keys[0]), key_lsn(keys[-1])
        if first != self._next_lsn and self.first_missing_lsn is None:
            self.first_missing_lsn = self._next_lsn
        self._cursor.putmulti(zip(keys, values, strict=True), append=True)
        self.records += len(keys)
        self._next_lsn = last + 1

    def _check_anchor_digest(self, keys: list[bytes], values: list[bytes]) -> None:
        """The record at the anchor's durable LSN must carry the digest the anchor saw there (as
        an open checks it: `Journal._check_anchor_digest`); else the file holds another history,
        and nothing in it is this ledger's to copy. (One that fails its checksum is left to the
        audit, which names it: nothing from it on is copied.)"""
        anchor = self.anchor
        assert anchor is not None
        if self._durable_key not in keys:
            return
        try:
            digest = unframe_chained(anchor.durable_lsn, values[keys.index(self._durable_key)])[0]
        except JournalCorruptedError:
            return
        if digest is not None and digest[: len(anchor.digest)] != anchor.digest:
            raise _Foreign(JournalCorruptedError(
                f"the record at LSN {anchor.durable_lsn} is not the one this directory's anchor saw made durable "
                "there: the data file holds another history than the one written here", where=self.data_file))

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is None:
                dbs = self._dbs
                self._txn.put(COMMIT_MARK_KEY, commit_mark(self._txn, [dbs[name] for name in marked_databases(dbs)]),
                              db=dbs[META_DB])
                self._txn.commit()
            elif self._txn is not None:
                self._txn.abort()
        finally:
            self._env.close()


def read_around(damage: JournalCorruptedError) -> bool:
    """Whether a salvage reads the records around `damage`, which kept a journal from opening
    (`rescue`): damage in the data file's pages, or a meta database not as it should be. Not a
    format this Tally does not read (`JournalFormatError`), nor the tear of a last commit cut off
    in its flush, never acknowledged (`JournalCutOffError`: a writable open takes it back)."""
    return type(damage) is JournalCorruptedError
