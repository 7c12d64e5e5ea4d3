"""LMDB's files beside the data: its lock file made ahead, the files' identities, dead readers.

`lock.mdb` holds LMDB's table of readers; LMDB makes it sparse and writes through a map of it,
so it is made here with its blocks allocated first (`allocate_lock_file`), a full disk then
being ENOSPC rather than SIGBUS. A file is known by its (device, inode) (`file_identity`):
py-lmdb refuses to open the same files twice in a process (`files_of`), and the store checks
its data file is still the one it opened (`journal._store`, `Store.in_place`). A reader that
died leaves its slot in the table, pinning its snapshot; `clear_dead_readers` clears those of
processes that are gone, when the store opens and, now and then, after the writer's commits
(`journal._commits`). The environment itself, and the options LMDB opens it with, are
`journal._store`'s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys

import lmdb

from journal._anchor import LOCK_FILE_REMEDY, open_regular
from journal._errors import JournalError
from journal._limits import READERS_MAX
from journal._names import DATA_FILE, LMDB_LOCK_FILE

logger = logging.getLogger("tally.journal")

LOCK_FILE_BYTES = (READERS_MAX - 1) * 64 + 192
"""What LMDB makes `lock.mdb` for `READERS_MAX` readers (64 bytes a reader slot, 192 of
header on 64-bit Linux). LMDB makes it sparse and then writes through a map of it, which on
a full disk is a SIGBUS; allocating it first turns that into ENOSPC."""


def allocate_lock_file(path: str, readonly: bool = False) -> tuple[int, int] | None:
    """Make `lock.mdb` with its blocks allocated, if missing or short (`LOCK_FILE_BYTES`); its
    (device, inode), None where a reader goes without it. Raises `OSError` (ENOSPC on a full
    disk); a reader that made the file then takes it away again, so a refused read leaves the
    directory as it was. (Reading without LMDB's reader table instead would let a writer that
    starts meanwhile reuse the pages of the reader's snapshot.) Anything but a regular file
    there is `JournalCorruptedError` naming it, found before it is opened (`open_regular`)."""
    lock_path = os.path.join(path, LMDB_LOCK_FILE)
    made = readonly and not os.path.exists(lock_path)
    try:
        fd, found = open_regular(lock_path, "LMDB's lock file", os.O_RDWR | os.O_CREAT, remedy=(
            f" (it holds only LMDB's table of readers: {LOCK_FILE_REMEDY})"))
    except OSError as error:
        if readonly and (error.errno == errno.EROFS or error.errno == errno.EACCES and made):
            return None  # LMDB reads a read-only file system without its reader table
        raise  # (one there that this reader may not write: LMDB would refuse it too, without naming it)
    try:
        if found.st_size < LOCK_FILE_BYTES:
            os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
    except OSError:
        if made:
            with contextlib.suppress(OSError):  # (another reader may have taken it away first)
                os.unlink(lock_path)
        raise
    finally:
        os.close(fd)
    return (found.st_dev, found.st_ino)


LOCK_MAGIC = 0xBEEFC0DE
LOCK_TXNID_AT = 6
"""Where LMDB's lock file holds the newest transaction id (`mti_txnid`), in 8-byte words: after
its magic and format (one word) and the readers' mutex (five: a `pthread_mutex_t` of x86-64
glibc; elsewhere it differs, and the check below then finds another value there and writes
nothing). `rewind_reader_table` checks it holds what it must before it writes it."""


def rewind_reader_table(lock_fd: int, txnid: int) -> None:
    """Make LMDB's reader table (`lock.mdb`, open as `lock_fd`: the writer's own descriptor,
    never closed while its environment is open, since closing any descriptor of the file
    would drop LMDB's locks on it) name transaction `txnid - 1` as the newest, where it names
    `txnid`, which the writer has just taken back (`journal._unfinished.take_back_unflushed`).
    Every read transaction, in any process, takes its id from the table and reads the meta
    page of that id; LMDB rebuilds the table from the data file only when it opens with no
    other process having it open, so until then every open would look for a meta page of
    `txnid` that the data file no longer holds. Only the writer calls it (no one else writes
    the id: no one else commits). One aligned 8-byte write, which every process's map of the
    file shows (LMDB's readers read the id twice to see it whole); not through a map of its own:
    Python's `mmap` keeps a duplicate of the descriptor and closes it, dropping the locks. Raises `OSError`,
    or `JournalError` (writing nothing) if the table does not hold LMDB's magic and `txnid`
    where expected."""
    at = LOCK_TXNID_AT * 8
    head = os.pread(lock_fd, at + 8, 0)
    if (len(head) != at + 8 or int.from_bytes(head[:4], sys.byteorder) != LOCK_MAGIC
            or int.from_bytes(head[at:], sys.byteorder) != txnid):
        raise JournalError(f"LMDB's lock file does not hold its table naming transaction {txnid} where expected")
    if os.pwrite(lock_fd, (txnid - 1).to_bytes(8, sys.byteorder), at) != 8:
        raise OSError(f"a short write to LMDB's lock file, at byte {at}")


def files_of(directory: str, data_file: tuple[int, int] | None = None,
             lock_file: tuple[int, int] | None = None) -> frozenset[tuple[int, int]]:
    """(device, inode) of `directory`'s data file and LMDB lock file, those there (given: as found
    already): what py-lmdb refuses to open twice in a process, or in a child `fork()` made of it."""
    names = ((DATA_FILE, data_file), (LMDB_LOCK_FILE, lock_file))
    found = (known or file_identity(os.path.join(directory, name)) for name, known in names)
    return frozenset(identity for identity in found if identity not in (None, (0, 0)))


def file_identity(data_file: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `data_file`; (0, 0) if there is none; None if it cannot
    be looked at (an error other than a missing file or directory)."""
    try:
        found = os.stat(data_file)
    except (FileNotFoundError, NotADirectoryError):
        return (0, 0)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


def clear_dead_readers(env: lmdb.Environment) -> None:
    """Clear the reader slots of processes that died reading (a `tally verify` killed, a
    read-only ledger's process SIGKILLed), if the table holds any: such a slot pins the snapshot
    it read, so no page written since is reused and the data file grows without bound while
    any process keeps the ledger open (LMDB clears them itself only when the table is full).

    Only when a slot's process is gone: LMDB's check also clears the slots of a live process
    that lost its lock on `lock.mdb` (it closed a descriptor of that file: copying the ledger's
    directory, say), whose snapshot would then be written over under it. A failure is logged,
    never raised: this is housekeeping, not a write."""
    try:
        rows = map(str.split, env.readers().splitlines()[1:])  # "pid thread txnid", after a header
        if any(not _alive(int(row[0])) for row in rows if row and row[0].isdigit()):
            env.reader_check()
    except (lmdb.Error, OSError, ValueError) as error:
        logger.warning("clearing the reader slots of processes that are gone failed: %r", error)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (one killed and not yet reaped has lost
    its LMDB lock as a dead one has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:  # no /proc (not Linux), or gone meanwhile: as `kill` said
        return True
