"""Tickets: a decision in flight, and what an id's outcome answers its callers.

A `Ticket` is the claim on the ids of a decision while its protocol runs (`coordinator._claims`
hands them out, one an id, or one for every leg of a linked chain): a `Completion` that the
deciding thread gives its outcome (`Decided`) and the journal writer releases once that outcome
is durable. These functions turn what an id has (`Prior`: the ticket in flight, or the journaled
`Committed` or `Refused`) into a caller's answer: the transfer, or the error a refusal raises
(`refusal_error`), or `IdempotencyConflict` for a retry that differs from the request that used
the id (`settle`, `settle_chain`, a batch's `result_of`); and what a durable outcome is now
(`outcome_now`). They read no lock: a claim's stripe lock guards only who has an id.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Union, cast

from journal import Completion, Journal

from coordinator._asof import transfer_at
from coordinator._errors import REJECTIONS, IdempotencyConflict, LedgerError, LedgerUnavailable, LinkedTransferFailed
from coordinator._history import Committed, Refused, transfer_record
from coordinator._values import Request, Transfer

Decided = Transfer | tuple[Transfer, ...] | Refused
"""A ticket's decision: the transfer (one request), the transfers (a chain), or the refusal."""
Prior = Union["Ticket", Committed, Refused]
"""What an id already has: the ticket of its decision in flight, or its journaled outcome."""


_completion_init = Completion.__init__


class Ticket(Completion):
    """The claim on the ids of a decision in flight: one request's, or every leg's of a linked
    chain. `value` becomes its `Decided`."""

    __slots__ = ("request", "requests", "linked", "stripe", "on_decided", "permit", "locks")
    locks: list[threading.Lock]
    """A claimed chain's only (`Claims.claim_chain`): the stripe locks of its ids, in order."""

    def __init__(self, requests: tuple[Request, ...], stripe: int, relayed: bool = False, linked: bool = False) -> None:
        _completion_init(self, None, relayed)  # not `super().__init__(relayed=...)`: half the cost, once a transfer
        self.request = requests[0]
        """The first request (a decision of one request: the request)."""
        self.requests = requests
        self.linked = linked
        """True for `transfer_linked`'s chain (even of one transfer): refused, it is a `LinkedTransferFailed`."""
        self.stripe = stripe
        """The claims stripe of the first request's id."""
        self.on_decided: Callable[[Ticket], None] | None = None
        """Called once, on the deciding thread, when the outcome is known (not yet durable)."""
        self.permit = True
        """Whether its admission permit is still to go back (`Coordinator.decided`, once)."""


def refusal_error(refused: Refused) -> LedgerError:
    """The error a refusal raises: its code's class, or for a chain `LinkedTransferFailed`."""
    request = refused.request
    cls = REJECTIONS[refused.code]
    cause = cls(f"transfer {request.id!r} ({_shown_request(request)}) was refused: {refused.code}")
    if not refused.linked:
        return cause
    return LinkedTransferFailed(f"linked transfer {refused.index} of {len(refused.requests)} ({request.id!r}) was "
                                f"refused: {refused.code}; none of the chain moved", refused.index, cause)


def _shown_request(request: Request) -> str:
    if type(request) is Transfer or hasattr(request, "source"):
        return f"{request.amount} from {request.source!r} to {request.destination!r}"  # type: ignore[union-attr]
    verb = "void" if request.void else "post"  # type: ignore[union-attr]
    return f"{verb} of pending transfer {request.pending_id!r}"  # type: ignore[union-attr]


def _conflict(request: Request, prior: Request | None) -> IdempotencyConflict:
    if prior is None:
        return IdempotencyConflict(f"transfer id {request.id!r} was already used, outside this linked chain")
    return IdempotencyConflict(f"transfer id {request.id!r} was already used for {_differs(prior, request)}")


def _chain_differs(prior: tuple[Request, ...], requests: tuple[Request, ...]) -> str:
    """The earlier linked chain whose ids a retried chain reuses, with where they differ."""
    if len(prior) != len(requests):
        return f"a linked chain of {len(prior)} transfers; the retry has {len(requests)}"
    index, was, now = next((index, was, now) for index, (was, now) in enumerate(zip(prior, requests, strict=True))
                           if was != now)
    return f"a linked chain whose transfer {index} was {_differs(was, now)}"


def _differs(prior: Request, request: Request) -> str:
    """The earlier request, with the fields a retry changed named."""
    if type(prior) is not type(request):
        return f"another kind of request ({_shown_request(prior)})"
    changed = [name for name in prior.__slots__ if getattr(prior, name) != getattr(request, name)]  # type: ignore[union-attr]
    if not changed:  # the very request, in another linked chain or in none
        return f"{_shown_request(prior)}; the retry is the same request in another linked chain (or in none)"
    return f"{_shown_request(prior)}; the retry differs in {', '.join(changed)}"


