"""The records of a data file too damaged to open, read page by page around the damage, for a
salvage (`tally recover --salvage`): a *rescue*.

Opening checks every page before LMDB maps the file (`journal._pages`) and refuses the file at
the first fault, wherever it is: LMDB trusts its file, and a damaged page would misroute a
lookup, or a SIGBUS kill the process. That is right for an open that serves reads, and it left
a salvage nothing to copy when one page of any tree was damaged. `rescue` reads what can still
be trusted, with the same checks, never through LMDB:

1. a snapshot: a meta page that checks on its own, in its slot's parity, the newest first (if
   the two ids are not consecutive, one is damaged: the one the anchor saw flushed last first);
   if the newest is damaged, the one before it, which LMDB keeps whole until the next commit;
2. that snapshot's main database, whole (it says where the records are), and its meta database
   (whose ledger and which format they are; damaged, the anchor's stand in, once another
   snapshot's names the anchor's ledger or a snapshot's records hold the anchor's digest at its
   durable LSN, decided once for the file: else the file is refused, not known to be this
   ledger's): a fault in the main database moves on to the other snapshot; a ledger id or
   format that is not its anchor's refuses the file;
3. the records tree, each page checked as opening checks it; a subtree that fails (a page
   zeroed, a branch damaged, pages swapped, a page the disk cannot read) is skipped, its fault
   noted, and the walk goes on with the next subtree. Keys stay strictly ascending across the
   whole walk, inside the bounds their parents give them, so no record is read twice or out of
   place. The index trees and the free list are not read: a salvage makes the indexes anew.
   If records were lost, or which snapshot is the newest is in doubt, the other snapshot is read
   too, and the one whose records run further from LSN 1 without a gap is kept (the newest's
   records root damaged, the one before loses only the commits since). A snapshot holding
   another record than the anchor's at its durable LSN refuses the whole file, whichever it is.

What it reads it writes, byte for byte (each record framed as stored: its checksum and its link
of the hash chain unchanged), into a new journal in a scratch directory, with the ledger's id,
its format and a copy of its anchor. That journal is opened and audited as any other
(`Journal.open_readonly`): a record the damage took shows as a gap, a record that fails its
checksum or its link as damage at its LSN, and a salvage copies everything before the first.

What this cannot tell: whether the records are the history written here rather than another
copy's of the same ledger, when the record at the anchor's durable LSN was lost with the damage
(`Rescued.history_unchecked`); how far the ledger reached, where the damage took what says it
(`Rescued.end_unknown`); and a record of another time in a page a damaged branch names, one of a
commit taken back (cut off in its flush) whose LSN a later commit used again: its checksum holds,
and the chain breaks only at the record after it, which the copy does not pass.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache

import lmdb

from journal._anchor import ANCHOR_FILE, TXNID_MASK, AnchorState, read_anchor
from journal._check import format_version, open_data_file, same_ledger
from journal._directory import lock_directory
from journal._errors import JournalCorruptedError, JournalError, os_read_error, space_error
from journal._format import key_lsn, lsn_key
from journal._limits import RESCUE_RECORD_BYTES_MIN
from journal._meta import NO_PAGE, PAGE, Database, Meta, corrupt, metas_each
from journal._names import DATA_FILE, FORMAT_KEY, LEDGER_ID_KEY, META_DB, RECORDS_DB
from journal._pages import P_BRANCH, P_LEAF, PageWalk, Tree
from journal._rescue_scratch import LSN_KEY_BYTES, Foreign, Scratch, chain_digest_at


@dataclass(frozen=True)
class Rescued:
    """What `rescue` read of a damaged data file, and where it wrote it."""

    scratch: str
    """The directory of the new journal holding every record read."""
    records_read: int
    """Records read (and written to `scratch`)."""
    through_lsn: int
    """The last LSN the records held, as far as can be told: the largest of the last key met, the
    LSN the anchor saw durable and, where records were skipped, the entries a records database's
    record counts (the snapshot read's, if a subtree of it with no upper bound was skipped; a
    newer one's whose records' root was damaged), bounded by what the file could hold. Every LSN
    up to it not in `scratch` was lost to the damage."""
    counted_lsn: int
    """The most entries a records database's record counts, of the snapshot read or a newer one
    (bounded likewise). Past `through_lsn`, a count no damage found explains: records lost in a
    page that read whole (a stale page in its place), or the count damaged."""
    end_unknown: bool
    """How far the ledger reached is not known: a meta page or another snapshot is damaged and the
    anchor does not name the snapshot read as the last one flushed (a newer snapshot may have held
    more records than any count here says), or the records' last subtree was skipped and nothing
    (the anchor, the records count) says how many it held."""
    first_missing_lsn: int | None
    """The first LSN up to `through_lsn` not read (None: every one was), as the leaves read tell
    it (their keys are checked in order within a leaf; a record missing inside one is the
    audit's to find)."""
    snapshot_faults: tuple[JournalCorruptedError, ...]
    """What was damaged of the snapshots (a meta page, a main or meta database, a records root), and,
    where another snapshot was kept for reaching further, the first damaged page of the records of
    the one it replaced."""
    records_faults: tuple[JournalCorruptedError, ...]
    """Each damaged subtree of the records skipped, first to last."""
    anchor_missing: bool
    """The directory has no anchor (the ledger had one: its data file holds a ledger id)."""
    history_unchecked: bool
    """The anchor holds the digest of the record at its durable LSN, and that record was not read
    (lost with the damage, or failing its checksum): nothing shows these records are the
    history written here rather than another copy's of this ledger."""


class _RecordsWalk(PageWalk):
    """The page walk of `journal._pages`, but for the records tree a subtree that fails its
    check is noted in `faults` and skipped, and the walk goes on with the next one; a page
    the disk cannot read is such a fault."""

    def __init__(self, fd: int, meta: Meta, data_file: str) -> None:
        super().__init__(fd, meta, data_file, None)
        self.faults: list[JournalCorruptedError] = []
        """Each subtree of the records skipped, first to last."""
        self.open_ended = False
        """A subtree skipped had no upper bound: the records' last ones may have been in it."""

    def read(self, pgno: int, count: int = 1) -> bytes:
        try:
            return super().read(pgno, count)
        except OSError as error:
            if error.errno != errno.EIO:  # (an operating error reading the file, not damage: said as such)
                raise os_read_error(error, self.data_file) from error
            raise corrupt(f"the device reports an I/O error reading page {pgno}", self.data_file) from error

    def page(self, name: bytes, pgno: int, depth: int, low: bytes | None, high: bytes | None,
             found: Tree, integer_keys: bool) -> None:
        if name != RECORDS_DB:
            super().page(name, pgno, depth, low, high, found, integer_keys)
            return
        try:
            super().page(name, pgno, depth, low, high, found, integer_keys)
        except JournalCorruptedError as fault:  # (a branch's children each come back here: the deepest fault is noted)
            self.faults.append(fault)
            self.open_ended = self.open_ended or high is None


def reads_around(damage: JournalCorruptedError) -> bool:
    """Whether a rescue reads around `damage`, which kept a journal from opening: damage in its
    data file; not a format this Tally does not read (a `JournalFormatError`), nor the tear of a
    last commit cut off in its flush, never acknowledged (a `JournalCutOffError`: a writable open
    takes it back)."""
    return type(damage) is JournalCorruptedError


def rescuable(path: str, damage: JournalCorruptedError) -> bool:
    """Whether a rescue of the journal at `path` would read something around `damage`, which kept
    it from opening (`reads_around`): a snapshot of it whose meta page, main database and meta
    database read whole, and are its anchor's ledger's (the meta database damaged: as the rescue
    decides it), and none holding another record at the anchor's durable LSN.
    Reads the snapshots' catalogs and, where the anchor holds a digest, their records; writes
    nothing."""
    if not reads_around(damage):
        return False
    data_file = os.path.join(path, DATA_FILE)
    try:
        anchor = read_anchor(path)
        fd = open_data_file(data_file)
    except (JournalError, OSError):
        return False
    try:
        metas = _metas(fd, data_file, anchor)[0]
        for meta in metas:  # (the first snapshot the rescue would read, as it decides whose file it is)
            walk = _RecordsWalk(fd, meta, data_file)
            found = _catalog(walk, [], anchor)
            if found is not None and _root_reads(walk, found[1]) and \
                    _identity_or_fault(found[0], anchor, data_file, []) is not None:
                # (a snapshot holding another record at the anchor's durable LSN refuses the file, as the rescue does)
                vouched = _anchor_vouches(fd, data_file, metas, anchor)
                return not found[2] or vouched or _named_anchors_ledger(fd, data_file, metas, anchor)
        return False
    except (JournalError, OSError, Foreign):
        return False
    finally:
        os.close(fd)


def snapshots_vouch(path: str) -> bool:
    """Whether a snapshot of the data file at `path`, read page by page as a rescue reads it,
    holds the record at the anchor's durable LSN with the anchor's digest (False without an
    anchor that holds one). For a salvage of a file that opened, but whose open could not make
    that check (a record at or before it damaged or missing): the snapshot before the newest may
    still hold it. Raises `JournalCorruptedError` if a snapshot holds another record there: the
    file holds another history (a copy that went on elsewhere), whichever snapshot shows it."""
    data_file = os.path.join(path, DATA_FILE)
    anchor = read_anchor(path)
    fd = open_data_file(data_file)
    try:
        return _anchor_vouches(fd, data_file, _metas(fd, data_file, anchor)[0], anchor)
    except Foreign as foreign:
        raise foreign.damage from None
    except OSError as error:
        raise os_read_error(error, data_file) from error
    finally:
        os.close(fd)


def _anchor_vouches(fd: int, data_file: str, metas: list[Meta], anchor: AnchorState | None) -> bool:
    """Whether a snapshot's records hold the record at the anchor's durable LSN with the
    anchor's digest. Raises `Foreign` if one holds another record there
    (`AnchorState.other_history`): the file holds another history, whichever snapshot shows it."""
    if anchor is None or not anchor.digest or not anchor.durable_lsn:
        return False
    digests = [_durable_digest(fd, meta, anchor, data_file) for meta in metas]
    for digest in digests:
        other = None if digest is None else anchor.other_history(digest, data_file)
        if other is not None:
            raise Foreign(other)
    return any(digests)


def _durable_digest(fd: int, meta: Meta, anchor: AnchorState, data_file: str) -> bytes | None:
    """The chain's digest at the record of the anchor's durable LSN in the snapshot `meta`
    (`chain_digest_at`), found by the walk of its records a rescue makes, writing nothing;
    None if its catalog or records root does not read, or that record is not read whole."""
    walk = _RecordsWalk(fd, meta, data_file)
    found = _catalog(walk, [], anchor)
    if found is None or not _root_reads(walk, found[1]):
        return None
    durable_key, stored = lsn_key(anchor.durable_lsn), []

    def visit(_name: bytes, keys: list[bytes], values: list[bytes]) -> None:
        if keys[0] <= durable_key <= keys[-1] and durable_key in keys:
            stored.append(values[keys.index(durable_key)])

    walk.visit, walk.key_bytes = visit, LSN_KEY_BYTES
    walk.page(RECORDS_DB, found[1].root, 1, None, None, Tree(), False)
    return chain_digest_at(anchor.durable_lsn, stored[0]) if stored else None


def _root_reads(walk: _RecordsWalk, records: Database) -> bool:
    """Whether the records' root page (if any) has a branch's or a leaf's header, its own number."""
    if records.root == NO_PAGE:
        return False
    try:
        stored, _pad, flags = PAGE.unpack_from(walk.read(records.root))[:3]
    except JournalCorruptedError:
        return False
    return stored == records.root and flags in (P_BRANCH, P_LEAF)


def rescue(path: str, scratch: str, index_names: Sequence[str]) -> Rescued:
    """Read the records of the ledger at `path` around damaged pages and write them into a new
    journal at `scratch` (a directory this makes; see the module docstring), a leaf at a time.
    Locks `path` as a writer does while it reads (`JournalLockedError` while a live process
    holds it); writes nothing there. Raises `JournalCorruptedError` (no `lsn`: nothing of it is
    this ledger's to copy) where no snapshot's records can be read, or the file is not its
    anchor's, `JournalWriteError` where `scratch` cannot be written (a full disk); the caller
    removes `scratch` then."""
    held = lock_directory(path, readonly=True)
    try:
        anchor = read_anchor(path)
        data_file = os.path.join(path, DATA_FILE)
        fd = open_data_file(data_file)
        try:
            rescued = _rescue(fd, data_file, scratch, anchor, index_names)
        except OSError as error:
            raise os_read_error(error, data_file) from error
        finally:
            os.close(fd)
        if anchor is not None:
            try:
                shutil.copyfile(os.path.join(path, ANCHOR_FILE), os.path.join(scratch, ANCHOR_FILE))
            except OSError as error:
                raise space_error(scratch, error) from error
        return rescued
    finally:
        if held is not None:
            held.release()


def _rescue(fd: int, data_file: str, scratch: str, anchor: AnchorState | None,
            index_names: Sequence[str]) -> Rescued:
    """`rescue`'s reading, from the open data file `fd`: each snapshot in turn (`_metas`) until
    one reads whole, or the best of those read (see the module docstring)."""
    metas, faults = _metas(fd, data_file, anchor)

    @cache  # (every snapshot's record at the anchor's durable LSN read once, whoever asks first)
    def vouches() -> bool:
        return _anchor_vouches(fd, data_file, metas, anchor)

    def anchors_file() -> bool:
        """Whether the file is known to be the anchor's ledger's, though a snapshot's meta
        database (which names its ledger) is damaged: another snapshot's reads whole and names
        it, or a snapshot's records vouch for it. The anchor then stands in for a damaged meta
        database of any of its snapshots."""
        return _named_anchors_ledger(fd, data_file, metas, anchor) or vouches()

    kept: Rescued | None = None
    counts: list[int] = []
    """The records count each snapshot's catalog says (bounded), of those whose catalog read."""
    for meta in metas:
        attempt = scratch if kept is None else f"{scratch}-other"
        try:
            read = _read_snapshot(fd, data_file, meta, attempt, anchor, index_names, faults, counts, anchors_file)
        except Foreign as foreign:  # another history at the anchor's durable LSN, in any snapshot: the file's
            if kept is not None:
                shutil.rmtree(kept.scratch, ignore_errors=True)
            raise foreign.damage from None
        except JournalCorruptedError as fault:  # (another snapshot's records are not this ledger's: kept as it is)
            if kept is None:
                raise
            faults.append(fault)
            break
        if read is None:
            continue
        if kept is None or _reach(read) > _reach(kept):
            if kept is not None:
                _take_place(attempt, scratch)
                read = replace(read, scratch=scratch, snapshot_faults=(*read.snapshot_faults, *kept.records_faults[:1]))
            kept = read
        else:
            shutil.rmtree(attempt, ignore_errors=True)
        if kept.first_missing_lsn is None and not kept.end_unknown:
            break
    if kept is None or not kept.records_read:
        if kept is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        shown = "; ".join(str(fault) for fault in faults)
        raise JournalCorruptedError(f"nothing in it can be read: no snapshot's meta page, main database, meta "
                                    f"database and records read whole ({shown})", where=data_file)
    try:  # (the snapshots not read above too, as `rescuable` reads them: another history in any refuses the file)
        vouches()
    except Foreign as foreign:
        shutil.rmtree(kept.scratch, ignore_errors=True)
        raise foreign.damage from None
    return kept


def _take_place(attempt: str, scratch: str) -> None:
    """Move the scratch journal at `attempt` to `scratch`, in place of the one there."""
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        os.rename(attempt, scratch)
    except OSError as error:
        shutil.rmtree(attempt, ignore_errors=True)
        raise space_error(scratch, error) from error


def _reach(rescued: Rescued) -> int:
    """How far a rescue's records run from LSN 1 without a gap."""
    return rescued.first_missing_lsn if rescued.first_missing_lsn is not None else rescued.through_lsn + 1


def _read_snapshot(fd: int, data_file: str, meta: Meta, scratch: str, anchor: AnchorState | None,
                   index_names: Sequence[str], faults: list[JournalCorruptedError], counts: list[int],
                   anchors_file: Callable[[], bool]) -> Rescued | None:
    """The records of the snapshot `meta` commits, written into a new journal at `scratch`; None
    (its fault added to `faults`) if its main or meta database does not read whole, or no record
    does. `faults` holds what was damaged of the newer snapshots, `counts` their records counts
    (this one's is added once its catalog reads); `anchors_file`, whether the file is known to
    be the anchor's ledger's (`_rescue`'s), asked only if this snapshot's meta database is
    damaged."""
    damaged_before, newer = bool(faults), max(counts, default=0)
    walk = _RecordsWalk(fd, meta, data_file)
    found = _catalog(walk, faults, anchor)
    if found is None:
        return None
    meta_values, records, stood_in = found
    identity = _identity_or_fault(meta_values, anchor, data_file, faults)
    if identity is None:
        return None
    if stood_in and not anchors_file():
        raise _unknown_ledger(anchor, data_file, faults)
    version, ledger_id = identity
    counted = min(records.entries, walk.file_pages * walk.page_bytes // RESCUE_RECORD_BYTES_MIN)
    counts.append(counted)
    tree = Tree()
    try:
        with Scratch(scratch, walk.file_pages * walk.page_bytes, anchor, data_file) as written:
            written.begin(version, ledger_id, index_names)
            walk.visit, walk.key_bytes = written.leaf, LSN_KEY_BYTES
            if records.root != NO_PAGE:
                walk.page(RECORDS_DB, records.root, 1, None, None, tree, False)
    except BaseException as error:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(error, (lmdb.Error, OSError)):  # (writing the scratch: a read of the file raises JournalError)
            raise space_error(scratch, error) from error
        raise
    if not written.records and records.root != NO_PAGE:  # (its root failed: what the walk met first)
        faults += walk.faults[:1]
        shutil.rmtree(scratch, ignore_errors=True)
        return None
    last = key_lsn(tree.last_key) if tree.last_key is not None else 0
    # (only a subtree skipped at the end explains a count past the last record read: else it is hedged, `counted_lsn`)
    through = max(last, counted if walk.open_ended else 0, newer, anchor.durable_lsn if anchor is not None else 0)
    missing = written.first_missing_lsn if written.first_missing_lsn is not None else written.next_lsn
    flushed = anchor is not None and anchor.txnid != 0 and meta.txnid & TXNID_MASK == anchor.txnid
    return Rescued(scratch=scratch, records_read=written.records, through_lsn=through, counted_lsn=max(counted, newer),
                   end_unknown=damaged_before and not flushed or walk.open_ended and through <= last,
                   first_missing_lsn=missing if missing <= through else None, snapshot_faults=tuple(faults),
                   records_faults=tuple(walk.faults), anchor_missing=anchor is None and ledger_id is not None,
                   history_unchecked=written.durable_key is not None and not written.anchor_checked)


def _metas(fd: int, data_file: str, anchor: AnchorState | None) -> tuple[list[Meta], list[JournalCorruptedError]]:
    """The meta pages that check on their own and hold a transaction id of their slot's parity
    (LMDB writes transaction N to page N % 2), the newest first; and what was wrong with the
    others. Two whose ids are not consecutive are a fault (one id is damaged, and which is newer
    is not known): then the one the anchor saw flushed last comes first."""
    metas, faults = metas_each(fd, data_file, mmap.PAGESIZE)
    kept: list[Meta] = []
    for meta in metas:
        if meta.txnid and meta.txnid % 2 != meta.number:
            faults.append(corrupt(f"transaction id {meta.txnid} in slot {meta.number}: damaged",
                                  f"meta page {meta.number} of {data_file}"))
        else:
            kept.append(meta)
    if len(kept) == 2 and abs(kept[0].txnid - kept[1].txnid) != 1:
        faults.append(corrupt(f"the meta pages hold transaction ids {kept[0].txnid} and {kept[1].txnid}, not two "
                              "consecutive ones: one of them is damaged", data_file))
        if anchor is not None and anchor.txnid:
            kept.sort(key=lambda meta: meta.txnid & TXNID_MASK != anchor.txnid)  # (stable: then the newest first)
    return kept, faults


def _catalog(walk: _RecordsWalk, faults: list[JournalCorruptedError], anchor: AnchorState | None
             ) -> tuple[dict[bytes, bytes], Database, bool] | None:
    """What the meta database of `walk`'s snapshot holds, its records database's record, and
    whether the anchor stood in for the first, the main database and the meta database walked
    whole; None (the fault added to `faults`) if either is damaged. A damaged meta database, with
    an anchor, is noted in `faults` and the anchor's format and ledger id stand in for what it
    held (nothing else in it is needed; `_read_snapshot` then checks the records are the anchor's)."""
    meta_values: dict[bytes, bytes] = {}
    try:
        catalog = dict(walk.main_database())
        for name in (META_DB, RECORDS_DB):
            if name not in catalog:
                raise JournalCorruptedError(f"its main database names no {name.decode()} database",
                                            where=f"the main database of {walk.data_file}")
    except JournalCorruptedError as fault:
        faults.append(fault)
        return None
    try:
        walk.visit = lambda _name, keys, values: meta_values.update(zip(keys, values, strict=True))
        walk.tree(META_DB, Database.parse(catalog[META_DB]))
    except JournalCorruptedError as fault:
        faults.append(fault)
        if anchor is None:
            return None
        meta_values = {FORMAT_KEY: str(anchor.format_version).encode(), LEDGER_ID_KEY: anchor.ledger_id}
        return meta_values, Database.parse(catalog[RECORDS_DB]), True
    return meta_values, Database.parse(catalog[RECORDS_DB]), False


def _named_anchors_ledger(fd: int, data_file: str, metas: list[Meta], anchor: AnchorState | None) -> bool:
    """Whether the meta database of one of the snapshots `metas` reads whole and names the
    anchor's ledger: what lets the anchor stand in for another snapshot's damaged one (a file's
    ledger id is written once, when it is made; each commit rewrites the meta database's page)."""
    if anchor is None:
        return False
    for meta in metas:
        found = _catalog(_RecordsWalk(fd, meta, data_file), [], None)
        if found is not None and found[0].get(LEDGER_ID_KEY) == anchor.ledger_id:
            return True
    return False


def _unknown_ledger(anchor: AnchorState | None, data_file: str,
                    faults: list[JournalCorruptedError]) -> JournalCorruptedError:
    """The fault of a file whose meta database is damaged in every snapshot, whose records do
    not show it is the anchor's ledger's either: the record at the anchor's durable LSN was not
    read (the file may be another ledger's, or an older copy; the damage may have taken it)."""
    shown = "; ".join(str(fault) for fault in faults)
    unchecked = ("the anchor holds no digest of a record to check them by" if anchor is None or not anchor.digest
                 or not anchor.durable_lsn else f"the record at LSN {anchor.durable_lsn}, which the anchor saw "
                 "durable, was not read with the digest the anchor holds")
    return JournalCorruptedError(
        f"its meta database, which names its ledger, is damaged ({shown}), and nothing else in it shows it is this "
        f"ledger's: {unchecked} (the file may be another ledger's, or an older copy of this one)", where=data_file)


def _identity_or_fault(meta_values: dict[bytes, bytes], anchor: AnchorState | None, data_file: str,
                       faults: list[JournalCorruptedError]) -> tuple[int, bytes | None] | None:
    """`_identity`, or None (its fault added to `faults`) where a snapshot's meta database is
    damaged in what names the ledger (a format or ledger id key or value that does not read)
    and names no other ledger than the anchor's: the other snapshot may be whole. One that
    names another ledger's id raises, as does any with no anchor to hold it to: the file is not
    known to be this ledger's, and is never read as its, whatever the other snapshot holds."""
    try:
        return _identity(meta_values, anchor, data_file)
    except JournalCorruptedError as fault:
        named = meta_values.get(LEDGER_ID_KEY)
        if type(fault) is not JournalCorruptedError or anchor is None or named not in (None, anchor.ledger_id):
            raise
        faults.append(fault)
        return None


def _identity(meta_values: dict[bytes, bytes], anchor: AnchorState | None, data_file: str) -> tuple[int, bytes | None]:
    """The format version and ledger id the meta database holds, once they are ones this reads
    and its anchor's, checked as an open checks them (`journal._check`: `format_version`,
    `same_ledger`); `JournalCorruptedError` if not: whose records these are is not known."""
    version, ledger_id = format_version(meta_values.get(FORMAT_KEY), anchor, data_file), meta_values.get(LEDGER_ID_KEY)
    if ledger_id is None and version >= 2:
        raise JournalCorruptedError("its meta database holds no ledger id: whose records these are is not known",
                                    where=data_file)
    if anchor is not None:
        same_ledger(ledger_id, version, anchor, data_file)
    return version, ledger_id
