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


_new = object.__new__
_set_id, _set_source, _set_destination, _set_amount, _set_lsn = (
    Transfer.__dict__[name].__set__ for name in ("id", "source", "destination", "amount", "lsn")
)


def stamped_transfer(id: str, source: str, destination: str, amount: int, lsn: int) -> Transfer:
    """`Transfer(id, source, destination, amount, lsn)` at half the cost, for the sequencer's
    stamp (once per commit): a frozen dataclass's `__init__` sets each field through
    `object.__setattr__`, this sets its slots directly."""
    transfer = _new(Transfer)
    _set_id(transfer, id)
    _set_source(transfer, source)
    _set_destination(transfer, destination)
    _set_amount(transfer, amount)
    _set_lsn(transfer, lsn)
    return transfer
