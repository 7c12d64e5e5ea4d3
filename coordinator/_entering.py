"""Entering: what decided legs do to the books, written into them.

The rules (`coordinator._rules`) decide what requests do (`Leg`s) without changing anything;
`enter` writes decided legs into a book (`Books`: the sequencer's projection, or replay's
books), `expire` the expiry of pending transfers (`open_pending` and `close_pending` one at a time), and `holds_after` and
`holds_expired` say what a record leaves each account's pending amounts at (its hold rows,
`coordinator._records.holds_key`) without writing them. A decision of a chain sees its own
legs' effects through an `Overlay` over the books (`enter_leg` of each). Pure functions, as
the rules are: nothing here reads a clock, a lock or a file.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Protocol

from coordinator._state import AccountState, Pending
from coordinator._values import PENDING, SINGLE, Request, TransferRequest

if TYPE_CHECKING:
    from coordinator._rules import Leg

NS_PER_S = 1_000_000_000


class Overlay(Mapping[str, object]):
    """`top` over `base`: what a chain sees of the books, its own legs' effects first (replay
    checks a record's stamps over the books the same way)."""

    __slots__ = ("top", "base")

    def __init__(self, top: Mapping[str, object], base: Mapping[str, object]) -> None:
        self.top, self.base = top, base

    def __getitem__(self, key: str) -> object:
        top = self.top
        return top[key] if key in top else self.base[key]

    def get(self, key: str, default: object = None) -> object:
        top = self.top
        return top[key] if key in top else self.base.get(key, default)

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError  # never listed: decisions look accounts up

    def __len__(self) -> int:
        raise NotImplementedError


def enter_leg(leg: Leg, states: MutableMapping[str, AccountState], held: MutableMapping[str, int],
               incoming: MutableMapping[str, int], seen_states: Mapping[str, AccountState],
               seen_held: Mapping[str, int], seen_incoming: Mapping[str, int], lsn: int = 0) -> None:
    """Write one leg's effects into `states`, `held` and `incoming`, reading what they were
    from the `seen_` mappings (the same ones, or an overlay over them)."""
    kind, source, destination, amount, stamp, pending = leg
    if stamp is not None:
        states[source] = (stamp[0], stamp[1], lsn)
        states[destination] = (stamp[2], stamp[3], lsn)
    if kind == PENDING:
        held[source] = seen_held.get(source, 0) + amount
        incoming[destination] = seen_incoming.get(destination, 0) + amount
    elif pending is not None:  # a post or a void releases the whole hold
        held[source] = seen_held.get(source, 0) - pending.amount
        incoming[destination] = seen_incoming.get(destination, 0) - pending.amount


