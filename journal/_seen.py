"""A read-only reader makes durable what it sees before it answers from it.

The writer flushes each commit once, after LMDB has written it (`journal._store`), and tells
no one of the commit before that flush returns. But LMDB names a commit in its reader table
(`lock.mdb`) as soon as it has written the commit's meta page, before the flush: a reader in
another process (`Ledger.open(path, readonly=True)`, `tally tail`, a read-only `tally
serve`) may begin a snapshot holding a commit that is still only in the page cache. A power
loss then could take that commit back (`journal._unfinished`) and the writer write other
records at its LSNs, while the reader had passed the first ones on.

So a reader, before it reads a snapshot other than the last it made sure of, makes sure
that snapshot is durable: if the ledger's anchor names that commit or a later one as
flushed (the writer writes it right after each flush returns: one small read), it is. A
reader often sees a commit during its flush, so it looks at the anchor again a few times
over a few milliseconds (`SEEN_ANCHOR_PAUSES_S`: a flush takes about one) before it flushes
the data file itself (`fdatasync` works on a descriptor opened for reading, and it writes
every page of the file the page cache holds, the meta page with them): a follower then adds
no flush of its own to the writer's. A commit whose writer was killed between its commit and
its flush is made durable so too, by the first reader that sees it. Only then is anything
read from the snapshot. A flush that fails fails this reader for good: the kernel reports a
failed write-back once, and a later flush would return as if it had not failed.

Threads: any. Two readers that race flush twice, which is harmless.
"""

from __future__ import annotations

import os
import time

from journal._anchor import TXNID_MASK, read_anchor
from journal._errors import JournalCorruptedError, JournalError, os_read_error
from journal._limits import SEEN_ANCHOR_PAUSES_S
from journal._meta import META_BYTES

_HALF = (TXNID_MASK + 1) // 2


class Seen:
    """What a read-only store has made sure is durable (`durable`)."""

    def __init__(self, directory: str, data_file: str, identity: tuple[int, int] | None,
                 page_bytes: int = 4096) -> None:
        self._directory = directory
        self._data_file = data_file
        try:
            self._fd = os.open(data_file, os.O_RDONLY | os.O_CLOEXEC)
            found = os.fstat(self._fd)
        except OSError as error:
            raise os_read_error(error, data_file) from error
        if identity not in (None, (found.st_dev, found.st_ino)):
            os.close(self._fd)
            raise JournalCorruptedError("the data file was replaced while it was being opened", where=data_file)
        self._page_bytes = page_bytes
        self._made_sure: tuple[int, bytes] = (0, b"")
        """The last snapshot this reader made sure is durable: its LMDB transaction id and its
        meta page as then. Not the id alone: a commit its writer took back after a failed
        flush (`journal._unfinished.flush_failed`) leaves its id to the next commit."""
        self._failed: JournalError | None = None
        """Why a flush of this reader's failed: every later snapshot is refused."""

    def durable(self, txnid: int, ledger_id: bytes | None) -> None:
        """Return once the commit of LMDB transaction `txnid` (a snapshot about to be read) is
        on disk: at once if it is known to be, else after the anchor or a flush says so.
        Raises `JournalError` if the data file cannot be flushed."""
        if self._failed is not None:
            raise self._failed
        try:
            made = (txnid, os.pread(self._fd, META_BYTES, (txnid & 1) * self._page_bytes))
        except OSError as error:
            raise os_read_error(error, self._data_file) from error
        if made == self._made_sure:
            return
        if not self._anchor_flushed(txnid, ledger_id, made[1]):
            for pause_s in SEEN_ANCHOR_PAUSES_S:
                time.sleep(pause_s)
                if self._anchor_flushed(txnid, ledger_id, made[1]):
                    break
            else:
                try:
                    os.fdatasync(self._fd)
                except OSError as error:
                    self._failed = JournalError(
                        f"cannot make the commit this reader sees (LMDB transaction {txnid}) durable before reading "
                        f"it: flushing {self._data_file} failed ({error}); the disk may be failing, and nothing more "
                        "is read here (open the ledger again once it is known to be sound)")
                    raise self._failed from error
        self._made_sure = made

    def _anchor_flushed(self, txnid: int, ledger_id: bytes | None, meta: bytes) -> bool:
        """Whether this ledger's anchor names the commit of `txnid`, or one after it, as
        flushed (it keeps a transaction id's low 32 bits: compared within half their range),
        and that commit's meta page is still `meta` (the one this reader saw), not another's
        that a take-back gave its id to meanwhile."""
        try:
            anchor = read_anchor(self._directory)
        except JournalError:
            return False  # (a torn or unreadable anchor is for the open to report; a flush settles this)
        if anchor is None or not anchor.txnid or anchor.ledger_id != ledger_id:
            return False
        if (anchor.txnid - txnid) & TXNID_MASK >= _HALF:
            return False
        try:
            return os.pread(self._fd, META_BYTES, (txnid & 1) * self._page_bytes) == meta
        except OSError:
            return False  # (a flush settles it)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
