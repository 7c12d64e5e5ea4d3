"""What opening a journal checks of its data file before and as LMDB reads it.

1. Before LMDB maps the file (`check_before_mapping`): the meta pages, read as raw bytes
   (`journal._meta`). A read that races a live writer in another process (a meta page being
   written, the file being extended) can see a torn page; the check is retried a few times
   before damage is declared, since damage stays where a race moves on.
2. In the snapshot of a read transaction, which keeps a live writer from reusing its pages
   meanwhile (`check_snapshot`): every page (`journal._pages.walk`), every index entry's
   checksum (`_Visitor`), the databases a journal has, the format version and the ledger id.
3. The records against themselves and against the anchor (`check_records`): LSNs 1..N
   without a gap, the same ledger and format, and N no lower than the anchor saw durable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lmdb

from journal._anchor import ANCHOR_FILE, AnchorState, open_regular
from journal._errors import (
    JournalAnchorMissingError,
    JournalCorruptedError,
    JournalError,
    JournalFormatError,
    lmdb_read_error,
    os_read_error,
)
from journal._format import index_seed, key_lsn, unframe_index_values
from journal._limits import FORMAT_VERSION, FORMAT_VERSIONS_READ, RACE_TRIES_MAX, RACE_WAIT_S, SNAPSHOT_TRIES_MAX
from journal._meta import Meta, committed_meta, read_metas
from journal._names import COMMIT_MARK_KEY, FORMAT_KEY, LEDGER_ID_KEY, META_DB, META_KEYS, RECORDS_DB
from journal._marks import (
    check_commit_mark,
    is_stale_mark,
    mark_shape,
    read_mark,
    shape_disagrees,
    shape_in,
    shape_of,
)
from journal._pages import Layout, walk
from journal._seal import file_sums, sealed_layout
from journal._walk_aside import Aside


@dataclass(frozen=True)
class Opened:
    """What opening found: the data file's format and identity, and its checked layout."""

    format_version: int
    ledger_id: bytes | None
    """None for a ledger made before ledger ids (format 1, not yet written to here)."""
    layout: Layout
    index_damage: JournalCorruptedError | None = None
    """The first index entry that failed its checksum, where an open that audits (`check_snapshot`'s
    `index_damage_kept`) went on past it; an open that serves raises it."""


def check_before_mapping(data_file: str) -> None:
    """The meta pages (see the module docstring); raises `JournalCorruptedError`."""
    _read_committed(data_file)


def _read_committed(data_file: str, txnid: int | None = None) -> Meta | None:
    """`_read_committed_once`, read again (a few times, a moment apart) while what it reads
    is inconsistent: a read racing a live writer sees a page half written, damage stays."""
    for attempt in range(RACE_TRIES_MAX):
        try:
            return _read_committed_once(data_file, txnid)
        except JournalCorruptedError:
            if attempt == RACE_TRIES_MAX - 1:
                raise
            time.sleep(RACE_WAIT_S)
    raise AssertionError("unreachable")


def _read_committed_once(data_file: str, txnid: int | None) -> Meta | None:
    """The committed meta of `data_file` (with `txnid`: the meta holding that transaction,
    or None if neither does any more)."""
    fd = open_data_file(data_file)
    try:
        meta0, meta1 = read_metas(fd, data_file)
        committed = committed_meta(meta0, meta1, data_file)
        if txnid is None or committed.txnid == txnid:
            return committed
        older = meta1 if committed is meta0 else meta0
        return older if older.txnid == txnid else None
    except OSError as error:
        raise os_read_error(error, data_file) from error
    finally:
        os.close(fd)


def open_data_file(data_file: str) -> int:
    """A descriptor of `data_file` for reading. A missing file, or anything but a regular file
    there (a FIFO, whose open would wait for a writer that never comes; a device, which an open
    may act on; a directory), is `JournalCorruptedError` naming it; another failure to open it
    is what `os_read_error` makes of it."""
    try:
        return open_regular(data_file, "the data file")[0]
    except FileNotFoundError:
        raise JournalCorruptedError("the data file is missing", where=data_file) from None
    except OSError as error:
        raise os_read_error(error, data_file) from error


