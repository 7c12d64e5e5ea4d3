"""Operating errors of the journal. Driver errors (`lmdb.Error`) become these, in one place."""

from __future__ import annotations


class JournalError(Exception):
    """Base class of every journal failure."""


class JournalCorruptedError(JournalError):
    """Stored data fails a check: a record's checksum or sequence, an index entry's checksum,
    a page of the data file, the anchor, or the format.

    `lsn` names the first bad record (None when the damage is not in a record); `where`
    says where the damage is in words (an LSN, an index, a page, a file). Nothing is
    ever repaired silently.
    """

    def __init__(self, reason: str, lsn: int | None = None, where: str | None = None) -> None:
        if where is None:
            where = f"LSN {lsn}" if lsn is not None else "the journal metadata"
        super().__init__(f"journal corrupted at {where}: {reason}" if lsn is not None and where == f"LSN {lsn}"
                         else f"journal corrupted in {where}: {reason}")
        self.lsn = lsn
        self.where = where
        self.reason = reason


class JournalFormatError(JournalCorruptedError):
    """The format version is missing, unknown, or newer than this code reads: the data may be
    whole, but this code cannot tell."""


class JournalLockedError(JournalError):
    """Another live process, or another open journal in this one, holds the directory."""


class JournalNotFoundError(JournalError):
    """The path holds no journal and creation was not asked for, or it is not a directory."""


class JournalClosedError(JournalError):
    """The journal was closed; no call may follow."""


class JournalWriteError(JournalError):
    """A write failed (disk full, I/O error). The journal refuses further appends.

    What was acknowledged before stays durable; reopen the directory to recover.
    """


class JournalTimeoutError(JournalError):
    """A bounded wait on the journal ran out (durability or room in the queue)."""
