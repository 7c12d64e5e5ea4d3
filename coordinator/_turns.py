"""`transfer_many`'s fast path: the caller's thread takes the turns of every account in
the batch, then runs each account's own handlers for the requests in list order.

A turn is the right to handle an account's messages; whoever holds it is that
account's single thread for the moment. Taking a turn never waits: if any account
of the batch is busy (its turn held elsewhere, or messages queued), the whole
batch falls back to the message-passing `Batch`. A turn is taken only from an idle
account with an empty mailbox; while it is held, other threads' messages to the
account queue in its mailbox. Entries queued meanwhile (a concurrent commit
crediting it) are applied before the account decides again; everything else is
handed to the dispatcher when the holder lets go. So each account still handles
one message at a time, and its entries are applied in LSN order, while the batch
costs no thread hop.

The requests are decided in chunks, each under one hold of the sequencer lock and
journaled as one block (`decide_in_turn`): per request, the rules decide the
debit (no reservation is needed: nothing else can touch the account meanwhile), the
sequencer stamps the entries, and both accounts apply them at once, so the next
request sees them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from coordinator._claims import Outcome, Ticket, lsn_of, result_of
from coordinator._errors import LedgerError, LedgerTimeout
from coordinator._limits import CHUNK_REQUESTS_MAX
from coordinator._participant import TurnAccount
from coordinator._rules import decide, refusal_of_accounts
from coordinator._sequencer import Chunk
from coordinator._state import AccountState
from coordinator._validate import check_transfer
from coordinator._values import Transfer, TransferRequest
from journal import CRASH_POINT_ARMED, JournalError, crash_point

if TYPE_CHECKING:
    from coordinator._coordinator import Coordinator

Result = Transfer | LedgerError


class TurnBatch:
    def __init__(self, coordinator: Coordinator, requests: list[TransferRequest], timeout_s: float) -> None:
        """`requests` is the batch's own list: validation replaces a subclass's item in it with
        the plain request it checked."""
        self._coordinator = coordinator
        self._requests = requests
        self._deadline = time.monotonic() + timeout_s
        self._results: list[Outcome | Ticket | LedgerError | None] = [None] * len(requests)
        self._fresh: list[Ticket] = []
        self._prior: list[Outcome | Ticket] = []
        """Claims this batch found made already: outcomes, and tickets in flight elsewhere."""

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def run(self) -> list[Result] | None:
        """The results, or None (nothing done) if some account's turn could not be taken."""
        coordinator = self._coordinator
        valid: list[int] = []
        names: list[str] = []
        requests, results = self._requests, self._results
        for i, request in enumerate(requests):
            try:
                request = requests[i] = check_transfer(request)  # a subclass becomes a plain one
            except LedgerError as error:
                results[i] = error
                continue
            valid.append(i)
            names += (request.source, request.destination)
        permits = len(valid) or 1
        coordinator.admission.admit(permits, self._remaining())  # before any turn is taken
        try:
            turns = take_turns(coordinator, names)
        except BaseException:
            coordinator.admission.release(permits)
            raise
        if turns is None:
            coordinator.admission.release(permits)
            return None
        try:
            self._claim(valid)
            decide_all(coordinator, self._fresh, turns)
        finally:
            give_back_turns(coordinator, turns)
            coordinator.admission.release(permits)
        return self._settle()

    def _claim(self, valid: list[int]) -> None:
        requests, results, fresh = self._requests, self._results, self._fresh
        claimed = self._coordinator.claims.claim_many([requests[i] for i in valid], fresh)
        for i, ticket in zip(valid, claimed, strict=True):
            results[i] = ticket
        if len(fresh) < len(valid):  # some ids were claimed before: decided elsewhere (or earlier here)
            mine = set(map(id, fresh))
            self._prior = [claim for claim in claimed if id(claim) not in mine]

    def _settle(self) -> list[Result]:
        coordinator = self._coordinator
        prior = self._prior
        # The answers, while the writer makes the last records durable: a fresh ticket's
        # outcome is its decision unless the journal fails it, which the last one shows
        # (after a failure nothing more is written). Claims found made wait to be decided.
        answers = None if prior else self._answers()
        for claim in prior:
            if type(claim) is Ticket and not claim.done and not claim.wait(self._remaining()):
                raise LedgerTimeout(f"transfer {claim.request.id!r} is still in flight elsewhere; retry later")
        fresh = self._fresh
        # The writer releases completions in LSN order: once the last of ours is, all are.
        if fresh and not fresh[-1].wait(self._remaining()):
            raise LedgerTimeout(f"transfer {fresh[-1].request.id!r} is not durable yet; retry later")
        if prior:  # what others decided must be durable too before it is answered
            coordinator.journal.wait_durable(max(map(lsn_of, prior)), self._remaining())
        assert all(ticket.done for ticket in fresh)
        coordinator.claims.release_many(fresh)
        if answers is None or (fresh and fresh[-1].error is not None):
            answers = self._answers()
        return answers

    def _answers(self) -> list[Result]:
        return [result_of(request, result) for request, result in zip(self._requests, self._results, strict=True)]


