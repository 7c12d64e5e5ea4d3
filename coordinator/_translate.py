"""Journal errors become ledger errors here, in one place (house style 7)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from journal import (
    JournalClosedError,
    JournalCorruptedError,
    JournalError,
    JournalLockedError,
    JournalNotFoundError,
    JournalTimeoutError,
)

from coordinator._errors import (
    JournalCorrupted,
    LedgerClosed,
    LedgerError,
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    NotALedger,
)


def ledger_error(error: JournalError) -> LedgerError:
    """The `LedgerError` a `JournalError` becomes (the caller chains it)."""
    if isinstance(error, JournalCorruptedError):
        return JournalCorrupted(str(error), error.lsn, error.where)
    if isinstance(error, JournalLockedError):
        return LedgerLocked(str(error))
    if isinstance(error, JournalNotFoundError):
        return NotALedger(str(error))
    if isinstance(error, JournalClosedError):
        return LedgerClosed(str(error))
    if isinstance(error, JournalTimeoutError):
        return LedgerTimeout(str(error))
    return LedgerUnavailable(str(error))


@contextmanager
def ledger_errors() -> Iterator[None]:
    """Re-raise any `JournalError` inside as the matching `LedgerError`, chained."""
    try:
        yield
    except JournalError as error:
        raise ledger_error(error) from error
