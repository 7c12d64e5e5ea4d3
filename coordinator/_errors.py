"""The outcomes a caller can be told about: `LedgerError` and its subclasses.

Each class has a stable `code` string. Business outcomes (the transfer was
refused) are journaled and replayed by code, so a code is never renamed.
Operating errors (locked, corrupt, closed, timed out) say what to do next.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error Tally raises on purpose."""

    code = "ledger_error"


class InvalidRequest(LedgerError):
    """The request is malformed. Nothing was written; the id is not consumed."""

    code = "invalid_request"


class AccountNotFound(LedgerError):
    """An account named by the request does not exist."""

    code = "account_not_found"


class AccountExists(LedgerError):
    """`create_account` named an existing account with different parameters."""

    code = "account_exists"


class CurrencyMismatch(LedgerError):
    """Source and destination hold different currencies."""

    code = "currency_mismatch"


class InsufficientFunds(LedgerError):
    """The source's available balance would fall below `-overdraft_limit`."""

    code = "insufficient_funds"


class BalanceOverflow(LedgerError):
    """A balance would leave the range ±(2**63 - 1)."""

    code = "balance_overflow"


class PendingTransferNotFound(LedgerError):
    """A post or void names no pending transfer (no transfer with that id, or one that is not pending)."""

    code = "pending_transfer_not_found"


class PendingTransferAlreadyPosted(LedgerError):
    """A post or void names a pending transfer that was posted already."""

    code = "pending_transfer_already_posted"


class PendingTransferAlreadyVoided(LedgerError):
    """A post or void names a pending transfer that was voided already."""

    code = "pending_transfer_already_voided"


class PendingTransferExpired(LedgerError):
    """A post or void names a pending transfer past its deadline (expired, or expiring)."""

    code = "pending_transfer_expired"


class ExceedsPendingAmount(LedgerError):
    """A post asks for more than the pending transfer holds."""

    code = "exceeds_pending_amount"


class LinkedTransferFailed(LedgerError):
    """A transfer of a linked chain was refused, so none of the chain moved. `index` is the
    first refused transfer's place in the chain, `cause` its own refusal (an
    `InsufficientFunds`, say). Journaled: every id of the chain is consumed, and a retry of
    the chain raises the same."""

    code = "linked_transfer_failed"

    def __init__(self, message: str, index: int, cause: LedgerError) -> None:
        super().__init__(message)
        self.index = index
        self.cause = cause

    def __reduce__(self) -> tuple[type, tuple[str, int, LedgerError]]:
        """Pickle with every field (another process gets the same error: `ShardedLedger`)."""
        return type(self), (str(self), self.index, self.cause)


class IdempotencyConflict(LedgerError):
    """A transfer id was reused for a request that differs in some field (source,
    destination, amount, code, reference, metadata, pending, timeout, chain...)."""

    code = "idempotency_conflict"


class LedgerLocked(LedgerError):
    """The ledger directory is open in another live process or another `Ledger` here."""

    code = "ledger_locked"


class JournalCorrupted(LedgerError):
    """Stored data fails a check: a record (checksum, sequence, content), an index entry,
    a page of the data file, the anchor, or the format version.

    `lsn` names the first bad record (None for damage outside the records); `where` says
    where the damage is, in words ("LSN 17", "the transfers index", "page 40 of the
    entries database of .../data.mdb", ".../tally.anchor"). Nothing is repaired silently:
    the ledger is not opened, or the call that met the damage raises and changes nothing.
    `tally verify` reports all of it; `tally recover --salvage` copies what precedes it.
    """

    code = "journal_corrupted"

    def __init__(self, message: str, lsn: int | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.lsn = lsn
        self.where = where if where is not None else (f"LSN {lsn}" if lsn is not None else None)

    def __reduce__(self) -> tuple[type, tuple[str, int | None, str | None]]:
        """Pickle with every field (another process gets the same error: `ShardedLedger`)."""
        return type(self), (str(self), self.lsn, self.where)


class NotALedger(LedgerError):
    """The path is not a ledger directory (a file, or empty where a ledger was expected)."""

    code = "not_a_ledger"


class LedgerClosed(LedgerError):
    """The ledger was closed; open it again to continue."""

    code = "ledger_closed"


class LedgerTimeout(LedgerError):
    """A bounded wait ran out. The outcome is unknown: retry with the same id to learn it."""

    code = "timeout"


class ReadOnlyLedger(LedgerError):
    """A write to a ledger opened with `Ledger.open(path, readonly=True)`: refused before
    anything was done. Write through the process that has the ledger open for writing."""

    code = "read_only_ledger"


class LedgerUnavailable(LedgerError):
    """The journal could not be written (disk full, I/O error). Reopen the ledger to recover."""

    code = "ledger_unavailable"


class SnapshotExpired(LedgerError):
    """A snapshot was used after its `max_age_s` (or after its ledger closed): take a new one."""

    code = "snapshot_expired"


REJECTIONS: dict[str, type[LedgerError]] = {
    cls.code: cls for cls in (AccountNotFound, CurrencyMismatch, InsufficientFunds, BalanceOverflow,
                              PendingTransferNotFound, PendingTransferAlreadyPosted, PendingTransferAlreadyVoided,
                              PendingTransferExpired, ExceedsPendingAmount)
}
"""Refusals that are journaled and consume the transfer id, by their stable code."""
