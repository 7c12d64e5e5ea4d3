"""Tally: an embeddable, actor-based, journaled ledger engine.

    from engine import Ledger
    with Ledger.open("books") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer("t-1", source="bank", destination="alice", amount=10_000)

The public names are imported when first asked for (`__getattr__`): `import engine` alone
imports none of the engine, so the `tally` command (`engine._entry`) is running, and ends
quietly on an interrupt, before the ~0.2 s of the engine's own imports begin.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator import (
        Account as Account,
        AccountExists as AccountExists,
        AccountNotFound as AccountNotFound,
        Balance as Balance,
        BalanceOverflow as BalanceOverflow,
        CurrencyMismatch as CurrencyMismatch,
        Entry as Entry,
        Event as Event,
        ExceedsPendingAmount as ExceedsPendingAmount,
        IdempotencyConflict as IdempotencyConflict,
        InsufficientFunds as InsufficientFunds,
        InvalidRequest as InvalidRequest,
        JournalCorrupted as JournalCorrupted,
        LINKED_LEGS_MAX as LINKED_LEGS_MAX,
        LedgerClosed as LedgerClosed,
        LedgerError as LedgerError,
        LedgerLocked as LedgerLocked,
        LedgerTimeout as LedgerTimeout,
        LedgerUnavailable as LedgerUnavailable,
        LinkedTransferFailed as LinkedTransferFailed,
        METADATA_KEYS_MAX as METADATA_KEYS_MAX,
        Metadata as Metadata,
        NotALedger as NotALedger,
        PendingTransferAlreadyPosted as PendingTransferAlreadyPosted,
        PendingTransferAlreadyVoided as PendingTransferAlreadyVoided,
        PendingTransferExpired as PendingTransferExpired,
        PendingTransferNotFound as PendingTransferNotFound,
        ReadOnlyLedger as ReadOnlyLedger,
        SnapshotExpired as SnapshotExpired,
        Transfer as Transfer,
        TransferRequest as TransferRequest,
    )

    from engine._async import AsyncLedger as AsyncLedger
    from engine._history import Snapshot as Snapshot
    from engine._head import Head as Head
    from engine._json import jsonable as jsonable
    from engine._ledger import Ledger as Ledger
    from engine._placement import (
        CrossShardAborted as CrossShardAborted,
        CrossShardRefused as CrossShardRefused,
        ShardCountMismatch as ShardCountMismatch,
    )
    from engine._sharded import ShardedLedger as ShardedLedger

__version__ = "0.1.0"

_HOMES = {
    name: home
    for home, names in (
        ("coordinator", (
            "Account", "AccountExists", "AccountNotFound", "Balance", "BalanceOverflow", "CurrencyMismatch", "Entry",
            "Event", "ExceedsPendingAmount", "IdempotencyConflict", "InsufficientFunds", "InvalidRequest",
            "JournalCorrupted", "LINKED_LEGS_MAX", "LedgerClosed", "LedgerError", "LedgerLocked", "LedgerTimeout",
            "LedgerUnavailable", "LinkedTransferFailed", "METADATA_KEYS_MAX", "Metadata", "NotALedger",
            "PendingTransferAlreadyPosted", "PendingTransferAlreadyVoided", "PendingTransferExpired",
            "PendingTransferNotFound", "ReadOnlyLedger", "SnapshotExpired", "Transfer", "TransferRequest")),
        ("engine._async", ("AsyncLedger",)),
        ("engine._history", ("Snapshot",)),
        ("engine._head", ("Head",)),
        ("engine._json", ("jsonable",)),
        ("engine._ledger", ("Ledger",)),
        ("engine._placement", ("CrossShardAborted", "CrossShardRefused", "ShardCountMismatch")),
        ("engine._sharded", ("ShardedLedger",)),
    )
    for name in names
}
"""Where each public name lives (the imports above, for type checkers)."""

__all__ = sorted([*_HOMES, "__version__"])


def __getattr__(name: str) -> Any:
    """A public name, imported from its home module (`_HOMES`) the first time it is asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