def ticket_outcome(ticket: Ticket) -> Decided:
    """The decided outcome of a ticket, or raise the error that kept it from being durable."""
    if ticket.error is not None:
        if isinstance(ticket.error, LedgerError):
            raise ticket.error
        raise LedgerUnavailable(f"the journal failed: {ticket.error}") from ticket.error
    assert ticket.value is not None, "a resolved ticket carries its outcome"
    return cast(Decided, ticket.value)


def _transfers(value: Decided | Committed) -> tuple[Transfer, ...]:
    if type(value) is Transfer:
        return (value,)
    return value.transfers if isinstance(value, Committed) else value  # type: ignore[return-value]


def settle(request: Request, prior: Prior) -> Transfer:
    """The caller's answer for `request` given what its id has (a ticket it waited on, or a
    journaled outcome): the Transfer, or raise its refusal; `IdempotencyConflict` if the
    request differs from the one that used the id."""
    value: Decided | Committed = ticket_outcome(prior) if type(prior) is Ticket else prior  # type: ignore[assignment]
    if type(value) is Transfer and type(prior) is Ticket and prior.request is request:
        return value  # this very request's own decision: nothing to compare
    requests = prior.requests
    index = next((i for i, made in enumerate(requests) if made.id == request.id), None)
    assert index is not None, (request.id, requests)
    if prior.linked:  # a leg of a linked chain: only the chain, retried whole, has its outcome
        raise IdempotencyConflict(f"transfer id {request.id!r} was already used as transfer {index} of a linked chain "
                                  f"of {len(requests)}: retry that chain whole to learn its outcome")
    if requests[index] != request:
        raise _conflict(request, requests[index])
    if isinstance(value, Refused):
        raise refusal_error(value)
    return _transfers(value)[index]


def settle_chain(requests: tuple[Request, ...], priors: list[Prior | None]) -> list[Transfer]:
    """`settle` for a linked chain some of whose ids were used (`priors`: what each id has,
    None if it is new): by this very chain (then its outcome), or else `IdempotencyConflict`."""
    first = priors[0]
    for request, prior in zip(requests, priors, strict=True):
        if prior is None or first is None or (prior is not first and (
                type(prior) is Ticket or type(first) is Ticket or prior.lsn != first.lsn)):  # type: ignore[union-attr]
            if prior is None:  # name the first leg whose id was used, not a new one
                request = next(leg for leg, found in zip(requests, priors, strict=True) if found is not None)
            raise _conflict(request, None)
    prior = first
    assert prior is not None  # the loop raised otherwise
    if not prior.linked or prior.requests != requests:
        if len(requests) > 1 and prior.linked:  # every id of this chain, by another chain
            raise IdempotencyConflict(f"transfer id {requests[0].id!r} was already used for "
                                      f"{_chain_differs(prior.requests, requests)}")
        made = next((made for made in prior.requests if made.id == requests[0].id), None)
        raise _conflict(requests[0], made if made is not None and len(requests) == 1 else None)
    value: Decided | Committed = ticket_outcome(prior) if type(prior) is Ticket else prior  # type: ignore[assignment]
    if isinstance(value, Refused):
        raise refusal_error(value)
    return list(_transfers(value))


def outcome_now(journal: Journal, tid: str, durable_lsn: int) -> Transfer | LedgerError | None:
    """The durable outcome of `tid` now: its Transfer with its status as of `durable_lsn`, the
    error its refusal raises, or None (no outcome at or before `durable_lsn`, read before this
    call: a record committed but not yet released to its callers is not shown). One read
    transaction, no scan."""
    with journal.snapshot() as txn:
        record = transfer_record(journal, tid, txn)
        if record is None or record.lsn > durable_lsn:
            return None
        if isinstance(record, Refused):
            return refusal_error(record)
        return transfer_at(journal, tid, durable_lsn, txn)


def lsn_of(result: Prior | LedgerError | None) -> int:
    """The journal position a batch result waits for (0 if it wrote nothing)."""
    value: object = result.value if isinstance(result, Ticket) else result
    if type(value) is tuple:
        value = value[0]
    return int(getattr(value, "lsn", 0))


def result_of(request: Request, result: Prior | LedgerError | None) -> Transfer | LedgerError:
    """A batch item's answer: the Transfer, or the LedgerError it would have raised."""
    if type(result) is Ticket and result.request is request and result.error is None and type(result.value) is Transfer:
        return result.value  # this very request's own commit: nothing to compare
    if isinstance(result, LedgerError):
        return result
    assert result is not None
    try:
        return settle(request, result)
    except LedgerError as error:
        return error
