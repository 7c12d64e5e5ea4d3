"""Opening after the machine stopped during a commit's flush: the snapshot before it, taken back.

Each commit is flushed once (`journal._store`): its data pages and its meta page are written,
then the data file is flushed, and only once that flush returns is anyone told. A power loss
during the flush may leave the new meta page on disk and some of the commit's pages not. The
meta page then names a tree whose pages are not all there; worse, they may hold, whole, an
older tree of the same ledger: the pages the commit reused held one before it (a test makes
that state: `tests/test_unfinished.py`). So every commit writes its own LMDB transaction id
into the meta database (`COMMIT_MARK_KEY`), and every open checks that the snapshot it opens
holds its own (`journal._marks.check_commit_mark`): an older tree under a newer meta page
holds an older mark, and a mixture of new and old pages fails the walk's counters.

Two things make that state recoverable, exactly:
- the commit was never acknowledged (its flush never returned), so nothing anyone was told
  of is in it;
- the snapshot before it is whole: LMDB writes a commit only into pages that neither of the
  two newest snapshots holds, and that snapshot's own flush returned before the commit began.

`unfinished` recognises that state and nothing else, and `take_back` then opens the snapshot
before, T-1: a copy of its meta page, under transaction id T-2, replaces the newer one in its
slot. LMDB keeps transaction N's meta in page N % 2 and opens the higher id, so it opens T-1's
own meta (which holds its own mark), and the next commit, T again, goes in that slot. The pages
the unfinished commit wrote were free in T-1's snapshot and still are. It requires, in turn:
1. a writer opening (a read-only open never writes: it says what it found, and that a
   writable open takes the snapshot back) and an anchor, which says which LSN was last
   acknowledged and which commit was last flushed whole (`AnchorState.txnid`): not the newer
   one, whose damage would otherwise be damage (a stray write after it was whole);
2. the older meta page exactly one transaction before the newer, and the newer snapshot not
   whole by the page walk opening makes, or whole but holding the mark of a tree its commit's
   pages held before (`journal._marks.is_stale_mark`), or its own mark over databases of another
   shape than its commit made (`journal._marks.shape_disagrees`: the leaf holding the mark
   reached the disk, the catalog above it did not and names an older tree's databases);
3. the older snapshot whole by the same walk, not holding an older tree's mark or another
   shape than its mark says either (none: a ledger last
   written before marks), this anchor's ledger, in its format, and LSNs 1..N without a gap, N
   at least the LSN the anchor saw durable: so no acknowledged record is in the commit taken
   back (the anchor is written after each flush returns).
Anything else is the damage the open found, reported where it is, and nothing is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from journal._anchor import TXNID_MASK, AnchorState
from journal._check import expected_databases, read_metas_of, walk_meta
from journal._errors import JournalCorruptedError, JournalError, JournalWriteError
from journal._lmdb_files import rewind_reader_table
from journal._format import key_lsn
from journal._meta import META_BYTES, PAGE, Meta, committed_meta, meta_with_txnid
from journal._names import DATA_FILE, RECORDS_DB

logger = logging.getLogger("tally.journal")

class Unfinished:
    """An unfinished last commit found over a whole snapshot (`unfinished`)."""

    def __init__(self, newer: Meta, older: Meta, last_lsn: int) -> None:
        self.newer = newer
        self.older = older
        self.last_lsn = last_lsn
        """The last LSN of the older, whole snapshot."""

    def says(self, damage: JournalCorruptedError) -> str:
        """What happened, for the log or for a read-only open's error."""
        return (f"the last commit (LMDB transaction {self.newer.txnid}) was cut off while it was being flushed (the "
                f"machine stopped) and never acknowledged: its snapshot is not whole ({damage.reason}); the snapshot "
                f"before it (transaction {self.older.txnid}, LSN {self.last_lsn}) is whole")


def unfinished(data_file: str, index_names: Sequence[str], anchor: AnchorState | None) -> Unfinished | None:
    """The unfinished last commit over a whole snapshot that `data_file` holds, if it holds
    one (see the module docstring: the caller met damage opening it); None if anything else
    is the case. Reads only; walks both snapshots."""
    if anchor is None:
        return None
    try:
        newer, older = _newer_and_older(data_file)
        if anchor.txnid and anchor.txnid == newer.txnid & TXNID_MASK:
            return None  # the anchor saw that commit's flush return: whatever is wrong with it is damage
        if older.txnid < 2 or newer.txnid != older.txnid + 1:
            return None
        try:
            torn = walk_meta(newer, data_file, index_names).torn(newer.txnid)
        except JournalCorruptedError:
            pass  # the newer snapshot is not whole: the case looked for
        else:  # whole, but an older tree (or part of one: see the module docstring), or something else
            if not torn:
                return None
        walked = walk_meta(older, data_file, index_names)
        if (set(walked.layout.trees) != expected_databases(index_names) or walked.ledger_id != anchor.ledger_id
                or walked.format_version != anchor.format_version or walked.torn(older.txnid)):
            return None
        records = walked.layout.trees[RECORDS_DB]
        if not records.entries or records.first_key is None or records.last_key is None:
            return None
        last = key_lsn(records.last_key)
        if key_lsn(records.first_key) != 1 or last != records.entries or last < anchor.durable_lsn:
            return None
    except (JournalCorruptedError, OSError):
        return None
    return Unfinished(newer, older, last)


