"""`transfer_many`'s fast path: the lane, where batches decide in turn, a group at a time.

A batch (`TurnBatch`) is validated and admitted on its caller's thread, then queued in the
`Lane`. One caller at a time is the lane's runner: it takes the turns of every account of
the batches queued (`coordinator._taking`), claims their ids and decides them chunk after
chunk, each chunk journaled as one block, then gives the turns back; the group's callers
wait for their last record to be durable and answer. While a group holds its turns, the
single transfers that arrive (`Combiner.combine`) are adopted: the runner decides them
between two chunks, with the turns it holds, instead of leaving them to queue in the
mailboxes of accounts it holds (or to wait for the sequencer lock it takes chunk after
chunk) until the whole group is decided.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from coordinator._errors import LedgerError, LedgerTimeout, LedgerUnavailable
from coordinator._limits import (BESIDE_PAUSE_S, CHUNK_REQUESTS_BESIDE, CHUNK_REQUESTS_MAX, DECIDING_PAUSE_S,
                                 LANE_GROUP_REQUESTS_MAX, TURN_WAIT_S_MAX)
from coordinator._participant import TurnAccount
from coordinator._taking import give_back_turns, take_turns
from coordinator._tickets import Prior, Ticket, lsn_of, result_of
from coordinator._turns import decide_all
from coordinator._validate import check_resolution, check_transfer
from coordinator._values import Request, Resolution, Transfer

if TYPE_CHECKING:
    from coordinator._coordinator import Coordinator

Result = Transfer | LedgerError


class TurnBatch:
    def __init__(self, coordinator: Coordinator, requests: list[Request], timeout_s: float) -> None:
        """`requests` is the batch's own list: validation replaces a subclass's item in it with
        the plain request it checked. Posts and voids (`Resolution`) may be among them (for
        `engine._shard_steps`); `Ledger.transfer_many` passes transfers only."""
        self._coordinator = coordinator
        self._requests = requests
        self._deadline = time.monotonic() + timeout_s
        self._results: list[Prior | LedgerError | None] = [None] * len(requests)
        self._fresh: list[Ticket] = []
        self._late: list[Ticket] = []
        """Fresh tickets the turns could not decide (an account made meanwhile): started in the mailboxes."""
        self._prior: list[Prior] = []
        """Claims this batch found made already: outcomes, and tickets in flight elsewhere."""
        self.valid: list[int] = []
        self.names: list[str] = []
        self.permits = 1
        self.decided = False
        """Set by the lane: the batch was decided (or fell back, or failed), and its permits returned."""
        self.fell_back = False
        self.failure: BaseException | None = None

    def remaining(self) -> float:
        """Seconds left before the batch's deadline."""
        return max(0.0, self._deadline - time.monotonic())

    def run(self) -> list[Result] | None:
        """The results, or None (nothing done) if some account's turn could not be taken."""
        coordinator = self._coordinator
        requests, results = self._requests, self._results
        pending = coordinator.sequencer.pending
        for i, request in enumerate(requests):
            try:
                if type(request) is Resolution:  # a post or a void: its pending transfer's accounts
                    request = requests[i] = check_resolution(request)
                    found = pending.get(request.pending_id)  # a hint: the decision reads it again in turn
                    if found is not None:
                        self.names += (found.source, found.destination)
                else:
                    request = requests[i] = check_transfer(request)  # a subclass becomes a plain one
                    self.names += (request.source, request.destination)
            except LedgerError as error:
                results[i] = error
                continue
            self.valid.append(i)
        self.permits = len(self.valid) or 1
        coordinator.admission.admit(self.permits, self.remaining())  # returned by the lane once decided
        coordinator.lane.decide(self)
        if self.failure is not None:
            raise self.failure
        if self.fell_back:
            return None
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
        # (after a failure nothing more is written). Claims found made, and late tickets
        # (the mailboxes may not have decided them yet), wait to be decided first.
        answers = None if prior or self._late else self._answers()
        for claim in prior:
            if type(claim) is Ticket and not claim.done and not claim.wait(self.remaining()):
                raise LedgerTimeout(f"transfer {claim.request.id!r} is still in flight elsewhere; retry later")
        fresh = self._fresh
        # The writer releases completions in LSN order: once the last of ours is, all are
        # (but for the late ones, decided after).
        for ticket in (*fresh[-1:], *self._late):
            if not ticket.wait(self.remaining()):
                raise LedgerTimeout(f"transfer {ticket.request.id!r} is not durable yet; retry later")
        if prior:  # what others decided must be durable too before it is answered
            coordinator.journal.wait_durable(max(map(lsn_of, prior)), self.remaining())
        if fresh and fresh[-1].error is not None:  # the last may have failed alone (a bad clock reading), early
            for ticket in fresh:
                if not ticket.done and not ticket.wait(self.remaining()):
                    raise LedgerTimeout(f"transfer {ticket.request.id!r} is not durable yet; retry later")
        coordinator.claims.release_many(fresh)
        if answers is None or (fresh and fresh[-1].error is not None):
            answers = self._answers()
        return answers

    def _answers(self) -> list[Result]:
        return [result_of(request, result) for request, result in zip(self._requests, self._results, strict=True)]

    def interrupted(self, error: BaseException) -> None:
        """After an interrupt in the lane's run of its group: an item never claimed answers
        `LedgerUnavailable`, and a fresh ticket never decided fails (nothing was written for
        either); the decided ones are the writer's to answer."""
        for i in self.valid:
            if self._results[i] is None:
                self._results[i] = LedgerUnavailable(f"transfer {self._requests[i].id!r} was not decided: {error!r}")
        for ticket in self._fresh:
            if ticket.value is None:  # a decision sets it
                self._coordinator.fail(ticket, error)


