"""Postings: what a decision does to each account, as the sequencer hands it over.

Once a decision's record is queued (`coordinator._sequencer`, `coordinator._appends`), the
sequencer hands each account what the decision does to it, in LSN order and in the same hold
of its lock: a `Posting` (`coordinator._state`) per account per leg, the source's then the
destination's, which the account applies with the same pure `post` the projection did. These
functions make them from decided legs (`postings`) and from a pending transfer's released
hold (`releasing_hold`: a void, an expiry); `Deliver` is what takes them to the accounts. What a
source reserves in its mailbox for a ticket is read off the same postings (`reservations`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coordinator._rules import Leg
from coordinator._state import Pending, Posting
from coordinator._values import PENDING, SINGLE

Deliver = Callable[[list[Posting]], None]
"""Hands postings to their accounts."""


def postings(legs: Sequence[Leg], lsn: int, reserved: bool) -> list[Posting]:
    """What decided legs do to each account, in order: per leg, the source's then the
    destination's. `reserved`: the sources reserved for them (the mailbox path), which these
    release (a chain's: as `_as_needed` says)."""
    made: list[Posting] = []
    for kind, source, destination, amount, stamp, pending in legs:
        released = amount if reserved and (kind == SINGLE or kind == PENDING) else 0
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
    return _as_needed(made) if reserved and len(legs) > 1 else made


def _as_needed(made: list[Posting]) -> list[Posting]:
    """A chain's postings (the mailbox path), each account's reservation (`reservations`: the
    most the chain takes of its available balance) released as the postings reach it, so
    that after each one what it reserves is the most the chain's postings still to come take
    below where it stands: the available balance a debit step sees between two of them is
    never more than the chain leaves. (Released whole with the first debit, a step landing
    after a credit the chain spends again saw that credit as its own.) A posting may reserve
    again (a negative release): a credit that a debit after it spends."""
    sums = _running(made)
    lowest: dict[str, int] = {}
    needs = [0] * len(made)
    for i in range(len(made) - 1, -1, -1):  # the lowest balance from each posting on, last to first
        account = made[i].account
        low = lowest[account] = min(lowest.get(account, sums[i]), sums[i])
        needs[i] = sums[i] - low
    need = {account: max(0, -low) for account, low in lowest.items()}  # what each reserved (`reservations`)
    for i, posting in enumerate(made):
        released = need[posting.account] - needs[i]
        need[posting.account] = needs[i]
        if released != posting.released:
            made[i] = posting._replace(released=released)
    return made


def reservations(legs: Sequence[Leg]) -> dict[str, int]:
    """What each source reserves in its mailbox for a ticket of these legs (transfers and pending
    transfers, in order, as it decided them): the most their postings take from its available
    balance at any point of the ticket. That is its debits, less what the legs before them
    credited it: a chain that pays an empty account and spends that payment in its next leg
    needs nothing of the account's own, and reserving the debit would refuse another such chain
    the funds it finds there, which it would get in any order the two were decided in. (A
    pending leg's credit is not available.)"""
    made = postings(legs, 0, False)
    most: dict[str, int] = {}
    for posting, change in zip(made, _running(made), strict=True):
        if change < 0:
            most[posting.account] = max(most.get(posting.account, 0), -change)
    return most


def _running(made: list[Posting]) -> list[int]:
    """After each posting, how far its account's available balance has moved since the first."""
    sums: list[int] = []
    running: dict[str, int] = {}
    for posting in made:
        sums.append(running.get(posting.account, 0) + posting.amount - posting.held)
        running[posting.account] = sums[-1]
    return sums


def releasing_hold(pending: Pending, lsn: int) -> tuple[Posting, Posting]:
    """The postings that release a pending transfer's hold, on both of its accounts."""
    return (Posting(pending.source, 0, 0, 0, lsn, 0, -pending.amount, 0),
            Posting(pending.destination, 0, 0, 0, lsn, 0, 0, -pending.amount))
