"""Operating errors of the journal. Driver errors (`lmdb.Error`) become these, in one place."""

from __future__ import annotations


class JournalError(Exception):
    """Base class of every journal failure."""


class JournalCorruptedError(JournalError):
    """A record failed its checksum, its LSN is out of sequence, or the format is unknown.

    `lsn` names the first bad record (None when the damage is not in a record,
    for example an unknown format version). Nothing is ever repaired silently.
    """

    def __init__(self, reason: str, lsn: int | None = None) -> None:
        where = f"at LSN {lsn}" if lsn is not None else "in the journal metadata"
        super().__init__(f"journal corrupted {where}: {reason}")
        self.lsn = lsn
        self.reason = reason


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
