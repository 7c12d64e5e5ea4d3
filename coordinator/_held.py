"""`transfer_many`'s fast path: the caller's thread takes the turns of every account in
the batch, then runs each account's own handlers for the requests in list order.

A turn is the right to handle an account's messages; whoever holds it is that
account's single thread for the moment. Taking a turn never waits: if any account
of the batch is busy (its turn held elsewhere, or messages queued), the whole
batch falls back to the message-passing `Batch`. While the turns are held, other
threads' messages to these accounts queue in their mailboxes; the holder drains
each mailbox, in order, before and after every request, and hands what is left
to the dispatcher when it lets go. So each account still handles one message at
a time, in mailbox order, and its entries are applied in LSN order, while the
batch costs no thread hop and no per-request bookkeeping.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from journal import JournalError

from coordinator._claims import Outcome, Ticket, lsn_of, result_of
from coordinator._errors import (
    AccountNotFound,
    BalanceOverflow,
    CurrencyMismatch,
    LedgerError,
    LedgerTimeout,
)
from coordinator._participant import DebitStep, Participant
from coordinator._validate import check_transfer
from coordinator._values import Transfer, TransferRequest

if TYPE_CHECKING:
    from coordinator._coordinator import Coordinator

Result = Transfer | LedgerError


class HeldBatch:
    def __init__(self, coordinator: Coordinator, requests: Sequence[TransferRequest], timeout_s: float) -> None:
        self._coordinator = coordinator
        self._requests = requests
        self._deadline = time.monotonic() + timeout_s
        self._results: list[Outcome | Ticket | LedgerError | None] = [None] * len(requests)
        self._fresh: list[Ticket] = []
        self._foreign: list[tuple[int, Ticket]] = []

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def run(self) -> list[Result] | None:
        """The results, or None (nothing done) if some account's turn could not be taken."""
        coordinator = self._coordinator
        valid: list[int] = []
        names: set[str] = set()
        for i, request in enumerate(self._requests):
            try:
                check_transfer(request)
            except LedgerError as error:
                self._results[i] = error
                continue
            valid.append(i)
            names.add(request.source)
            names.add(request.destination)
        accounts = coordinator.sequencer.accounts
        permits = len(valid) or 1
        coordinator.admission.admit(permits, self._remaining())  # before any turn is taken
        held = self._hold(sorted(name for name in names if name in accounts))
        if held is None:
            coordinator.admission.release(permits)
            return None
        try:
            for i in valid:
                self._run_one(i, held)
        finally:
            release(coordinator, held)
            coordinator.admission.release(permits)
        return self._settle()

    def _hold(self, names: list[str]) -> dict[str, Participant] | None:
        return hold(self._coordinator, names)

    def _run_one(self, i: int, held: dict[str, Participant]) -> None:
        coordinator = self._coordinator
        request = self._requests[i]
        claim, fresh = coordinator.claims.claim(request)
        if not fresh:
            if isinstance(claim, Ticket) and claim.value is None and not claim.done:
                self._foreign.append((i, claim))  # decided elsewhere; waited for after the turns go
            self._results[i] = claim
            return
        assert isinstance(claim, Ticket)
        self._fresh.append(claim)
        self._results[i] = claim
        run_held(coordinator, claim, held)

    def _settle(self) -> list[Result]:
        coordinator = self._coordinator
        for _, ticket in self._foreign:
            if not ticket.wait(self._remaining()):
                raise LedgerTimeout(f"transfer {ticket.request.id!r} is still in flight elsewhere; retry later")
        last = max((lsn_of(result) for result in self._results), default=0)
        coordinator.journal.wait_durable(last, self._remaining())
        for ticket in self._fresh:
            if ticket.wait(self._remaining()):
                coordinator.claims.release(ticket)
        return [result_of(request, result) for request, result in zip(self._requests, self._results, strict=True)]


def hold(coordinator: Coordinator, names: list[str]) -> dict[str, Participant] | None:
    """Pin every named account and take its turn, or (if any is busy) nothing at all."""
    participants = coordinator.participants
    held: dict[str, Participant] = {}
    for name in names:
        participant = participants.pin(name)
        if not participant.hold():
            participants.unpin(name)
            release(coordinator, held)
            return None
        held[name] = participant
    return held


def release(coordinator: Coordinator, held: dict[str, Participant]) -> None:
    """Give back the turns taken by `hold` and unpin the accounts."""
    for name, participant in held.items():
        participant.unhold()
        coordinator.participants.unpin(name)


def run_held(coordinator: Coordinator, ticket: Ticket, held: dict[str, Participant]) -> None:
    """Decide a claimed ticket by running its accounts' handlers on this thread, which
    holds their turns (every account of the ticket that exists is in `held`)."""
    request = ticket.request
    source, destination = held.get(request.source), held.get(request.destination)
    if source is None or destination is None:
        coordinator.refuse(ticket, AccountNotFound.code)
        return
    accounts = coordinator.sequencer.accounts
    if accounts[request.source].currency != accounts[request.destination].currency:
        coordinator.refuse(ticket, CurrencyMismatch.code)
        return

    def commit(step: DebitStep) -> bool:
        try:
            committed = coordinator.sequencer.commit(request, coordinator.deliver(step), ticket) is not None
        except JournalError as error:
            coordinator.fail(ticket, error)
            return False
        if not committed:
            coordinator.refuse(ticket, BalanceOverflow.code)
        return committed

    def reject(step: DebitStep, code: str) -> None:
        coordinator.refuse(ticket, code)

    source.drain()
    source.decide(DebitStep(request, ticket, source, destination, commit, reject))
    source.drain()
    destination.drain()
