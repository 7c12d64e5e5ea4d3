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
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    NotALedger,
)


@contextmanager
def ledger_errors() -> Iterator[None]:
    """Re-raise any `JournalError` inside as the matching `LedgerError`, chained."""
    try:
        yield
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn) from error
    except JournalLockedError as error:
        raise LedgerLocked(str(error)) from error
    except JournalNotFoundError as error:
        raise NotALedger(str(error)) from error
    except JournalClosedError as error:
        raise LedgerClosed(str(error)) from error
    except JournalTimeoutError as error:
        raise LedgerTimeout(str(error)) from error
    except JournalError as error:
        raise LedgerUnavailable(str(error)) from error