def take_back(data_file: str, found: Unfinished, damage: JournalCorruptedError) -> None:
    """Open the snapshot before the unfinished commit `found` (`_write_older_meta`). Logged as
    a warning."""
    _write_older_meta(data_file, found.newer, found.older)
    logger.warning("%s: %s; the ledger opens at that snapshot, as it was before the commit began", data_file,
                   found.says(damage))


def take_back_unflushed(data_file: str, txnid: int) -> None:
    """Take back at once the last commit, of LMDB transaction `txnid`, whose flush failed (its
    writer's `journal._store.Store.flush`): it was never acknowledged, and its pages may never
    reach the disk though the page cache shows them (a failed write-back leaves them clean).
    The snapshot before it was flushed whole. So the data file opens at that snapshot, on
    disk and for every read transaction begun from now on, in any process (LMDB reads the
    meta page that the reader table's transaction id names, through the page cache, and
    takes its roots as they are). In this process reads stop at the durable LSN, and a reader
    in another process whose descriptor of the data file was open when the flush failed
    refuses the commit, its own flush failing as this one did (`journal._seen`). Not seen to:
    a reader process that opens the data file after the failed flush and reads the commit in
    the instant before it is taken back (its flush finds the pages clean and succeeds), and a
    read transaction begun during the write of the meta page, which may copy a mixture of its
    roots. Raises
    `JournalCorruptedError` if the meta pages are not
    those of `txnid` and the one before, `OSError` if the meta page cannot be written and
    flushed."""
    newer, older = _newer_and_older(data_file)
    if newer.txnid != txnid or older.txnid != txnid - 1 or older.txnid < 1:
        raise JournalCorruptedError(f"the meta pages hold transactions {older.txnid} and {newer.txnid}, not "
                                    f"{txnid} and the one before it", where=data_file)
    _write_older_meta(data_file, newer, older)


def flush_failed(directory: str, lock_fd: int, txnid: int, error: Exception) -> JournalWriteError:
    """What a failed flush of the data file in `directory` becomes once the commit it was to
    make durable, the newest, of LMDB transaction `txnid`, is taken back (`take_back_unflushed`),
    and LMDB's reader table (`lock.mdb`, the writer's descriptor `lock_fd`) set back to the
    commit before (`rewind_reader_table`: else, while another process has the ledger open, no
    open could read it). Logged."""
    data_file = os.path.join(directory, DATA_FILE)
    try:
        take_back_unflushed(data_file, txnid)
    except (OSError, JournalError) as again:
        logger.error("flushing %s failed (%s), and so did taking back the commit of LMDB transaction %d (%s)",
                     data_file, error, txnid, again)
        return JournalWriteError(
            f"flushing {data_file} failed ({error}), and so did taking back the last commit ({again}): it is in the "
            "data file but may not be on disk, so the outcome of what it holds is unknown. The disk is failing: "
            "restart the machine before reopening the ledger (the page cache may show what the disk lost), then "
            "retry with the same ids to learn it")
    try:
        rewind_reader_table(lock_fd, txnid)
    except Exception as again:  # (taken back already: said, whatever went wrong here)
        logger.error("LMDB's reader table of %s could not be set back to transaction %d: %s", directory, txnid - 1,
                     again)
        rewound = (f"; LMDB's reader table could not be set back ({again}): close every other process that has the "
                   "ledger open before opening it again")
    else:
        rewound = ""
    logger.warning("flushing %s failed (%s): the commit of LMDB transaction %d was taken back", data_file, error,
                   txnid)
    return JournalWriteError(
        f"flushing {data_file} failed ({error}): the last commit was taken back (the data file holds the commit "
        f"before it, on disk), so nothing in it was applied{rewound}; open the ledger again to go on (the disk may "
        "be failing)")


def _newer_and_older(data_file: str) -> tuple[Meta, Meta]:
    """The committed meta page of `data_file` and the other one (`committed_meta`: raises
    `JournalCorruptedError` unless they hold consecutive transactions)."""
    meta0, meta1 = read_metas_of(data_file)
    newer = committed_meta(meta0, meta1, data_file)
    return newer, meta1 if newer is meta0 else meta0


def _write_older_meta(data_file: str, newer: Meta, older: Meta) -> None:
    """Write a copy of the `older` meta page, under the transaction id before its own, into
    the `newer` one's slot, and flush it: LMDB then opens `older`'s snapshot."""
    fd = os.open(data_file, os.O_RDWR | os.O_CLOEXEC)
    try:
        page = os.pread(fd, META_BYTES, older.number * older.page_bytes)
        if len(page) != META_BYTES or os.pread(fd, PAGE.size, newer.number * newer.page_bytes)[:8] != (
                newer.number.to_bytes(8, "little")):
            raise JournalCorruptedError("the meta pages changed while the unfinished commit was being taken back",
                                        where=data_file)
        written = meta_with_txnid(page, newer.number, older.txnid - 1)
        if os.pwrite(fd, written, newer.number * newer.page_bytes) != META_BYTES:
            raise OSError(f"a short write of meta page {newer.number}")
        os.fsync(fd)
    finally:
        os.close(fd)
