"""The ledger directory: what may become one, its lock, and how a journal in it is recognised.

A directory holds a journal if it has an anchor (`journal._anchor`) or a data file. Only a
directory with neither, and no sign that one was there (LMDB's `lock.mdb` outside the
staging directory, a seal that a close left: `journal._seal`), is ever initialised: a lost,
emptied or damaged data file in a ledger directory is damage to report, never a place to
start a new ledger.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat

from journal._anchor import ANCHOR_FILE, LOCK_FILE_REMEDY, AnchorState, not_regular, open_regular, read_anchor
from journal._errors import JournalCorruptedError, JournalError, JournalLockedError, JournalNotFoundError
from journal._names import COPY_STAGING_PREFIXES, DATA_FILE, LMDB_LOCK_FILE, STAGING_DIR
from journal._seal import SEAL_FILE

LOCK_FILE = "tally.lock"
_LOCK_FILE_WHAT, _LOCK_FILE_REMEDY = "the directory's lock file", f" (it holds nothing: {LOCK_FILE_REMEDY})"
_OURS = {LOCK_FILE, DATA_FILE, LMDB_LOCK_FILE, ANCHOR_FILE, SEAL_FILE, SEAL_FILE + ".new"}
"""A journal's files (`data.mdb` too: another opener may be making it right now)."""

_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EACCES, errno.EPERM,
                          errno.ELOOP, errno.ENAMETOOLONG})
"""Errors that say the path cannot hold a ledger (under a file, no permission, a dangling link...)."""


def directory_error(what: str, error: Exception) -> JournalError:
    """`JournalNotFoundError` if `error` is about the path itself; else a plain `JournalError`
    (out of space, too many open files, a read-only file system: the ledger may be fine)."""
    if isinstance(error, ValueError) or getattr(error, "errno", None) in _PATH_ERRNOS:
        return JournalNotFoundError(f"{what}: {error}")
    if getattr(error, "errno", None) == errno.EROFS:
        return JournalError(f"{what}: it is on a read-only file system (the read-only `tally` commands read it)")
    return JournalError(f"{what}: {error}")


class DirectoryLock:
    """The flocks that keep a ledger directory to one holder: on its lock file (`LOCK_FILE`), and
    on the directory itself. The lock file's is what releases before this one took; the
    directory's is what still holds when the lock file is removed under a live holder (a clean-up
    of stale lock files, say), which leaves that holder's flock on a file no path reaches and let
    the next opener make a new one and lock it: two writers, each believing itself alone. A
    directory cannot be removed while it holds a journal. They die with the process."""

    def __init__(self, fds: list[int]) -> None:
        self._fds = fds

    def release(self) -> None:
        """Let go of both (idempotent): the directory's first, the lock file's last, so an opener
        racing this close is refused at the lock file, told the truth (not that the lock file was
        removed, which is what the directory's flock alone refusing it says)."""
        fds, self._fds = self._fds, []
        for fd in reversed(fds):
            os.close(fd)


_NO_DIRECTORY_FLOCK = frozenset({errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP})
"""What `flock` on a directory says where the file system cannot lock one (NFS emulates flock
with byte-range locks, which an exclusive one needs a file open for writing for): there the
lock file's flock is all there is, as before."""


