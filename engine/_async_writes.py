"""The write path of `AsyncLedger` (`engine._async`, whose module docstring has the data flow):
the outbox the loop fills, the rounds of the decider thread, and the wake-ups the writer's
group commits send back to the loop. A mixin: `AsyncLedger` is the only class that has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from coordinator import (
    LedgerClosed,
    LedgerError,
    LedgerTimeout,
    LedgerUnavailable,
    Ticket,
    ledger_error,
)
from journal import Completion, JournalError

from engine._ledger import Ledger

FLUSH_TICKETS_MAX = 16
"""Most tickets one round of the decider decides: it holds the interpreter meanwhile, and the
loop waits for it (16: ~0.3 ms; 64 measured a loop lag p99 three times as long)."""
WAKE_FUTURES_MAX = 16
"""Most coroutines one drain wakes: each then runs a step on the loop, so a group commit of
hundreds is woken over several turns of the loop, and a timer waits for a few at most."""
ADMISSION_RETRY_S = 0.001
"""Pause before a flush tries again when the ledger is at its bound of transfers in flight."""

logger = logging.getLogger("tally.engine")


class LoopWrites:
    """Writes decided off the loop and woken through it (`AsyncLedger`'s)."""

    _ledger: Ledger
    _loop: asyncio.AbstractEventLoop
    timeout_s: float

    def _start_writes(self) -> None:
        """Set up the write path (from `AsyncLedger.__init__`)."""
        self._outbox: dict[Ticket, float] = {}
        """Tickets claimed on the loop and not yet handed to the coordinator, in order, each with
        the loop time after which it is withdrawn if still here (`timeout_s` after its claim)."""
        self._unsettled: set[Ticket] = set()
        """Tickets claimed here whose outcome has not reached the loop yet (a cancelled
        coroutine's included): `close` lets them finish first."""
        self._settled: asyncio.Future[None] | None = None
        """Set once `_unsettled` empties, while `close` waits for it."""
        self._decider = ThreadPoolExecutor(1, thread_name_prefix="tally-async-decider")
        self._flushing = False
        """A flush is scheduled on the loop, or the decider is at work (it schedules the next)."""
        self._woken: deque[tuple[asyncio.Future[None], Ticket | None]] = deque()
        """Filled by the resolving thread (the writer's), emptied by `_drain` on the loop."""
        self._draining = False

    async def _run(self, ticket: Ticket) -> None:
        """Queue a fresh ticket for the next flush and sleep until it is durable."""
        future: asyncio.Future[None] = self._loop.create_future()
        ticket.add_callback(partial(self._wake, future, ticket))  # fresh: never resolved yet
        self._outbox[ticket] = self._loop.time() + self.timeout_s
        self._unsettled.add(ticket)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)
        try:
            async with asyncio.timeout(self.timeout_s):
                await future
        except TimeoutError:
            self._withdraw(ticket, LedgerTimeout(f"transfer {ticket.request.id!r} was not submitted within "
                                                 f"{self.timeout_s} s; nothing was written for it"))
            if ticket.done:  # withdrawn (now or by a flush), or decided meanwhile: `settle` says which
                return
            raise LedgerTimeout(f"transfer {ticket.request.id!r}: no durable outcome within {self.timeout_s} s; "
                                "retry with the same id") from None

    def _withdraw(self, ticket: Ticket, error: LedgerError) -> bool:
        """Take a ticket out of the outbox, if the flush has not handed it over yet: it is
        resolved with `error` (for anyone else waiting on its id) and its claim dropped.
        True if it was withdrawn (by this call: one step, `dict.pop`, so two threads letting go
        of the outbox at once, `LoopClosing._let_go`, never both withdraw it)."""
        if self._outbox.pop(ticket, None) is None:
            return False
        if ticket.resolve(error):
            self._ledger._coordinator.claims.abandon(ticket)
        return True

    def _flush(self) -> None:
        """Hand the outbox to the decider (step 2): as many tickets as permits allow, at most
        `FLUSH_TICKETS_MAX`; the decider's end schedules the next flush."""
        outbox = self._outbox
        coordinator = self._ledger._coordinator
        failure = self._ledger._journal.failure
        if failure is not None:  # nothing more will be written: fail the whole outbox now
            for ticket in list(outbox):
                self._withdraw(ticket, LedgerUnavailable(f"the journal cannot be written: {failure}"))
            self._flushing = False
            return
        admission = coordinator.admission
        tickets: list[Ticket] = []
        for ticket in outbox:
            if len(tickets) == FLUSH_TICKETS_MAX or not admission.try_admit(1):
                break
            tickets.append(ticket)
        if not tickets:  # at the bound of transfers in flight (or empty)
            now = self._loop.time()
            for ticket in [ticket for ticket, deadline in outbox.items() if deadline <= now]:
                self._withdraw(ticket, LedgerTimeout(f"transfer {ticket.request.id!r} was not submitted within "
                                                     f"{self.timeout_s} s; nothing was written for it"))
            if outbox:
                self._loop.call_later(ADMISSION_RETRY_S, self._flush)
            else:
                self._flushing = False
            return
        for ticket in tickets:
            del outbox[ticket]
        try:
            self._decider.submit(self._decide_round, tickets)
        except RuntimeError:  # shut down: the ledger closed under them
            admission.release(len(tickets))
            for ticket in tickets:
                coordinator.fail(ticket, LedgerClosed("the ledger closed"))
            self._flushing = False

    def _decide_round(self, tickets: list[Ticket]) -> None:
        """On the decider thread: decide `tickets` (`Coordinator.submit`), then have the loop
        flush what queued meanwhile."""
        coordinator = self._ledger._coordinator
        try:
            coordinator.submit(tickets)
        except BaseException as error:  # a bug must not strand the tickets' coroutines
            logger.exception("submitting %d transfers failed", len(tickets))
            for ticket in tickets:  # (a permit not given back is safer than one given back twice)
                coordinator.fail(ticket, error if isinstance(error, Exception) else RuntimeError(repr(error)))
        finally:
            try:
                self._loop.call_soon_threadsafe(self._flush_next)
            except RuntimeError:  # the loop is closed: nobody is left to flush for
                pass

    def _flush_next(self) -> None:
        if self._outbox:
            self._flush()
        else:
            self._flushing = False

    def _wake(self, future: asyncio.Future[None], ticket: Ticket | None, _completion: Completion) -> None:
        """A completion's callback (step 3), on the thread that resolved it. It schedules a
        drain unless one is scheduled (`_draining`); the drain clears that flag only once
        `_woken` is empty and then looks again, so an item appended beside it is never left
        behind (the GIL orders the appends and the flag's reads and writes)."""
        self._woken.append((future, ticket))
        if not self._draining:
            self._draining = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is left to wake
                pass

    def _drain(self) -> None:
        """Wake every coroutine whose completion was resolved (step 4), releasing claims."""
        woken = self._woken
        released: list[Ticket] = []
        for _ in range(min(len(woken), WAKE_FUTURES_MAX)):
            future, ticket = woken.popleft()
            if ticket is not None:
                released.append(ticket)
            if not future.done():  # a cancelled waiter's write still gets its claim released
                future.set_result(None)
        if woken:
            self._loop.call_soon(self._drain)  # the rest at the next turn
        else:
            self._draining = False  # before a look at `woken` by `_wake`: see its docstring
            if woken:  # appended meanwhile, by a waker that saw `_draining` still set
                self._draining = True
                self._loop.call_soon(self._drain)
        if released:
            self._ledger._coordinator.claims.release_many(released)
            self._unsettled.difference_update(released)
            if not self._unsettled and self._settled is not None and not self._settled.done():
                self._settled.set_result(None)

    async def _prior(self, claim: Any) -> Any:
        """What an id already has, once decided: its durable outcome, or its ticket in flight
        (another caller's) once that is durable."""
        if type(claim) is not Ticket:
            return claim
        if not claim.done:
            await self._completed(claim, f"transfer {claim.request.id!r} is still in flight; retry later")
        self._ledger._coordinator.claims.release(claim)
        return claim

    async def _durable(self, lsn: int) -> None:
        """Sleep until every record up to `lsn` is durable (bounded by `timeout_s`)."""
        try:
            completion = self._ledger._journal.durable_completion(lsn)
        except JournalError as error:
            raise ledger_error(error) from error
        if completion is None:
            return
        await self._completed(completion, f"LSN {lsn} not durable within {self.timeout_s} s")
        failure = completion.error
        if failure is not None:
            raise (ledger_error(failure) if isinstance(failure, JournalError) else failure) from failure

    async def _completed(self, completion: Completion, late: str) -> None:
        """Sleep until `completion` is resolved; `LedgerTimeout(late)` after `timeout_s`."""
        future: asyncio.Future[None] = self._loop.create_future()
        if not completion.add_callback(partial(self._wake, future, None)):
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await future
        except TimeoutError:
            raise LedgerTimeout(late) from None