class _Visitor:
    """What the page walk hands each leaf to. It reads the format version from the meta
    database (walked first), then verifies the checksum of every entry of every index (in
    formats that have them).

    So an index entry whose key or value was damaged is found as the journal opens: a key
    changed in place would otherwise hide an entry from every lookup of it (an id would look
    unused, an account's entry missing) without failing any check a read could make."""

    def __init__(self, index_names: Sequence[str], index_damage_kept: bool = False) -> None:
        self.index_names = list(index_names)
        self.index_damage_kept = index_damage_kept
        self.index_damage: JournalCorruptedError | None = None
        """With `index_damage_kept`, the first index entry that failed its checksum (the walk
        goes on: an audit reports it, a salvage rebuilds the indexes from the records)."""
        self._indexes = {name.encode(): (name, index_seed(name)) for name in index_names}
        self.format_version: int | None = None
        self.ledger_id: bytes | None = None
        self.commit_mark: int | None = None
        """`COMMIT_MARK_KEY`'s (-1 if it holds no number; None if it is not there)."""
        self.commit_shape: tuple[int, ...] | None = None
        """The shape of the databases the commit that wrote the mark made (`mark_shape`)."""

    def __call__(self, name: bytes, keys: list[bytes], values: list[bytes]) -> None:
        if name == META_DB:
            for key, value in zip(keys, values, strict=True):
                if key == FORMAT_KEY:
                    self.format_version = int(value) if value.isdigit() else -1
                elif key == LEDGER_ID_KEY:
                    self.ledger_id = value
                elif key == COMMIT_MARK_KEY:
                    self.commit_mark = read_mark(value)
                    self.commit_shape = mark_shape(value)
            unknown = [key for key in keys if key not in META_KEYS]
            if unknown and not (self.format_version is not None and self.format_version > FORMAT_VERSION):
                # (a newer format's own key is that format's: its version is refused as newer)
                raise JournalCorruptedError(f"the meta database holds the key {unknown[0][:64]!r}, which no Tally "
                                            "writes: a key damaged in place?", where="the meta database")
            return
        label, seed = self._indexes[name]
        if self.format_version is None:
            raise JournalFormatError("the format version is missing", where="the meta database")
        if self.format_version >= 2:
            try:
                unframe_index_values(seed, label, keys, values)
            except JournalCorruptedError as damage:
                if not self.index_damage_kept:
                    raise
                self.index_damage = self.index_damage or damage

    @property
    def names(self) -> frozenset[bytes]:
        """The databases it reads: the meta database and every index."""
        return frozenset({META_DB, *self._indexes})


def visitor_for(index_names: Sequence[str], format_version: int | None) -> _Visitor:
    """A `_Visitor` that has read `format_version` already (a second page walk's: `journal._walk_aside`)."""
    visitor = _Visitor(index_names)
    visitor.format_version = format_version
    return visitor


def expected_databases(index_names: Sequence[str]) -> set[bytes]:
    """The databases a journal with these indexes holds."""
    return {RECORDS_DB, META_DB, *(name.encode() for name in index_names)}


def read_metas_of(data_file: str) -> tuple[Meta, Meta]:
    """Both meta pages of `data_file`, each checked on its own (`journal._meta.read_metas`)."""
    fd = open_data_file(data_file)
    try:
        return read_metas(fd, data_file)
    finally:
        os.close(fd)


class Walked:
    """What `walk_meta` found: a snapshot's layout and what its meta database holds."""

    def __init__(self, layout: Layout, visit: _Visitor) -> None:
        self.layout = layout
        self.format_version = visit.format_version
        self.ledger_id = visit.ledger_id
        self.commit_mark = visit.commit_mark
        self.commit_shape = visit.commit_shape

    def torn(self, txnid: int) -> bool:
        """Whether this snapshot, of LMDB transaction `txnid`, whole by the walk, is not the
        tree its commit wrote: an older tree's mark (`is_stale_mark`), or its own mark over
        databases of another shape (`shape_disagrees`)."""
        return is_stale_mark(self.commit_mark, txnid) or shape_disagrees(
            self.commit_mark, self.commit_shape, txnid, shape_of(self.layout.trees))


def walk_meta(meta: Meta, data_file: str, index_names: Sequence[str]) -> Walked:
    """The snapshot `meta` commits, by the walk opening makes (in one process). Raises
    `JournalCorruptedError` where it is not whole."""
    visit = _Visitor(index_names)
    fd = open_data_file(data_file)
    try:
        layout = walk(fd, meta, data_file, visit, visit.names, first=META_DB, key_bytes={RECORDS_DB: 8})
        layout.file_bytes = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return Walked(layout, visit)


