"""A ledger's calls, and the ledger in its process.

Every public method of a `Ledger` runs inside a call (`LedgerCall`; `LedgerRead` for a read that
may be long): refused once the ledger is closed, counted until it returns so `close` can wait
for it, a `JournalError` from inside turned into its `LedgerError`. And a process knows the
ledgers it has open (`OPEN_LEDGERS`): a second open of one of them here is refused before it
touches a file (`refuse_open_here`), and a child made by `fork()` closes its copies at once
(`_after_fork`). `engine._ledger` (`Ledger`),
its bases (`engine._ledger_reads`, `engine._ledger_close`) and `engine._readonly` (`ReadingLedger`)
use these.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from coordinator import (
    LedgerClosed,
    LedgerLocked,
    ledger_error,
)
from journal import JournalError, files_of

if TYPE_CHECKING:
    from engine._ledger_close import Closing
    from engine._ledger_reads import LedgerReads


OPEN_LEDGERS: weakref.WeakSet[Closing] = weakref.WeakSet()
"""Every ledger open in this process, for `_after_fork`."""


def refuse_open_here(path: str, readonly: bool) -> None:
    """`LedgerLocked` if the ledger at `path` is open in this process and one of the two opens
    is read-only (two writers meet the directory lock), before any file of it is touched: a
    second open of one LMDB environment in a process, even one refused, closes a descriptor
    of `lock.mdb`, which drops the locks that tell other processes this one reads it (and a
    writer opening next would then reset the table of readers under it)."""
    where = os.path.realpath(path)
    for ledger in list(OPEN_LEDGERS):
        if (readonly or ledger._journal.readonly) and ledger._journal.directory == where:  # (as resolved then)
            raise LedgerLocked(f"the ledger at {path} is open in this process already: use that Ledger")
    if _INHERITED and not _INHERITED.isdisjoint(files_of(where)):
        raise LedgerLocked(f"the ledger at {path} was open in the process this one was forked from, and LMDB keeps "
                           "its files held here by the copy of that environment this process inherited: open it in a "
                           "process started with multiprocessing's 'spawn' or 'forkserver' method")


_INHERITED: set[tuple[int, int]] = set()
"""The files (device, inode) of the ledgers open in the process this one was forked from
(`_after_fork`): py-lmdb refuses them here, as open in this process, by the same keys. A ledger
made anew at one of their paths is other files, and opens."""


def _after_fork() -> None:
    """In a child made by `fork()`: every ledger the parent had open is closed here, at once
    and without touching its threads (which the child does not have) or LMDB (which must not
    be used across a fork); its calls raise `LedgerClosed` saying why, instead of waiting out
    their timeout. The child lets go of its copy of the directory lock, so the lock is the
    parent's alone again."""
    for ledger in list(OPEN_LEDGERS):
        ledger._forked_from = os.getppid()
        ledger._closed = True
        ledger._journal.release_after_fork()
        _INHERITED.update(ledger._journal.files)
    OPEN_LEDGERS.clear()


os.register_at_fork(after_in_child=_after_fork)


class LedgerCall:
    """`Ledger._call`: a context manager that is a plain object (no generator per call)."""

    __slots__ = ("_ledger",)

    def __init__(self, ledger: LedgerReads) -> None:
        self._ledger = ledger

    def __enter__(self) -> None:
        ledger = self._ledger
        ledger._calls.append(None)  # before the look at `_closed`: `close` waits for us or we see it
        if ledger._closed:
            self._leave()
            if ledger._forked_from is not None:
                raise LedgerClosed(f"the ledger at {ledger.path} belongs to process {ledger._forked_from}, which "
                                   "opened it: a process made by fork() must open the ledger itself (once the "
                                   "other has closed it)")
            raise LedgerClosed(f"the ledger at {ledger.path} is closed")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: Any) -> None:
        self._leave()
        if isinstance(error, JournalError):
            raise ledger_error(error) from error

    def _leave(self) -> None:
        ledger = self._ledger
        ledger._calls.pop()
        if ledger._closed:
            with ledger._state:
                ledger._state.notify_all()


class LedgerRead(LedgerCall):
    """`Ledger._read`: `LedgerCall`, with the journal's reads in chunks on this thread until left."""

    __slots__ = ("_chunks",)

    def __enter__(self) -> None:
        super().__enter__()
        self._chunks = self._ledger._journal.reading_in_chunks()
        self._chunks.__enter__()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: Any) -> None:
        self._chunks.__exit__(None, None, None)  # (it only restores this thread's state)
        super().__exit__(kind, error, _tb)


def lock_free_within(lock: threading.Lock, timeout_s: float) -> bool:
    """Wait, at most `timeout_s`, until no one holds `lock` (taken and given back at once)."""
    if not lock.acquire(timeout=timeout_s):
        return False
    lock.release()
    return True
