"""Operating errors of the journal, and the one place driver and OS errors on reads, and a failed
write's, become them (`os_read_error`, `lmdb_read_error`, `space_error`)."""

from __future__ import annotations

import errno
import os
import resource

import lmdb

from journal._names import DATA_FILE


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


class JournalAnchorMissingError(JournalCorruptedError):
    """The anchor file is gone from a ledger that had one (its data file holds a ledger id and
    records). The data may be whole, but nothing can tell whether it is the newest: `tally
    recover` audits it and writes a new anchor (an operator's decision, say after restoring
    `data.mdb` from a backup)."""


class JournalCutOffError(JournalCorruptedError):
    """The damage is the tear of a last commit the machine cut off in its flush, never
    acknowledged (`journal._unfinished`): a writable open takes back the snapshot before it, and
    a salvage, which never writes the ledger, refuses it rather than read around it."""


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


_CORRUPTION_ERRNOS = frozenset({5})  # EIO: the device could not read what it holds


def os_read_error(error: OSError, where: str) -> JournalError:
    """The journal error an OS error reading `where` becomes: an I/O error is the disk saying
    it lost data (`JournalCorruptedError`); any other is an operating error."""
    if error.errno in _CORRUPTION_ERRNOS:
        return JournalCorruptedError(f"the device reports an I/O error reading it: {error}", where=where)
    return JournalError(f"cannot read {where}: {error}")


_LMDB_CORRUPTION = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.VersionMismatchError,
                    lmdb.BadValsizeError, lmdb.BadDbiError, lmdb.IncompatibleError, lmdb.NotFoundError)
"""LMDB errors that mean the file is not what LMDB wrote (the others are operating errors)."""


def lmdb_read_error(error: lmdb.Error, where: str) -> JournalError:
    """The journal error an LMDB error reading `where` becomes (the caller chains it)."""
    if isinstance(error, _LMDB_CORRUPTION):
        return JournalCorruptedError(f"LMDB cannot read it: {error}", where=where)
    return JournalError(f"reading {where} failed: {error}")


def space_error(path: str, error: BaseException) -> JournalWriteError:
    """A write failure, saying so plainly when the disk is full (LMDB reports a short write
    as EIO, so the free space is looked at, not just the errno)."""
    try:
        stats = os.statvfs(path)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        free = None
    limit = _file_size_limit(path, error)
    if limit is not None:
        return JournalWriteError(f"the data file in {path} reached this process's file size limit of {limit:,} "
                                 f"bytes (`ulimit -f`, RLIMIT_FSIZE): raise it, then reopen the ledger ({error})")
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 1 << 20)
    if full:
        left = f"{free:,} bytes free" if free is not None else "no space"
        return JournalWriteError(f"no space left on the device holding {path} ({left}): free some space, "
                                 f"then reopen the ledger ({error})")
    return JournalWriteError(f"journal write failed: {error}")


_EIO_TEXT = os.strerror(errno.EIO)
"""How py-lmdb words LMDB's EIO (its `lmdb.Error` carries no errno): "Input/output error"."""


def _file_size_limit(path: str, error: BaseException) -> int | None:
    """The process's file size limit, if the write that failed with `error` may have met it: the
    error is EFBIG, or an I/O error (LMDB reports a short write as EIO) while the data file is
    within a MiB of the limit. None otherwise."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    if getattr(error, "errno", None) == errno.EFBIG:
        return limit
    if getattr(error, "errno", None) != errno.EIO and not (isinstance(error, lmdb.Error) and _EIO_TEXT in str(error)):
        return None  # (no space, a bug...: what it is, whatever the file's size)
    try:
        size = os.stat(os.path.join(path, DATA_FILE)).st_size
    except OSError:
        return None
    return limit if size + (1 << 20) > limit else None