def decide_all(coordinator: Coordinator, tickets: list[Ticket], turns: Mapping[str, TurnAccount]) -> None:
    """`decide_in_turn` chunk by chunk. If the journal fails, every ticket not yet appended
    is released with the failure (the writer releases the appended ones), and it raises."""
    for first in range(0, len(tickets), CHUNK_REQUESTS_MAX):
        try:
            decide_in_turn(coordinator, tickets[first : first + CHUNK_REQUESTS_MAX], turns)
        except JournalError as error:  # that chunk is failed; the later ones never started
            _fail(coordinator, tickets[first + CHUNK_REQUESTS_MAX :], error)
            raise


def decide_in_turn(coordinator: Coordinator, tickets: list[Ticket], turns: Mapping[str, TurnAccount]) -> None:
    """Decide claimed tickets in order, on this thread, which holds the turn of every
    account they name that exists, and journal them all in one block.

    Each request is decided by the rules (`decide`) from both accounts' states and the
    source's reservations, exactly as its `DebitStep` would be in the mailbox path; the
    sequencer stamps the entries, and both accounts apply them at once (`apply`), so the
    next request sees them. An
    account whose mailbox received entries since its turn was taken (a concurrent
    commit crediting it) applies those first: the sequencer's projection, which
    already includes them, must equal the account's own state before it decides.
    """
    sequencer = coordinator.sequencer
    states = sequencer.states
    stamp_commit, stamp_reject = sequencer.stamp_commit, sequencer.stamp_reject
    chunk = Chunk()
    commits = 0
    with sequencer.lock:
        try:
            coordinator.journal.wait_room(len(tickets))
        except JournalError as error:
            _fail(coordinator, tickets, error)
            raise
        lsn = coordinator.journal.last_lsn
        accounts = sequencer.accounts
        for ticket in tickets:
            request = ticket.request
            tid, source_id, destination_id, amount = request.id, request.source, request.destination, request.amount
            lsn += 1
            source, destination = turns.get(source_id), turns.get(destination_id)
            if source is None or destination is None:  # unknown: the rules say which
                code = refusal_of_accounts(accounts.get(source_id), accounts.get(destination_id))
                assert code is not None
                stamp_reject(chunk, request, code, lsn, ticket)
                continue
            origin, target = states[source_id], states[destination_id]
            if source.state is not origin and source.state != origin:
                _catch_up(source, origin)
            if destination.state is not target and destination.state != target:
                _catch_up(destination, target)
            decided = decide(amount, source.account, destination.account, origin, target, source.reserved)
            if isinstance(decided, str):
                stamp_reject(chunk, request, decided, lsn, ticket)
                continue
            if CRASH_POINT_ARMED:
                crash_point("after-reserve")
            stamp_commit(chunk, tid, source_id, destination_id, amount, lsn, ticket, decided)
            # Each account applies its entry, and the projection takes the state it reached
            # (built once, not twice).
            debit_seq, debit_balance, credit_seq, credit_balance = decided
            states[source_id] = source.apply(debit_seq, -amount, debit_balance, lsn)
            if CRASH_POINT_ARMED:
                crash_point("between-entries")
            states[destination_id] = destination.apply(credit_seq, amount, credit_balance, lsn)
            commits += 1
        try:
            first = sequencer.append_chunk(chunk)
        except JournalError as error:  # the journal failed: nothing more is written until reopen
            # The accounts and the projection already hold this chunk's entries, which
            # will never be durable: the ledger is unusable until reopened, and it is,
            # since the failed journal refuses every later write and read.
            _fail(coordinator, tickets, error)
            raise
        assert first + len(chunk) - 1 == lsn, (first, len(chunk), lsn)
        if CRASH_POINT_ARMED:
            for _ in range(commits):
                crash_point("after-commit-queued")


def _fail(coordinator: Coordinator, tickets: list[Ticket], error: JournalError) -> None:
    """Release tickets that were never appended with the journal's failure (waiters
    elsewhere wake); the caller then raises it. Appended ones are the writer's to release."""
    for ticket in tickets:
        coordinator.fail(ticket, error)


def _catch_up(account: TurnAccount, projected: AccountState) -> None:
    """Apply the entries waiting in the account's mailbox: then it agrees with the projection."""
    account.catch_up()
    assert account.state == projected, (account.state, projected)


def take_turns(coordinator: Coordinator, names: list[str]) -> Mapping[str, TurnAccount] | None:
    """Pin every named account that exists and take its turn, or (if any is busy) nothing at all."""
    return coordinator.participants.take_turns(names, all_or_none=True)


def give_back_turns(coordinator: Coordinator, turns: Mapping[str, TurnAccount]) -> None:
    """Give back the turns taken by `take_turns` and unpin the accounts."""
    coordinator.participants.give_back_turns(turns)
