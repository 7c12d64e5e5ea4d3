"""Postings: what a decision does to each account, as the sequencer hands it over.

Once a decision's record is queued (`coordinator._sequencer`, `coordinator._appends`), the
sequencer hands each account what the decision does to it, in LSN order and in the same hold
of its lock: a `Posting` (`coordinator._state`) per account per leg, the source's then the
destination's, which the account applies with the same pure `post` the projection did. These
functions make them from decided legs (`postings`) and from a pending transfer's released
hold (`releasing_hold`: a void, an expiry); `Deliver` is what takes them to the accounts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coordinator._participant import reservations
from coordinator._rules import Leg
from coordinator._state import Pending, Posting
from coordinator._values import PENDING, SINGLE

Deliver = Callable[[list[Posting]], None]
"""Hands postings to their accounts."""


def postings(legs: Sequence[Leg], lsn: int, reserved: bool) -> list[Posting]:
    """What decided legs do to each account, in order: per leg, the source's then the
    destination's. `reserved`: the sources reserved for them (the mailbox path), which these
    release (a chain's: each source's whole reservation with its first debit)."""
    made: list[Posting] = []
    releasing = reservations(legs) if reserved and len(legs) > 1 else None
    for kind, source, destination, amount, stamp, pending in legs:
        released = amount if reserved and (kind == SINGLE or kind == PENDING) else 0
        if releasing is not None and released:
            released = releasing.pop(source, 0)
        if kind == SINGLE:
            assert stamp is not None
            made += (Posting(source, stamp[0], -amount, stamp[1], lsn, released, 0, 0),
                     Posting(destination, stamp[2], amount, stamp[3], lsn, 0, 0, 0))
        elif kind == PENDING:
            made += (Posting(source, 0, 0, 0, lsn, released, amount, 0), Posting(destination, 0, 0, 0, lsn, 0, 0, amount))
        else:
            assert pending is not None
            if stamp is None:  # a void
                made += releasing_hold(pending, lsn)
            else:
                made += (Posting(source, stamp[0], -amount, stamp[1], lsn, 0, -pending.amount, 0),
                         Posting(destination, stamp[2], amount, stamp[3], lsn, 0, 0, -pending.amount))
    return made


def releasing_hold(pending: Pending, lsn: int) -> tuple[Posting, Posting]:
    """The postings that release a pending transfer's hold, on both of its accounts."""
    return (Posting(pending.source, 0, 0, 0, lsn, 0, -pending.amount, 0),
            Posting(pending.destination, 0, 0, 0, lsn, 0, 0, -pending.amount))
