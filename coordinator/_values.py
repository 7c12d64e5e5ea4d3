"""Frozen values that cross threads and the public surface. Money is `int` minor units."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

TransferKind = Literal["single", "pending", "post", "void"]
TransferStatus = Literal["pending", "posted", "voided", "expired"]

KINDS: tuple[TransferKind, ...] = ("single", "pending", "post", "void")
"""A transfer's kind by the number its record stores."""
SINGLE, PENDING, POST, VOID = range(4)


class Metadata(Mapping[str, "str | int"]):
    """A read-only, hashable mapping of `str` keys to `str` or `int` values: a transfer's or
    an account's metadata. Made from the mapping a caller gave (copied: changing that
    mapping afterwards changes nothing here). Equal to any mapping with the same items."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[str, str | int]) -> None:
        self._items: dict[str, str | int] = dict(items)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str | int:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Metadata):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"Metadata({self._items!r})"

    def as_dict(self) -> dict[str, str | int]:
        """A new plain dict of the items (for encoding)."""
        return dict(self._items)


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    currency: str
    overdraft_limit: int | None
    """How far below zero the available balance may go; None means no bound."""
    code: int = 0
    """A type the host defines, 0..65535."""
    metadata: Metadata | None = None


@dataclass(frozen=True, slots=True)
class Balance:
    posted: int
    """Sum of the account's entries."""
    pending: int
    """Held for outgoing transfers not yet posted: its pending transfers, and the protocol's
    reservations for transfers in flight."""
    available: int
    """posted - pending."""
    incoming: int = 0
    """Sum of the pending transfers toward the account, not yet posted."""


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
    """Journal position of the record that made this entry."""
    timestamp: int = 0
    """Its transfer's timestamp (0 for a transfer journaled before timestamps were)."""


@dataclass(frozen=True, slots=True)
class Transfer:
    id: str
    source: str
    destination: str
    amount: int
    """Moved (a single transfer, a post), placed on hold (a pending transfer) or released (a void)."""
    lsn: int
    """Journal position of its record."""
    timestamp: int = 0
    """Nanoseconds since the Unix epoch, assigned when the transfer was decided; strictly
    increasing across the ledger in LSN order (0 for a transfer journaled before timestamps were)."""
    code: int = 0
    """A type the host defines, 0..65535."""
    reference: str | None = None
    """The request that started it, as the host names it."""
    metadata: Metadata | None = None
    kind: TransferKind = "single"
    """single, pending (funds on hold), post (of a pending transfer) or void (of one)."""
    pending_id: str | None = None
    """For a post or a void: the pending transfer it resolves."""
    status: TransferStatus = "posted"
    """pending, posted, voided or expired: a pending transfer's until it is resolved; a single
    transfer and a post are posted, a void voided. `get_transfer` reads it as of now."""
    timeout_s: int | None = None
    """A pending transfer's timeout: it expires at `timestamp + timeout_s` seconds."""


@dataclass(frozen=True, slots=True)
class TransferRequest:
    # No docstring: the dataclass's, its signature, stays its `__doc__`.
    id: str
    source: str
    destination: str
    amount: int
    code: int = 0
    reference: str | None = None
    metadata: Mapping[str, str | int] | None = None
    pending: bool = False
    timeout_s: int | None = None

    def __init__(self, id: str, source: str, destination: str, amount: int, code: int = 0,
                 reference: str | None = None, metadata: Mapping[str, str | int] | None = None,
                 pending: bool = False, timeout_s: int | None = None):  # (-> None: below)
        # The generated `__init__` of a frozen dataclass, at a third of its cost (a host makes
        # one for every transfer of a batch): the fields are assigned plainly while it is its
        # unfrozen twin (`_Requesting`, the same slots), not each through `object.__setattr__`.
        # A subclass (its layout may differ) is set up as the generated one would.
        if type(self) is TransferRequest:
            _set(self, "__class__", _Requesting)
            _Requesting.__init__(self, id, source, destination, amount, code, reference, metadata, pending,  # type: ignore[arg-type]
                                 timeout_s)
            _set(self, "__class__", TransferRequest)
            return
        for name, value in zip(_REQUEST_FIELDS, (id, source, destination, amount, code, reference, metadata, pending,
                                                 timeout_s), strict=True):
            _set(self, name, value)


_REQUEST_FIELDS = ("id", "source", "destination", "amount", "code", "reference", "metadata", "pending", "timeout_s")
_set = object.__setattr__
TransferRequest.__init__.__annotations__["return"] = None  # as generated (not the string this module's annotations are)


@dataclass(frozen=True, slots=True)
class Resolution:
    """A request to post (`void` False) or void a pending transfer (`Ledger.post_pending`,
    `Ledger.void_pending`). `amount` None posts all of it."""

    id: str
    pending_id: str
    amount: int | None = None
    reference: str | None = None
    metadata: Mapping[str, str | int] | None = None
    void: bool = False


Request = TransferRequest | Resolution

