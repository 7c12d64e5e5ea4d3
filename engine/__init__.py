"""Tally: an embeddable, actor-based, journaled ledger engine.

    from engine import Ledger
    with Ledger.open("books") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer("t-1", source="bank", destination="alice", amount=10_000)

Each public name is imported the first time it is asked for (`__getattr__`), so `import
engine` alone imports none of the engine's layers: the `tally` command (`engine._entry`) can
answer a Ctrl-C during the ~0.2 s of those imports.
"""

from __future__ import annotations

from engine import _fork  # noqa: F401  # (its fork hook, registered at once)

TYPE_CHECKING = False  # (`typing`'s own costs the command ~2 ms before it can answer an interrupt)
if TYPE_CHECKING:
    from typing import Any

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


if not TYPE_CHECKING:  # (type checkers see the imports above, and a name misspelt is an error there)

    def __getattr__(name: str) -> Any:
        """A public name, imported from its home module (`_HOMES`) the first time it is asked
        for (then kept here); `AttributeError` for any other name."""
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module 'engine' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(home), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        """The public names (`__all__`), asked for yet or not."""
        return list(__all__)