def lock_directory(path: str, readonly: bool = False) -> DirectoryLock | None:
    """Take an exclusive flock on the directory's lock file and on the directory
    (`DirectoryLock`); they die with the process. Raises `JournalLockedError` while another
    holder has either.

    `readonly` (a reader that must know no live process writes, as `tally recover --dry-run`):
    on a read-only file system, or one this user may not write, the lock file is opened for
    reading, which `flock` takes all the same; if there is none, the directory's flock alone
    says whether a live process holds it."""
    fds: list[int] = []
    try:
        fd = _open_lock_file(path, readonly)
        if fd is not None:
            fds.append(fd)
            _flock(fd, path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise directory_error(f"cannot lock {path!r} as a ledger directory", error) from error
        fds.append(fd)
        _flock(fd, path, directory=True)
    except BaseException:
        DirectoryLock(fds).release()
        raise
    return DirectoryLock(fds)


def _open_lock_file(path: str, readonly: bool) -> int | None:
    """The lock file, made if missing (None: a reader that may not make it, and there is none).
    Anything but a regular file there (a FIFO, whose open for reading would wait for a writer
    that never comes; a directory; a device) is `JournalCorruptedError` naming it."""
    lock_path = os.path.join(path, LOCK_FILE)
    what, remedy = _LOCK_FILE_WHAT, _LOCK_FILE_REMEDY
    try:
        return open_regular(lock_path, what, os.O_RDWR | os.O_CREAT, remedy=remedy)[0]
    except OSError as error:
        if not readonly or error.errno not in (errno.EROFS, errno.EACCES):
            raise directory_error(f"cannot lock {path!r} as a ledger directory", error) from error
    try:
        return open_regular(lock_path, what, remedy=remedy)[0]
    except FileNotFoundError:
        return None
    except OSError as again:
        raise directory_error(f"cannot lock {path!r} as a ledger directory", again) from again


def refuse_irregular_lock_file(path: str) -> None:
    """Raise the `JournalCorruptedError` `lock_directory` raises where directory `path`'s lock
    file is there and no regular file (a FIFO, a directory, a device), found by its path alone:
    it is never opened, so this never blocks nor acts on a device. For a reader that takes no
    lock (`tally verify`), which must not call whole a directory every open refuses. A lock file
    that is missing (an open makes it), or that cannot be looked at (the open says why): nothing."""
    lock_path = os.path.join(path, LOCK_FILE)
    try:
        found = os.stat(lock_path)
    except OSError:
        return
    if not stat.S_ISREG(found.st_mode):
        raise not_regular(lock_path, _LOCK_FILE_WHAT, _LOCK_FILE_REMEDY)


def _flock(fd: int, path: str, directory: bool = False) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise JournalLockedError(
                f"{path} is open in another live process (or by another open ledger in this process)"
                + (" (the directory itself is locked: its lock file was removed while it was open, or"
                   " something else holds a lock on the directory)" if directory else "")
            ) from error
        if directory and error.errno in _NO_DIRECTORY_FLOCK:
            return
        raise directory_error(f"cannot lock {path!r} as a ledger directory", error) from error  # (NFS: EBADF)


def refuse_foreign(path: str) -> None:
    """Raise `JournalNotFoundError` if directory `path` holds no journal yet but other files
    (hidden ones and a file system's `lost+found` aside): never scatter a journal into
    something else; nor into the target of a salvage or replay cut short (its unfinished
    copy, `COPY_STAGING_PREFIXES`, hidden as it is): a new, empty ledger there would be taken
    for the copy. One that cannot be listed passes: nothing to tell."""
    if os.path.exists(os.path.join(path, DATA_FILE)) or os.path.exists(os.path.join(path, ANCHOR_FILE)):
        return
    try:
        names = os.listdir(path)
    except OSError:
        return
    unfinished = sorted(name for name in names if name.startswith(COPY_STAGING_PREFIXES))
    if unfinished:
        raise JournalNotFoundError(
            f"{path} is not a Tally ledger: it holds {unfinished[0]!r}, the unfinished copy of a salvage or a replay "
            "that was cut short; delete it, then run that salvage or replay again")
    others = sorted(name for name in names if name not in _OURS and not name.startswith(".") and name != "lost+found")
    if others:
        raise JournalNotFoundError(
            f"{path} is not a Tally ledger (it holds other files, {others[0]!r} among them): "
            "give a ledger or a new or empty directory"
        )


def prepare_directory(path: str, create: bool) -> None:
    """Check `path` can be a journal directory, making it if missing (with `create`)."""
    try:
        path.encode()
    except UnicodeEncodeError:  # an undecodable byte in the name: LMDB takes paths in UTF-8
        raise JournalNotFoundError(f"{path!r} cannot be a ledger directory: its name is not UTF-8") from None
    if os.path.isdir(path):
        if create:
            refuse_foreign(path)
        return
    if os.path.exists(path) and not os.path.isdir(path):  # (looked at again: made a directory meanwhile, it is one)
        raise JournalNotFoundError(f"{path} is a file, not a ledger directory")
    if not create:
        raise JournalNotFoundError(f"{path} does not exist")
    try:
        os.makedirs(path, exist_ok=True)
    except (OSError, ValueError) as error:
        raise directory_error(f"{path!r} cannot be made a ledger directory", error) from error


def refuse_missing(path: str) -> None:
    """Raise the error for a directory that holds no journal (touching nothing)."""
    if not os.listdir(path):
        raise JournalNotFoundError(f"{path} is an empty directory, not a Tally ledger")
    raise JournalNotFoundError(f"{path} is not a Tally ledger (it holds no journal)")


def recognise(path: str) -> tuple[bool, AnchorState | None]:
    """Whether directory `path` holds a journal, and its anchor (None: no anchor, which a
    ledger made before anchors has until its first commit here). Raises
    `JournalCorruptedError` where a journal was but its data file is gone."""
    anchor = read_anchor(path)
    data_file = os.path.join(path, DATA_FILE)
    if os.path.exists(data_file):
        return True, anchor
    if anchor is not None:
        raise JournalCorruptedError(
            f"the data file is missing, yet the anchor says this directory holds a ledger whose journal "
            f"reached LSN {anchor.durable_lsn}", where=data_file)
    if os.path.exists(os.path.join(path, LMDB_LOCK_FILE)):
        raise JournalCorruptedError(
            "the data file is missing, yet LMDB's lock.mdb beside it says a journal was opened here "
            "(if this directory never held a ledger, delete lock.mdb)", where=data_file)
    for seal in (SEAL_FILE, SEAL_FILE + ".new"):
        if os.path.lexists(os.path.join(path, seal)):
            raise JournalCorruptedError(
                f"the data file is missing, yet the {seal} beside it says a ledger was closed here "
                f"(if this directory never held a ledger, delete {seal})", where=data_file)
    return False, None


def clear_staging(path: str) -> None:
    """Remove what a creation that died left (never a journal anyone wrote to: a data file
    leaves the staging directory only once whole). Call with the directory locked."""
    shutil.rmtree(os.path.join(path, STAGING_DIR), ignore_errors=True)