class _Stamping:
    """A `Transfer` while it is being made: the same slots, assigned plainly (a frozen
    dataclass's `__init__` sets each through `object.__setattr__`, at twice the cost), then
    made a `Transfer` by assigning `__class__` (the layouts are the same)."""

    __slots__ = Transfer.__slots__  # type: ignore[attr-defined]

    def __init__(self, id: str, source: str, destination: str, amount: int, lsn: int, timestamp: int, code: int,
                 reference: str | None, metadata: Metadata | None, kind: TransferKind, pending_id: str | None,
                 status: TransferStatus, timeout_s: int | None) -> None:
        self.id = id
        self.source = source
        self.destination = destination
        self.amount = amount
        self.lsn = lsn
        self.timestamp = timestamp
        self.code = code
        self.reference = reference
        self.metadata = metadata
        self.kind = kind
        self.pending_id = pending_id
        self.status = status
        self.timeout_s = timeout_s


_new = object.__new__


def plain_transfer(id: str, source: str, destination: str, amount: int, lsn: int, timestamp: int) -> Transfer:
    """`stamped_transfer` of a single transfer with no code, reference or metadata, posted
    (the common case: fewer arguments to pass)."""
    made = _new(_Stamping)
    made.id = id
    made.source = source
    made.destination = destination
    made.amount = amount
    made.lsn = lsn
    made.timestamp = timestamp
    made.code = 0
    made.reference = None
    made.metadata = None
    made.kind = "single"
    made.pending_id = None
    made.status = "posted"
    made.timeout_s = None
    made.__class__ = Transfer  # type: ignore[assignment]
    return made  # type: ignore[return-value]


def stamped_transfer(id: str, source: str, destination: str, amount: int, lsn: int, timestamp: int, code: int,
                     reference: str | None, metadata: Metadata | None, kind: TransferKind, pending_id: str | None,
                     status: TransferStatus, timeout_s: int | None) -> Transfer:
    """`Transfer(...)` at half the cost, for the sequencer's stamp (once per transfer)."""
    made = _Stamping(id, source, destination, amount, lsn, timestamp, code, reference, metadata, kind, pending_id,
                     status, timeout_s)
    made.__class__ = Transfer  # type: ignore[assignment]
    return made  # type: ignore[return-value]


class _Opening:
    """An `Account` while it is being made (as `_Stamping` for a `Transfer`)."""

    __slots__ = Account.__slots__  # type: ignore[attr-defined]
    id: str
    currency: str
    overdraft_limit: int | None
    code: int
    metadata: Metadata | None


def opened_account(id: str, currency: str, overdraft_limit: int | None, code: int,
                   metadata: Metadata | None) -> Account:
    """`Account(...)` at half the cost, for opening a ledger (once per account)."""
    made = _new(_Opening)
    made.id = id
    made.currency = currency
    made.overdraft_limit = overdraft_limit
    made.code = code
    made.metadata = metadata
    made.__class__ = Account  # type: ignore[assignment]
    return made  # type: ignore[return-value]


class _Requesting:
    """A `TransferRequest` while it is being made (as `_Stamping` for a `Transfer`): by
    `transfer_request`, and by `TransferRequest.__init__` itself."""

    __slots__ = TransferRequest.__slots__  # type: ignore[attr-defined]

    def __init__(self, id: str, source: str, destination: str, amount: int, code: int, reference: str | None,
                 metadata: Mapping[str, str | int] | None, pending: bool, timeout_s: int | None) -> None:
        self.id = id
        self.source = source
        self.destination = destination
        self.amount = amount
        self.code = code
        self.reference = reference
        self.metadata = metadata
        self.pending = pending
        self.timeout_s = timeout_s


class _Resolving:
    """A `Resolution` while it is being made (as `_Requesting` for a `TransferRequest`)."""

    __slots__ = Resolution.__slots__  # type: ignore[attr-defined]


def resolution_request(id: str, pending_id: str, amount: int | None, reference: str | None,
                       metadata: Mapping[str, str | int] | None, void: bool) -> Resolution:
    """`Resolution(...)` at half the cost, for `Ledger.post_pending` and `void_pending` (once
    per call). The values are not checked here (`check_resolution` does that)."""
    made: Any = _new(_Resolving)
    made.id = id
    made.pending_id = pending_id
    made.amount = amount
    made.reference = reference
    made.metadata = metadata
    made.void = void
    made.__class__ = Resolution
    return made  # type: ignore[no-any-return]


def transfer_request(id: str, source: str, destination: str, amount: int, code: int = 0, reference: str | None = None,
                     metadata: Mapping[str, str | int] | None = None, pending: bool = False,
                     timeout_s: int | None = None) -> TransferRequest:
    """`TransferRequest(...)` at half the cost, for `Ledger.transfer` (once per call). The
    values are not checked here (`check_transfer` does that)."""
    made = _Requesting(id, source, destination, amount, code, reference, metadata, pending, timeout_s)
    made.__class__ = TransferRequest  # type: ignore[assignment]
    return made  # type: ignore[return-value]