def check_snapshot(env: lmdb.Environment, data_file: str, index_names: Sequence[str],
                   anchor: AnchorState | None, sealed_in: str | None = None,
                   index_damage_kept: bool = False) -> tuple[dict[bytes, Any], Opened]:
    """Walk every page of the snapshot a read transaction holds, then open the databases and
    read the format and id (see the module docstring). A map another process grew meanwhile is
    taken at its new size (with no transaction open) and the check begun again. `sealed_in`:
    the directory whose seal may stand in for the walk (`journal._seal`). `index_damage_kept`:
    an index entry that fails its checksum is kept in `Opened.index_damage`, not raised (for
    an audit, or a salvage, which read no index to answer anyone).

    py-lmdb opens a database handle in a transaction of its own, a write one unless the
    environment is read-only; opening an existing database changes nothing, so that
    transaction commits without writing a byte."""
    expected = expected_databases(index_names)
    for _ in range(SNAPSHOT_TRIES_MAX):
        try:
            with env.begin(write=False, buffers=False) as snapshot:
                visit = _Visitor(index_names, index_damage_kept)
                layout = _walk_snapshot(snapshot.id(), data_file, visit, sealed_in)
                if layout is None:
                    continue  # a live writer committed twice since the snapshot began: its meta is gone
                _check_databases(set(layout.trees), expected, data_file)
                dbs = {name: env.open_db(name, create=False) for name in sorted(expected)}
                with env.begin(write=False, buffers=False) as txn:
                    version = txn.get(FORMAT_KEY, db=dbs[META_DB])
                    ledger_id = txn.get(LEDGER_ID_KEY, db=dbs[META_DB])
                    check_commit_mark(txn.get(COMMIT_MARK_KEY, db=dbs[META_DB]), txn.id(), data_file,
                                      shape_in(txn, dbs))
        except lmdb.MapResizedError:
            env.set_mapsize(0)  # no transaction of this environment is open here
            continue
        except lmdb.Error as error:
            raise lmdb_read_error(error, data_file) from error
        return dbs, Opened(format_version(version, anchor, data_file), ledger_id, layout, visit.index_damage)
    raise JournalError(f"{data_file} changed too fast to be checked ({SNAPSHOT_TRIES_MAX} tries)")


def check_to_seal(data_file: str, index_names: Sequence[str]) -> tuple[Meta, bytes, Layout] | None:
    """For the seal of a data file no one writes now (`journal._seal`): its committed meta, the
    sums of its bytes up to that snapshot's last page, then a walk of every page exactly as
    opening does (the sums first: a byte that changes during the walk fails them). None if
    another snapshot was committed meanwhile. Raises `JournalCorruptedError` where it finds
    damage, `OSError` or `JournalError` if the file cannot be read."""
    meta = _read_committed(data_file)
    assert meta is not None
    fd = open_data_file(data_file)
    try:
        sums = file_sums(fd, (meta.last_page + 1) * meta.page_bytes)
    finally:
        os.close(fd)
    layout = _walk_snapshot(meta.txnid, data_file, _Visitor(index_names))
    return None if layout is None else (meta, sums, layout)


def seal_stands(directory: str, data_file: str) -> bool:
    """Whether the seal in `directory` stands for the data file as it is now, as an open would
    take it (`journal._seal.sealed_layout`): it seals the committed snapshot, and the file's
    bytes up to its last page are those it summed. So a close after an open that committed
    nothing keeps the seal its open took, reading the file once instead of walking it."""
    meta = _read_committed(data_file)
    assert meta is not None
    fd = open_data_file(data_file)
    try:
        return sealed_layout(directory, fd, meta, data_file) is not None
    finally:
        os.close(fd)


def _check_databases(found: set[bytes], expected: set[bytes], data_file: str) -> None:
    if found != expected:
        shown = sorted(name.decode(errors="replace") for name in found)
        missing = sorted(name.decode(errors="replace") for name in expected - found)
        raise JournalCorruptedError(f"it holds the databases {shown}, missing {missing}", where=data_file)


