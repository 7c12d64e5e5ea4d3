"""Tally: an embeddable, actor-based, journaled ledger engine.

    from engine import Ledger
    with Ledger.open("books") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer("t-1", source="bank", destination="alice", amount=10_000)
"""

from coordinator import (
    Account,
    AccountExists,
    AccountNotFound,
    Balance,
    BalanceOverflow,
    CurrencyMismatch,
    Entry,
    Event,
    ExceedsPendingAmount,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    JournalCorrupted,
    LINKED_LEGS_MAX,
    LedgerClosed,
    LedgerError,
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    LinkedTransferFailed,
    METADATA_KEYS_MAX,
    Metadata,
    NotALedger,
    PendingTransferAlreadyPosted,
    PendingTransferAlreadyVoided,
    PendingTransferExpired,
    PendingTransferNotFound,
    ReadOnlyLedger,
    SnapshotExpired,
    Transfer,
    TransferRequest,
)

from engine._async import AsyncLedger
from engine._history import Snapshot
from engine._head import Head
from engine._json import jsonable
from engine._ledger import Ledger
from engine._placement import CrossShardAborted, CrossShardRefused, ShardCountMismatch
from engine._sharded import ShardedLedger

__version__ = "0.1.0"

__all__ = [
    "Account",
    "AccountExists",
    "AccountNotFound",
    "AsyncLedger",
    "Balance",
    "BalanceOverflow",
    "CrossShardAborted",
    "CrossShardRefused",
    "CurrencyMismatch",
    "Entry",
    "Event",
    "Head",
    "ExceedsPendingAmount",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidRequest",
    "JournalCorrupted",
    "LINKED_LEGS_MAX",
    "Ledger",
    "LedgerClosed",
    "LedgerError",
    "LedgerLocked",
    "LedgerTimeout",
    "LedgerUnavailable",
    "LinkedTransferFailed",
    "METADATA_KEYS_MAX",
    "Metadata",
    "NotALedger",
    "PendingTransferAlreadyPosted",
    "PendingTransferAlreadyVoided",
    "PendingTransferExpired",
    "PendingTransferNotFound",
    "ReadOnlyLedger",
    "ShardCountMismatch",
    "ShardedLedger",
    "Snapshot",
    "SnapshotExpired",
    "Transfer",
    "TransferRequest",
    "__version__",
    "jsonable",
]
