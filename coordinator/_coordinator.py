"""The transfer coordinator: the two-phase protocol, from request to durable outcome.

Data flow of one transfer (threads in brackets):

1. [caller] validate; claim the id (or find its earlier outcome); check both
   accounts exist and share a currency, else journal the refusal.
2. [caller] send a `DebitStep` to the source account and wait on the ticket.
3. [source's mailbox] decide: refuse (journal a rejection) or reserve the funds
   (the reservation) and call back `_commit`.
4. [source's mailbox, under the sequencer lock] check the destination can take
   the credit, stamp both entries, queue the commit record, and queue the
   entries to both accounts' mailboxes. The commit record is the point of no
   return. Permits and pins are released here: the transfer is decided.
5. [writer] group-commit the record with fsync, then release the ticket.
6. [caller] wakes with the outcome, now durable, and returns it.

No account ever waits on another; the only waits are callers' bounded waits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from journal import Journal, JournalClosedError, JournalError, crash_point

from coordinator._admission import Admission
from coordinator._claims import Claims, Outcome, Ticket, settle, ticket_outcome
from coordinator._batch import Batch
from coordinator._errors import (
    LedgerClosed,
    LedgerError,
    LedgerTimeout,
    LedgerUnavailable,
)
from coordinator._turns import TurnBatch, decide_all, give_back_turns
from coordinator._participant import DebitStep, Participant, Participants
from coordinator._rules import refusal_of_accounts
from coordinator._sequencer import Sequencer
from coordinator._validate import check_transfer
from coordinator._state import Posting
from coordinator._values import Transfer, TransferRequest

logger = logging.getLogger("tally.coordinator")


class Coordinator:
    def __init__(
        self, journal: Journal, sequencer: Sequencer, participants: Participants, inflight_max: int
    ) -> None:
        self.journal = journal
        self.sequencer = sequencer
        self.claims = Claims(journal)
        self.admission = Admission(inflight_max)
        self.participants = participants
        self._combining_lock = threading.Lock()
        self._combining_queue: list[Ticket] = []
        self._combining = False

    # --- single transfers ----------------------------------------------------------

    def transfer(self, request: TransferRequest, timeout_s: float) -> Transfer:
        """Run one transfer to a durable outcome. Blocks the caller at most ~`timeout_s`."""
        request = check_transfer(request)
        claim, fresh = self.claims.claim(request, relayed=True)
        if not fresh:
            return settle(request, self._await_prior(claim, timeout_s))
        assert isinstance(claim, Ticket)
        try:
            self.admission.admit(1, timeout_s)
        except LedgerError:
            self.claims.abandon(claim)
            raise
        self._combine(claim)
        if not claim.wait(timeout_s):
            raise LedgerTimeout(
                f"transfer {request.id!r}: no durable outcome within {timeout_s} s; retry with the same id"
            )
        self.claims.release(claim)
        return settle(request, ticket_outcome(claim))

    def _await_prior(self, claim: Ticket | Outcome, timeout_s: float) -> Outcome:
        if not isinstance(claim, Ticket):
            return claim
        if not claim.wait(timeout_s):
            raise LedgerTimeout(f"transfer {claim.request.id!r} is still in flight; retry later")
        self.claims.release(claim)
        return ticket_outcome(claim)

    def _combine(self, ticket: Ticket) -> None:
        """Start `ticket`, combining with concurrent callers (flat combining).

        The first caller to find no combiner at work becomes it and starts every
        ticket queued meanwhile, its own first; the others only queue theirs and
        go to sleep on it. One thread running many protocols back to back beats
        many threads each taking the GIL for one: fewer hand-offs, larger group
        commits. The combiner never waits on anyone; it stops when the queue is
        empty.
        """
        with self._combining_lock:
            self._combining_queue.append(ticket)
            if self._combining:
                return
            self._combining = True
        while True:
            with self._combining_lock:
                batch = self._combining_queue
                self._combining_queue = []
                if not batch:
                    self._combining = False
                    return
            try:
                rest = self._start_in_turn(batch)
            except Exception as error:  # a bug must not strand the queue or its callers
                logger.exception("deciding %d combined transfers failed", len(batch))
                for queued in batch:
                    queued.resolve(LedgerUnavailable(f"transfer {queued.request.id!r} failed: {error!r}"))
                continue
            for queued in rest:
                try:
                    self.start(queued)
                except Exception as error:  # a bug in one protocol must not strand the queue
                    queued.resolve(LedgerUnavailable(f"transfer {queued.request.id!r} failed to start: {error!r}"))

    def _start_in_turn(self, tickets: list[Ticket]) -> list[Ticket]:
        """Decide at once, on this thread, every ticket whose accounts' turns it can take
        (see `coordinator._turns`); return the others, to start through the mailboxes."""
        accounts = self.sequencer.accounts
        names = {name for ticket in tickets for name in (ticket.request.source, ticket.request.destination)}
        turns = self.participants.take_turns(names)
        if not turns:
            return tickets
        mine: list[Ticket] = []
        others: list[Ticket] = []
        for ticket in tickets:
            request = ticket.request
            if (request.source in turns or request.source not in accounts) and (
                request.destination in turns or request.destination not in accounts
            ):
                mine.append(ticket)
            else:
                others.append(ticket)
        try:
            decide_all(self, mine, turns)
        except JournalError:
            pass  # every ticket is released with the failure, by `decide_all` or the writer
        except Exception as error:  # a bug: release every ticket not yet released, then say so
            for ticket in tickets:
                ticket.resolve(LedgerUnavailable(f"transfer {ticket.request.id!r} failed: {error!r}"))
            for ticket in others:
                self._decided(ticket)  # never started: its permit goes back here
            raise
        finally:
            give_back_turns(self, turns)
            for ticket in mine:
                self._decided(ticket)
        return others

    def start(self, ticket: Ticket) -> None:
        """Begin the protocol for a claimed, admitted ticket. Never waits."""
        request = ticket.request
        accounts = self.sequencer.accounts
        source = accounts.get(request.source)
        destination = accounts.get(request.destination)
        code = refusal_of_accounts(source, destination)  # the rules, as far as no turn is needed
        if code is not None:
            self.refuse(ticket, code)
            self._decided(ticket)
            return
        assert source is not None and destination is not None
        pin = self.participants.pin
        step = DebitStep(request, ticket, pin(request.source), pin(request.destination), self._commit, self._reject,
                         source, destination, self.sequencer.states)
        step.source.reserve(step)

    # --- decisions (run on the source account's mailbox thread) --------------------

    @staticmethod
    def deliver(step: DebitStep, turns: list[Participant] | None = None) -> Callable[[Posting, Posting], None]:
        """The sequencer's delivery for `step`: queue both entries (under its lock, so in
        LSN order) without handling anything; turns taken are added to `turns`."""

        def deliver(debit: Posting, credit: Posting) -> None:
            if step.source.post(debit) and turns is not None:
                turns.append(step.source)
            crash_point("between-entries")
            if step.destination.post(credit) and turns is not None:
                turns.append(step.destination)

        return deliver

    def _commit(self, step: DebitStep) -> bool:
        turns: list[Participant] = []
        committed = False
        try:
            decided = self.sequencer.commit(step.request, self.deliver(step, turns), step.ticket)
        except JournalError as error:
            self.fail(step.ticket, error)
        else:
            if isinstance(decided, str):
                self.refuse(step.ticket, decided)
            else:
                committed = True
        self._finish(step)
        for participant in turns:
            participant.run()
        return committed

    def _reject(self, step: DebitStep, code: str) -> None:
        self.refuse(step.ticket, code)
        self._finish(step)

    def refuse(self, ticket: Ticket, code: str) -> None:
        """Journal a refusal for `ticket`; the writer releases it once durable."""
        try:
            self.sequencer.reject(ticket.request, code, ticket)
        except JournalError as error:
            self.fail(ticket, error)

    def fail(self, ticket: Ticket, error: JournalError) -> None:
        """Release a ticket whose record never reached the journal (a no-op if released),
        and drop its claim: nothing was written, so a retry of its id runs afresh."""
        if isinstance(error, JournalClosedError):
            failure: LedgerError = LedgerClosed(f"the ledger closed before transfer {ticket.request.id!r} was "
                                                "decided; nothing was written for it")
        else:
            failure = LedgerUnavailable(f"the journal cannot be written: {error}")
        if ticket.resolve(failure):
            self.claims.abandon(ticket)

    def close(self, drained: bool) -> None:
        """Release every ticket still in flight once the journal is closed: `drained`, it wrote
        every record queued, so these were never decided (`LedgerClosed`); else their outcome
        is unknown (`LedgerUnavailable`: retry with the same id after reopening)."""
        for ticket in self.claims.in_flight():
            if drained:
                ticket.resolve(LedgerClosed(f"the ledger closed before transfer {ticket.request.id!r} was decided; "
                                            "nothing was written for it"))
            else:
                ticket.resolve(LedgerUnavailable(f"the ledger closed before the outcome of transfer "
                                                 f"{ticket.request.id!r} was durable: retry with the same id"))

    def _finish(self, step: DebitStep) -> None:
        self.participants.unpin(step.request.source)
        self.participants.unpin(step.request.destination)
        self._decided(step.ticket)

    def _decided(self, ticket: Ticket) -> None:
        """Exactly once per started ticket, on whichever thread decided it."""
        self.admission.release(1)
        if ticket.on_decided is not None:
            ticket.on_decided(ticket)

    # --- batches -------------------------------------------------------------------

    def transfer_many(self, requests: list[TransferRequest], timeout_s: float) -> list[Transfer | LedgerError]:
        """Outcomes as if applied one after another in list order; see `Batch`."""
        results: list[Transfer | LedgerError] = []
        chunk = self.admission.permits_max
        for first in range(0, len(requests), chunk):
            part = requests[first : first + chunk]
            decided = TurnBatch(self, part, timeout_s).run()
            results.extend(decided if decided is not None else Batch(self, part, timeout_s).run())
        return results