def holds_after(legs: Sequence[Leg], held: Mapping[str, int],
                incoming: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """What the pending transfers hold on and bring to each account whose pending amounts the
    legs change, (held, incoming) after them, from `held` and `incoming` before them: the
    accounts of every pending, post and void leg, in the order met (a record's hold rows,
    `coordinator._records.holds_key`). Empty for legs of single transfers only."""
    if len(legs) == 1:  # one leg (once per pending transfer, post or void): inline
        kind, source, destination, amount, _, pending = legs[0]
        if kind == SINGLE:
            return {}
        if source != destination:
            change = amount if kind == PENDING else -pending.amount  # type: ignore[union-attr]
            return {source: (held.get(source, 0) + change, incoming.get(source, 0)),
                    destination: (held.get(destination, 0), incoming.get(destination, 0) + change)}
    top_held: dict[str, int] = {}
    top_incoming: dict[str, int] = {}
    touched: dict[str, None] = {}
    seen_held, seen_incoming = Overlay(top_held, held), Overlay(top_incoming, incoming)
    for leg in legs:
        if leg[0] != SINGLE:
            enter_leg(leg, {}, top_held, top_incoming, {}, seen_held, seen_incoming)  # type: ignore[arg-type]
            touched[leg[1]] = touched[leg[2]] = None
    return {account: (seen_held.get(account, 0), seen_incoming.get(account, 0))  # type: ignore[misc]
            for account in touched}


def holds_expired(expired: Sequence[Pending], held: Mapping[str, int],
                  incoming: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """`holds_after` of an expiry of the pending transfers `expired` (each open)."""
    after: dict[str, list[int]] = {}
    for pending in expired:
        source = after.setdefault(pending.source, [held.get(pending.source, 0), incoming.get(pending.source, 0)])
        source[0] -= pending.amount
        target = after.setdefault(pending.destination,
                                  [held.get(pending.destination, 0), incoming.get(pending.destination, 0)])
        target[1] -= pending.amount
    return {account: (values[0], values[1]) for account, values in after.items()}


class Books(Protocol):
    """A book `enter` writes into."""

    @property
    def states(self) -> MutableMapping[str, AccountState]: ...

    @property
    def held(self) -> MutableMapping[str, int]: ...

    @property
    def incoming(self) -> MutableMapping[str, int]: ...

    @property
    def pending(self) -> MutableMapping[str, Pending]: ...

    @property
    def opened_since(self) -> list[str]: ...

    @property
    def closed_since(self) -> list[Pending]: ...


def enter(book: Books, requests: Sequence[Request], legs: Sequence[Leg], lsn: int, timestamp: int) -> None:
    """Write decided legs (`decide` of `requests` at `timestamp`) journaled at `lsn` into
    `book`: entries move the states, pending transfers open, posts and voids close theirs.
    A hold that falls to 0 leaves its mapping (so equal books are equal mappings)."""
    states = book.states
    for index, leg in enumerate(legs):  # `enter_leg` of each, inline (once per transfer), and more
        kind, source, destination, amount, stamp, resolved = leg
        if stamp is not None:
            states[source] = (stamp[0], stamp[1], lsn)
            states[destination] = (stamp[2], stamp[3], lsn)
        if kind == PENDING:
            request = requests[index]
            assert type(request) is TransferRequest
            open_pending(book, request, lsn, timestamp + index)
        elif resolved is not None:  # a post or a void releases the whole hold
            close_pending(book, resolved.id)


def deadline_of(timestamp: int, timeout_s: int | None) -> int:
    """The deadline of a pending transfer stamped at `timestamp` with `timeout_s`: 0, never."""
    return 0 if timeout_s is None else timestamp + timeout_s * NS_PER_S


new_pending = tuple.__new__
"""`Pending(...)` without the generated `__new__` of a NamedTuple (a Python frame)."""


def open_pending(book: Books, request: TransferRequest, lsn: int, timestamp: int) -> None:
    """Open the pending transfer `request`, decided at `timestamp` and journaled at `lsn`, in
    `book`: its amount held on its source and on its way to its destination, and it open, with
    its deadline (noted for the next checkpoint: `opened_since`)."""
    source, destination, amount = request.source, request.destination, request.amount
    held, incoming = book.held, book.incoming
    held[source] = held.get(source, 0) + amount
    incoming[destination] = incoming.get(destination, 0) + amount
    book.pending[request.id] = new_pending(Pending, (request.id, source, destination, amount,
                                                     deadline_of(timestamp, request.timeout_s), lsn, request.code))
    book.opened_since.append(request.id)


def close_pending(book: Books, pending_id: str) -> Pending:
    """Close the open pending transfer `pending_id` (posted, voided or expired) in `book`: what
    it held comes off its source's holds and its destination's funds on their way (a hold that
    falls to 0 leaves its mapping, so equal books are equal mappings), and note it closed for
    the next checkpoint (`closed_since`). Returns it."""
    closed = book.pending.pop(pending_id)
    book.closed_since.append(closed)
    held, incoming = book.held, book.incoming
    source, destination, amount = closed.source, closed.destination, closed.amount
    left = held[source] - amount
    if left:
        held[source] = left
    else:
        del held[source]
    left = incoming[destination] - amount
    if left:
        incoming[destination] = left
    else:
        del incoming[destination]
    return closed


def expire(book: Books, pending_ids: Sequence[str]) -> None:
    """Release the holds of pending transfers that expired (each must be open)."""
    for pending_id in pending_ids:
        close_pending(book, pending_id)