def _walk_snapshot(txnid: int | None, data_file: str, visit: _Visitor, sealed_in: str | None = None) -> Layout | None:
    """`walk` from the meta of transaction `txnid` (None: the committed one) (or, from
    `sealed_in`, the layout a seal of exactly these bytes vouches for), or None if neither
    meta page holds it now."""
    meta = _read_committed(data_file, txnid)
    if meta is None:
        return None
    fd = open_data_file(data_file)
    try:
        layout = None if sealed_in is None else sealed_layout(sealed_in, fd, meta, data_file)
        if layout is None:
            key_bytes = {RECORDS_DB: 8}
            layout = walk(fd, meta, data_file, visit, visit.names, first=META_DB, key_bytes=key_bytes,
                          aside=Aside(fd, meta, data_file, visit, key_bytes))
        layout.file_bytes = os.fstat(fd).st_size
        return layout
    except OSError as error:
        raise os_read_error(error, data_file) from error
    finally:
        os.close(fd)


def format_version(stored: bytes | None, anchor: AnchorState | None, data_file: str) -> int:
    """The format version the meta database holds. One that differs from the anchor's is
    damage; one this code does not read, with the anchor agreeing (or no anchor), is
    `JournalFormatError`: the file may be whole, made by another version of Tally."""
    version = stored.decode(errors="replace") if stored is not None else None
    if anchor is not None and version != str(anchor.format_version):
        raise JournalCorruptedError(f"format version {version} in the data file, {anchor.format_version} in its "
                                    "anchor: one of them is damaged", where=data_file)
    if version is None:
        raise JournalFormatError("the format version is missing", where=data_file)
    if version.isdigit() and int(version) in FORMAT_VERSIONS_READ:
        return int(version)
    newer = version.isdigit() and int(version) > FORMAT_VERSION
    raise JournalFormatError(
        f"format version {version} is "
        + ("newer than this Tally reads" if newer else "not one this Tally understands")
        + f" (it reads versions {', '.join(map(str, FORMAT_VERSIONS_READ))})",
        where=data_file,
    )


def check_records(opened: Opened, anchor: AnchorState | None, first_gap: Callable[[], int], data_file: str) -> int:
    """The last LSN, once the records agree with themselves and the data file with its anchor:
    LSNs run 1..N without a gap (the page walk counted N records, in order), the ledger ids
    match, and N is at least what the anchor saw durable. `first_gap()` finds the first LSN
    missing, to name it."""
    if anchor is not None:  # (first: a gap in another ledger's records is not this ledger's to name, nor copy)
        same_ledger(opened.ledger_id, opened.format_version, anchor, data_file)
    records = opened.layout.trees[RECORDS_DB]
    last = 0
    if records.entries:
        first_key, last_key = records.first_key, records.last_key
        assert first_key is not None and last_key is not None
        if key_lsn(first_key) != 1 or key_lsn(last_key) != records.entries:
            missing = first_gap()
            raise JournalCorruptedError(f"LSN {missing} is missing: the records hold {records.entries} LSNs, "
                                        f"from {key_lsn(first_key)} to {key_lsn(last_key)}, not 1 to "
                                        f"{records.entries} without a gap", lsn=missing, where=f"LSN {missing}")
        last = records.entries
    if anchor is None:
        if opened.ledger_id is not None and last:
            raise JournalAnchorMissingError(
                f"the anchor is missing: the data file holds ledger {opened.ledger_id.hex()} and {last} records, and "
                "had one. Nothing can tell whether this is the journal's newest state; `tally recover` audits it "
                "and writes a new anchor", where=os.path.join(os.path.dirname(data_file), ANCHOR_FILE))
        if opened.ledger_id is None and opened.format_version >= 2:
            raise JournalCorruptedError("the ledger id is missing from the data file (format 2 has one from its "
                                        "creation)", where=data_file)
        return last
    if last < anchor.durable_lsn:
        raise JournalCorruptedError(
            f"the journal ends at LSN {last}, but LSN {anchor.durable_lsn} was durable before: "
            f"{anchor.durable_lsn - last} acknowledged record(s) are missing (LMDB is opening an older snapshot; "
            "a meta page may be damaged)", lsn=last + 1, where=data_file)
    return last


def same_ledger(ledger_id: bytes | None, format_version: int, anchor: AnchorState, data_file: str) -> None:
    """`JournalCorruptedError` unless the data file, holding `ledger_id`, holds the ledger `anchor`
    names (a ledger made before ids, format 1, holds none until its next commit writes the
    anchor's in)."""
    if ledger_id is None and format_version == 1:
        return
    if ledger_id != anchor.ledger_id:
        mine = ledger_id.hex() if ledger_id else "without an id"
        raise JournalCorruptedError(f"the data file belongs to ledger {mine}, but the directory's anchor to ledger "
                                    f"{anchor.ledger_id.hex()}: a data file from elsewhere?", where=data_file)
