"""The transfer coordinator: the two-phase protocol, from request to durable outcome.

Every decision is a ticket: the claim on its ids and, once decided, its outcome. A ticket
holds one request (a transfer; a post or a void of a pending transfer) or the legs of a
linked chain, and every path decides it the same way: the sequencer asks the rules
(`coordinator._rules`) under its lock, journals the record and hands each account what the
decision did to it. What differs between paths is who holds the accounts' turns meanwhile,
so how that reaches the accounts.

Data flow of one ticket (threads in brackets):

1. [caller] validate; claim the ids (or find their earlier outcome); take a permit.
2. [caller, or a concurrent caller combining (`coordinator._combiner`), or the lane's runner
   while a group of batches holds its turns (`coordinator._lane`)] if the turns of every
   account it names can be taken at once, decide it in turn (`coordinator._turns`):
   decided, journaled and applied to the accounts on this thread, with other tickets queued
   meanwhile. Else:
3. [caller] the mailbox path: send a `DebitStep` to each source account (phase one of the
   protocol). A post, a void, or a ticket naming an unknown account has no debit to
   reserve: the sequencer decides it at once, on this thread.
4. [each source's mailbox] decide its debits by the rules from its own state: refuse, or
   reserve them (the reservation); vote. The last to vote ends phase one on its turn:
5. [last source's mailbox, under the sequencer lock] decide the ticket again from the
   projection (`Sequencer.commit`), stamp and queue its record (the point of no return for
   every leg at once) and queue the postings to the accounts' mailboxes (they end the
   reservations); or, if a source refused, journal the refusal and release every
   reservation. Pins and the permit are released here: the ticket is decided.
6. [writer] group-commit the record with fsync, then release the ticket.
7. [caller] wakes with the outcome, now durable, and returns it.

No account ever waits on another; the only waits are callers' bounded waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from journal import Journal, JournalClosedError, JournalError, crash_point

from coordinator._admission import Admission
from coordinator._claims import Claims
from coordinator._batch import Batch
from coordinator._combiner import Combiner
from coordinator._errors import (
    InvalidRequest,
    LedgerClosed,
    LedgerError,
    LedgerTimeout,
    LedgerUnavailable,
)
from coordinator._history import Refused
from coordinator._lane import Lane, TurnBatch
from coordinator._participant import DebitStep, Participant, Participants
from coordinator._rules import Refusal
from coordinator._sequencer import Sequencer
from coordinator._validate import check_chain, check_resolution, check_transfer
from coordinator._state import Posting
from coordinator._tickets import Prior, Ticket, lsn_of, refusal_error, settle, settle_chain, ticket_outcome
from coordinator._translate import ledger_error
from coordinator._values import Request, Resolution, Transfer, TransferRequest

logger = logging.getLogger("tally.coordinator")

UNDECIDED = (JournalError, InvalidRequest)
"""What keeps the sequencer from deciding a ticket, before anything moved for it: the journal
failing, or a bad reading of a clock of the caller's own (`checked_clock`). The ticket fails
with it (`Coordinator.fail`); nothing was written for it."""


class Coordinator:
    def __init__(
        self, journal: Journal, sequencer: Sequencer, participants: Participants, inflight_max: int
    ) -> None:
        self.journal = journal
        self.sequencer = sequencer
        self.claims = Claims(journal)
        self.admission = Admission(inflight_max)
        self.participants = participants
        self.lane = Lane(self)
        """Where batches decide in turn, a group at a time (`coordinator._lane.Lane`)."""
        self.combiner = Combiner(self)
        """Where concurrent single transfers decide, one thread at a time (`coordinator._combiner`)."""

    # --- one decision ------------------------------------------------------------------

    def transfer(self, request: Request, timeout_s: float) -> Transfer:
        """Run one request (a transfer, a post or a void) to a durable outcome. Blocks the
        caller at most ~`timeout_s`."""
        request = check_transfer(request) if type(request) is not Resolution else check_resolution(request)
        claim, fresh = self.claims.claim(request, relayed=True)
        if not fresh:
            return settle(request, self._await_prior(claim, timeout_s))
        assert type(claim) is Ticket
        self._run(claim, timeout_s)
        return settle(request, claim)

    def transfer_linked(self, requests: object, timeout_s: float) -> list[Transfer]:
        """Run a linked chain to a durable outcome: every leg, or none (`LinkedTransferFailed`)."""
        chain = tuple(check_chain(requests))
        claimed = self.claims.claim_chain(chain, relayed=True)
        if type(claimed) is not Ticket:
            priors = [None if prior is None else self._await_prior(prior, timeout_s) for prior in claimed]  # type: ignore[union-attr]
            return settle_chain(chain, priors)
        self._run(claimed, timeout_s)
        outcome = ticket_outcome(claimed)
        if isinstance(outcome, Refused):
            raise refusal_error(outcome)
        return list(outcome)  # type: ignore[arg-type]

    def _run(self, ticket: Ticket, timeout_s: float) -> None:
        """Admit, decide and wait for a fresh ticket; release its claim once durable."""
        try:
            self.admission.admit(1, timeout_s)
        except LedgerError:
            self.claims.abandon(ticket)
            raise
        if self.combiner.combine([ticket]):
            self.journal.commit_inline()  # alone: its record was not handed to the writer; no hand-off
        if not ticket.wait(timeout_s):
            raise LedgerTimeout(f"transfer {ticket.request.id!r}: no durable outcome within {timeout_s} s; "
                                "retry with the same id")
        self.claims.release(ticket)

    def submit(self, tickets: list[Ticket]) -> None:
        """Start claimed, admitted tickets and return without waiting for their outcome: each
        is resolved (a `Completion`) once durable, by the journal writer. For callers that
        must not block (an event loop: `Completion.add_callback`). Decides them on this thread
        as a combiner does, unless another thread is combining (then they join its queue);
        never writes to LMDB here (the writer thread does), so it waits only for the locks
        a decision takes, for a few microseconds a ticket. The caller releases each ticket's
        claim once resolved (`claims.release`)."""
        self.combiner.combine(tickets, inline=False)

    def _await_prior(self, claim: Prior, timeout_s: float) -> Prior:
        if not isinstance(claim, Ticket):
            return claim
        if not claim.wait(timeout_s):
            raise LedgerTimeout(f"transfer {claim.request.id!r} is still in flight; retry later")
        self.claims.release(claim)
        return claim

    def start_all(self, tickets: list[Ticket]) -> None:
        """`start` each ticket. One that fails to start (a bug in one protocol) is released with
        the failure and its permit returned; it never strands the others. An interrupt (a
        `BaseException`) fails the tickets after the one it landed in (`fail_unstarted`), then
        is raised; that one may be under way already, and is left to its protocol."""
        current = -1
        try:
            for current, ticket in enumerate(tickets):  # noqa: B007 - read by the handler below
                try:
                    self.start(ticket)
                except Exception as error:
                    logger.exception("starting transfer %r failed", ticket.request.id)
                    ticket.resolve(LedgerUnavailable(f"transfer {ticket.request.id!r} failed to start: {error!r}"))
                    self.decided(ticket)
        except BaseException as error:
            self.fail_unstarted(tickets[current + 1 :], error)
            raise

    def start(self, ticket: Ticket) -> None:
        """Begin the mailbox path for a claimed, admitted ticket. Never waits."""
        accounts = self.sequencer.accounts
        names: list[str] = []
        sources: list[str] = []
        for request in ticket.requests:
            if type(request) is not TransferRequest:
                break
            names += (request.source, request.destination)
            sources.append(request.source)
        else:
            if all(name in accounts for name in names):
                pin = self.participants.pin
                participants = {name: pin(name) for name in dict.fromkeys(names)}
                step = DebitStep(ticket, participants, list(dict.fromkeys(sources)), self._end, self.sequencer)
                for source in step.sources:
                    participants[source].reserve(step)
                return
        self._decide_now(ticket)  # nothing to reserve: a post, a void, or an unknown account the rules refuse

    # --- decisions -----------------------------------------------------------------------

    def _decide_now(self, ticket: Ticket) -> None:
        """Decide a ticket that reserves nothing on this thread, through the sequencer."""
        turns: list[Participant] = []
        pinned: dict[str, Participant] = {}
        try:
            self.sequencer.commit(ticket, self._deliverer(pinned, turns), False, self._pinner(pinned))
        except UNDECIDED as error:
            self.fail(ticket, error)
        except BaseException as error:  # an interrupt: a record never queued is the caller's to fail
            if ticket.value is None or self.journal.last_lsn < lsn_of(ticket):
                self.fail(ticket, error)
            raise
        finally:
            self._unpin(pinned)
            self.decided(ticket)
        for participant in turns:
            participant.run()

    def _pinner(self, pinned: dict[str, Participant]) -> Callable[[list[str]], None]:
        """The sequencer's `pin`: pin each account not in `pinned` yet, into it (the caller unpins them)."""
        pin = self.participants.pin

        def pin_all(accounts: list[str]) -> None:
            for account in accounts:
                if account not in pinned:
                    pinned[account] = pin(account)

        return pin_all

    def _deliverer(self, pinned: dict[str, Participant], turns: list[Participant]) -> Callable[[list[Posting]], None]:
        """The sequencer's delivery: queue each posting (under its lock, so in LSN order) to
        its account, pinned in `pinned`, handling nothing; turns taken are added to `turns`,
        to run once the lock is released."""

        def deliver(postings: list[Posting]) -> None:
            for i, posting in enumerate(postings):
                participant = pinned[posting.account]
                if participant.post(posting):
                    turns.append(participant)
                if i == 0:
                    crash_point("between-entries")

        return deliver

    def _unpin(self, pinned: dict[str, Participant]) -> None:
        for account in pinned:
            self.participants.unpin(account)

    def _end(self, step: DebitStep, account: str, refusal: Refusal | None) -> bool:
        """End phase one, on the turn of the last source to vote (`account`): commit, or
        journal the refusal; the other sources' reservations are released if it did not
        commit (the caller releases its own). True if it committed."""
        ticket = step.ticket
        turns: list[Participant] = []
        releases = [Posting(source, 0, 0, 0, 0, amount, 0, 0)
                    for source, amount in step.released_elsewhere(account).items()]
        released: list[Posting] = []

        def release(postings: list[Posting]) -> None:
            for posting in postings:
                released.append(posting)  # (before: one a failure lands in is never handed back twice)
                participant = step.participants[posting.account]
                if participant.post(posting):
                    turns.append(participant)

        committed = False
        undecided: Exception | None = None
        try:
            if refusal is not None:  # a refusal queued hands them back in the same hold of the lock
                self.sequencer.reject(ticket, refusal.index, refusal.code, release, releases)
            else:
                decided = self.sequencer.commit(ticket, self._deliverer(step.participants, turns), reserved=True,
                                                refused=(release, releases))
                committed = type(decided) is not Refusal
        except UNDECIDED as error:
            undecided = error
        finally:
            if not committed:  # what no refusal handed back (none queued, or one cut short)
                release(releases[len(released):])
            self._unpin(step.participants)
            self.decided(ticket)
        if undecided is not None:  # failed once the other sources' reservations are on their way back
            self.fail(ticket, undecided)
        for participant in turns:
            participant.run()
        return committed

    def fail(self, ticket: Ticket, error: BaseException) -> None:
        """Release a ticket whose record never reached the journal (a no-op if released),
        and drop its claim: nothing was written, so a retry of its ids runs afresh. `error`:
        the journal's failure, or what else kept it from being decided (an interrupt)."""
        if isinstance(error, JournalClosedError):
            failure: LedgerError = LedgerClosed(f"the ledger closed before transfer {ticket.request.id!r} was "
                                                "decided; nothing was written for it")
        elif isinstance(error, JournalError):
            failure = LedgerUnavailable(f"the journal cannot be written: {error}")
        elif isinstance(error, LedgerError):  # e.g. a bad reading of a clock of the caller's own
            failure = error
        else:
            failure = LedgerUnavailable(f"transfer {ticket.request.id!r} was not decided: {error!r}")
        if ticket.resolve(failure):
            self.claims.abandon(ticket)

    def fail_unstarted(self, tickets: list[Ticket], error: BaseException) -> None:
        """`fail` admitted tickets that were never started (an interrupt kept them from it)
        and return their permits."""
        for ticket in tickets:
            self.fail(ticket, error)
            self.decided(ticket)

    def expire_due(self) -> tuple[int, int]:
        """Journal the expiry of every pending transfer whose deadline has come, and release
        its hold on both accounts: (how many expired, the LSN to wait for to see it durable).
        Never waits but for the sequencer lock."""
        if self.sequencer.next_deadline() is None:
            return 0, 0
        turns: list[Participant] = []
        pinned: dict[str, Participant] = {}
        try:
            return self.sequencer.expire(self._deliverer(pinned, turns), self._pinner(pinned))
        finally:
            self._unpin(pinned)
            for participant in turns:
                participant.run()

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

    def decided(self, ticket: Ticket) -> None:
        """Once a started ticket is decided, on whichever thread decided it: its permit goes
        back, once (a second call, from a path an interrupt took, does nothing)."""
        if not ticket.permit:
            return
        ticket.permit = False  # first: an interrupt after it may keep a permit, never give one back twice
        self.admission.release(1)
        if ticket.on_decided is not None:
            ticket.on_decided(ticket)

    # --- batches -------------------------------------------------------------------

    def transfer_many(self, requests: list[Request], timeout_s: float) -> list[Transfer | LedgerError]:
        """Outcomes as if applied one after another in list order; see `Batch`. Items are
        transfers, or posts and voids (`Resolution`), decided a part of `permits_max` at a
        time. A part that raises (the journal closed or failed, a timeout) raises for the
        batch if it is the first; after one, it and every later part answer its error, item
        by item, beside the earlier parts' outcomes (raised, it would hide them)."""
        results: list[Transfer | LedgerError] = []
        chunk = self.admission.permits_max
        for first in range(0, len(requests), chunk):
            part = requests[first : first + chunk]
            try:
                decided = TurnBatch(self, part, timeout_s).run()
                results.extend(decided if decided is not None else Batch(self, part, timeout_s).run())
            except (LedgerError, JournalError) as error:
                if not first:
                    raise
                failure = error if isinstance(error, LedgerError) else ledger_error(error)
                return results + [failure] * (len(requests) - first)
        return results
