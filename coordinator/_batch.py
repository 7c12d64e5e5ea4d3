"""`transfer_many`: many transfers, outcomes as if applied one after another.

A request depends on the latest earlier request in the list that shares an
account or its id. It starts only once those are decided (not yet durable), and
each decision is applied in the accounts' mailboxes before the next request on
the same account is queued there, so every request sees exactly the state its
predecessors left. Independent requests run at once. Decisions start their
dependents on whichever thread decided them, so a chain through one hot account
never bounces back to the caller. The caller wakes once, when the last record
of the batch is durable.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from coordinator._errors import LedgerError, LedgerTimeout
from coordinator._tickets import Prior, Ticket, lsn_of, result_of
from coordinator._validate import check_resolution, check_transfer
from coordinator._values import Request, Resolution, Transfer

if TYPE_CHECKING:
    from coordinator._coordinator import Coordinator

Result = Transfer | LedgerError
_DONE = -1


class Batch:
    def __init__(self, coordinator: Coordinator, requests: Sequence[Request], timeout_s: float) -> None:
        self._coordinator = coordinator
        self._requests = list(requests)
        self._deadline = time.monotonic() + timeout_s
        self._results: list[Prior | LedgerError | None] = [None] * len(self._requests)
        self._fresh: list[Ticket] = []
        self._lock = threading.Lock()
        self._ready: deque[int] = deque()
        self._pumping = False
        self._events: queue.SimpleQueue[tuple[int, Ticket | None]] = queue.SimpleQueue()
        self._waiting: list[int] = []
        self._dependents: list[list[int]] = []
        self._undecided = 0
        self._started = 0
        """Items taken from `_ready` to start: each one's permit goes back through its start
        (at once if its id had an outcome already, else once it is decided)."""
        self._stopped = False
        """An interrupt ended the run: nothing more is started."""

    def run(self) -> list[Result]:
        valid = self._plan()
        if valid:
            self._coordinator.admission.admit(valid, self._remaining())
            try:
                self._pump()
                self._await_decisions()
            except BaseException:  # a timeout, or an interrupt on the caller's thread
                self._stop(valid)
                raise
        return self._settle()

    def _stop(self, valid: int) -> None:
        """After an interrupt or a timeout: start nothing more, and give back the permits of
        the items never started (those started return theirs when decided)."""
        with self._lock:
            self._stopped = True
            never = valid - self._started
        if never:
            self._coordinator.admission.release(never)

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _plan(self) -> int:
        """Validate, and link each request to the earlier ones it must follow."""
        last: dict[tuple[int, str], int] = {}
        for i, request in enumerate(self._requests):
            self._dependents.append([])
            self._waiting.append(0)
            try:
                if type(request) is Resolution:
                    request = self._requests[i] = check_resolution(request)
                    keys = self._resolution_keys(request, i)
                else:
                    request = self._requests[i] = check_transfer(request)
                    keys = ((0, request.source), (0, request.destination), (1, request.id))
            except LedgerError as error:
                self._results[i] = error
                continue
            self._undecided += 1
            predecessors = set()
            for key in keys:
                before = last.get(key)
                if before is not None and before != i:  # (a post's id may be its pending transfer's: one key twice)
                    predecessors.add(before)
                last[key] = i
            for before in predecessors:
                self._dependents[before].append(i)
            self._waiting[i] = len(predecessors)
            if not predecessors:
                self._ready.append(i)
        return self._undecided

    def _resolution_keys(self, request: Resolution, i: int) -> tuple[tuple[int, str], ...]:
        """What a post or a void (item `i`) must follow: its own id, its pending transfer's,
        and that transfer's accounts: as open now, or as an earlier item of the batch makes
        it (the newest such item: list order decides which one a post meets)."""
        found: object = self._coordinator.sequencer.pending.get(request.pending_id)
        for earlier in reversed(self._requests[:i]):
            if type(earlier) is not Resolution and earlier.id == request.pending_id:
                found = earlier
                break
        accounts = () if found is None else ((0, found.source), (0, found.destination))  # type: ignore[attr-defined]
        return ((1, request.id), (1, request.pending_id), *accounts)

    def _pump(self) -> None:
        """Start every ready request. One thread pumps at a time; others just enqueue."""
        with self._lock:
            if self._pumping:
                return
            self._pumping = True
        while True:
            with self._lock:
                if not self._ready or self._stopped:
                    self._pumping = False
                    return
                i = self._ready.popleft()
                self._started += 1  # with the pop: `_stop` counts it, or it is never popped
            self._start(i)

    def _start(self, i: int) -> None:
        coordinator = self._coordinator
        claim, fresh = coordinator.claims.claim(self._requests[i])
        if fresh:
            assert isinstance(claim, Ticket)
            claim.on_decided = partial(self._decided, i)
            self._fresh.append(claim)
            coordinator.start(claim)  # its permit returns when it is decided
            return
        coordinator.admission.release(1)
        if isinstance(claim, Ticket) and claim.value is None and not claim.done:
            self._events.put((i, claim))  # another caller's transfer in flight: the caller waits
            return
        self._decided(i, claim)

    def _decided(self, i: int, outcome: Prior) -> None:
        with self._lock:
            self._results[i] = outcome
            self._undecided -= 1
            for j in self._dependents[i]:
                self._waiting[j] -= 1
                if self._waiting[j] == 0:
                    self._ready.append(j)
            done = self._undecided == 0
        if done:
            self._events.put((_DONE, None))
        else:
            self._pump()

    def _await_decisions(self) -> None:
        while True:
            try:
                i, ticket = self._events.get(timeout=self._remaining())
            except queue.Empty:
                raise LedgerTimeout("transfer_many: not every transfer was decided in time; retry with the same ids") from None
            if i == _DONE:
                return
            assert ticket is not None
            if not ticket.wait(self._remaining()):
                raise LedgerTimeout(f"transfer {ticket.request.id!r} is still in flight elsewhere; retry later")
            self._decided(i, ticket)

    def _settle(self) -> list[Result]:
        journal = self._coordinator.journal
        for result in self._results:  # a ticket found stamped may still fail to be journaled: wait for it
            if type(result) is Ticket and not result.done and not result.wait(self._remaining()):
                raise LedgerTimeout(f"transfer {result.request.id!r} is not durable yet; retry with the same ids")
        # A ticket the journal failed (closed, say, under a batch cut short) may carry the LSN it
        # was stamped at, which will never be durable: its item answers its error, unwaited.
        lsns = [lsn_of(result) for result in self._results if type(result) is not Ticket or result.error is None]
        journal.wait_durable(max(lsns, default=0), self._remaining())
        for ticket in self._fresh:
            if ticket.wait(self._remaining()):
                self._coordinator.claims.release(ticket)
        return [result_of(request, result) for request, result in zip(self._requests, self._results, strict=True)]
