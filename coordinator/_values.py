"""Frozen values that cross threads and the public surface. Money is `int` minor units."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    currency: str
    overdraft_limit: int | None
    """How far below zero the available balance may go; None means no bound."""


@dataclass(frozen=True, slots=True)
class Balance:
    posted: int
    """Sum of the account's entries."""
    pending: int
    """Sum of reservations currently held for outgoing transfers in flight."""
    available: int
    """posted - pending."""


@dataclass(frozen=True, slots=True)
class Entry:
    account: str
    seq: int
    """1, 2, 3... per account, without gaps, in journal order."""
    transfer_id: str
    amount: int
    """Signed: negative on the source, positive on the destination."""
    balance: int
    """The posted balance after this entry."""
    lsn: int
    """Journal position of the commit record that made this entry."""


@dataclass(frozen=True, slots=True)
class Transfer:
    id: str
    source: str
    destination: str
    amount: int
    lsn: int
    """Journal position of the commit record."""


@dataclass(frozen=True, slots=True)
class TransferRequest:
    id: str
    source: str
    destination: str
    amount: int