class Lane:
    """Where `transfer_many` batches decide in turn: one group of them at a time, each group
    while the one before it is made durable (flat combining, as `Combiner.combine` does
    for single transfers). The first caller to find no one deciding becomes the runner: it
    takes every batch queued (up to `LANE_GROUP_REQUESTS_MAX` requests), takes the turns of
    all their accounts (waiting, bounded, for busy ones: only the runner waits, so no two
    waiters hold what the other wants), claims each batch's ids and decides them all in
    order, batch after batch, and goes on while its own batch is not decided. The others
    sleep until theirs is, or until the runner leaves and one of them takes over. Deciding
    the batches that wait in one run takes and gives back their turns once.

    While a group holds its turns, the lane adopts single transfers (`adopt`): the runner
    decides them between two chunks of the group and once more after the last, taking the
    turns it does not hold without waiting (`Combiner.start_round`). A single transfer
    then waits for at most one chunk, not for the whole group (up to
    `LANE_GROUP_REQUESTS_MAX` requests, tens of milliseconds)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[TurnBatch] = []
        self._running = False
        self._adopting = False
        """True while the runner holds a group's turns and decides adopted tickets."""
        self._adopted: list[Ticket] = []
        """Bounded by the admission permits: each ticket holds one."""
        self._adopted_last: list[Ticket] | None = None
        """The tickets `adopt` took last (see `took`)."""
        self._beside = False
        """True while single transfers arrive beside the groups: the runner adopted one in
        this group or the one before. The runner then decides in shorter chunks, with a
        shorter pause between them (`CHUNK_REQUESTS_BESIDE`, `BESIDE_PAUSE_S`)."""
        self._adopted_any = False
        """Whether the runner adopted a ticket in this group (read for the next one)."""

    def adopt(self, tickets: list[Ticket]) -> bool:
        """Hand claimed, admitted tickets to the runner, if a group holds its turns now: it
        decides them (or starts them in the mailboxes, if it cannot take an account's turn)
        before its next chunk, or after its last one. False, and nothing taken, if no group
        holds its turns. Waits only for the lane's lock, and not even for it when no group
        holds its turns (a read of the flag without it: a group starting meanwhile only
        means these tickets take the combiner's path, which decides them just as well).
        After an interrupt out of it, `took` says whether it took them."""
        if not self._adopting:
            return False
        with self._cond:
            if not self._adopting:
                return False
            self._adopted += tickets
            self._adopted_last = tickets  # with no call between the two, where an interrupt could land
            self._beside = self._adopted_any = True
            return True

    def took(self, tickets: list[Ticket]) -> bool:
        """Whether `adopt(tickets)` took them: asked by its caller (the only one: the combiner)
        after an interrupt out of it, since the runner may have taken them from the lane already."""
        return self._adopted_last is tickets

    def _between_chunks(self, turns: Mapping[str, TurnAccount]) -> None:
        """Between two chunks of a group: let go of the interpreter (`BESIDE_PAUSE_S` while
        single transfers arrive beside the groups, see `_beside`; else `DECIDING_PAUSE_S`),
        then decide the tickets adopted meanwhile."""
        time.sleep(BESIDE_PAUSE_S if self._beside else DECIDING_PAUSE_S)
        self._decide_adopted(turns)

    def _chunk_requests(self) -> int:
        """The size of the runner's next chunk (see `_beside`)."""
        return CHUNK_REQUESTS_BESIDE if self._beside else CHUNK_REQUESTS_MAX

    def _decide_adopted(self, turns: Mapping[str, TurnAccount]) -> None:
        """Decide, with the group's turns, the tickets adopted since the last look."""
        with self._cond:
            tickets, self._adopted = self._adopted, []
        if tickets:
            # Raises no `Exception`. An interrupt is raised once the ones it kept from being
            # decided are failed (see `start_round`); those decided are the writer's to answer.
            self._coordinator.combiner.start_round(tickets, held=turns)

    def decide(self, batch: TurnBatch) -> None:
        """Decide `batch` in turn, with whatever batches queue meanwhile; return once it is
        decided (`batch.decided`; `batch.fell_back` if its turns could not be taken, then
        nothing was done; `batch.failure` if deciding raised). `LedgerTimeout` if its
        deadline passes first: if it was not started, nothing was done; else it is decided
        all the same, and a retry with the same ids learns each outcome."""
        cond = self._cond
        with cond:
            self._queue.append(batch)
            while not batch.decided:
                if not self._running:
                    self._running = True
                    break
                if not cond.wait(batch.remaining()) and not batch.decided and batch.remaining() <= 0:
                    if batch in self._queue:  # never started: take it back
                        self._queue.remove(batch)
                        self._coordinator.admission.release(batch.permits)
                        raise LedgerTimeout("transfer_many: other batches kept the ledger busy; nothing was "
                                            "done, retry")
                    raise LedgerTimeout("transfer_many: not decided in time; retry with the same ids to learn "
                                        "each outcome")
            else:
                return
        try:
            while not batch.decided:
                with cond:
                    group: list[TurnBatch] = []
                    size = 0
                    while self._queue and (not group or size + len(self._queue[0].valid) <= LANE_GROUP_REQUESTS_MAX):
                        size += len(self._queue[0].valid)
                        group.append(self._queue.pop(0))
                self._decide_group(group)
                with cond:
                    cond.notify_all()
        finally:
            with cond:
                self._running = False
                cond.notify_all()  # a batch still queued has a waiting owner: one of them runs next

    def _decide_group(self, group: list[TurnBatch]) -> None:
        """Decide the batches of `group` in order, in one hold of their turns; mark each decided.
        What goes wrong stays with the batches it touches: a batch whose ids cannot be claimed
        fails alone (its claims let go); a failure while deciding fails the batches none of
        whose tickets it journaled, and the others settle as usual, each request answered
        as the journal made it (a batch it cut short: its later requests with the failure)."""
        coordinator = self._coordinator
        admission = coordinator.admission
        try:
            names = [name for batch in group for name in batch.names]
            turns = None
            try:
                turns = take_turns(coordinator, names, min(TURN_WAIT_S_MAX, group[0].remaining()))
            finally:
                if turns is None:  # nothing was done: the owners go the mailbox path, or raise
                    for batch in group:
                        batch.fell_back = True
                        admission.release(batch.permits)
            if turns is None:
                return
            late: list[Ticket] = []
            failure: Exception | None = None
            interrupt: BaseException | None = None
            with self._cond:
                self._beside, self._adopted_any = self._adopted_any, False
                self._adopting = True
            try:
                tickets: list[Ticket] = []
                for batch in group:
                    try:
                        batch._claim(batch.valid)
                    except Exception as error:  # say, an index entry found damaged: this batch only
                        for ticket in batch._fresh:
                            coordinator.fail(ticket, error)
                        batch._fresh, batch.failure = [], error
                        continue
                    tickets += batch._fresh
                late = decide_all(coordinator, tickets, turns, between_chunks=lambda: self._between_chunks(turns),
                                  chunk_requests=self._chunk_requests)
            except Exception as error:  # `decide_all` failed every ticket it did not journal
                failure = error
            except BaseException as error:  # an interrupt: as a failure, but the owners get their own errors
                interrupt = error
            finally:
                with self._cond:
                    self._adopting = False
                try:
                    try:
                        self._decide_adopted(turns)  # adopted after the last chunk: the turns are still held
                    finally:
                        give_back_turns(coordinator, turns)
                except BaseException as error:  # an interrupt here too: the permits below go back all the same
                    if interrupt is None:
                        interrupt = error
            if late:  # a started ticket's permit returns when it is decided
                left = set(map(id, late))
                for batch in group:
                    batch._late = [ticket for ticket in batch._fresh if id(ticket) in left]
            for batch in group:
                admission.release(batch.permits - len(batch._late))
                # A batch the failure left nothing journaled of raises it; one it cut short
                # answers each request as the journal made it (`_settle`): raised, the failure
                # (`LedgerClosed`, say) would tell its caller that nothing was written.
                if failure is not None and batch.failure is None and batch._fresh and all(
                        ticket.error is not None for ticket in batch._fresh):
                    batch.failure = failure
            if interrupt is not None:  # raised once the permits are back and the undecided tickets failed
                coordinator.fail_unstarted(late, interrupt)  # left for the mailboxes, never started: not in the release above
                for batch in group:
                    batch.interrupted(interrupt)
                raise interrupt
            coordinator.start_all(late)
        finally:
            for batch in group:
                batch.decided = True
