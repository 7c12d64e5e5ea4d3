"""`AsyncLedger.close` (`engine._async`): which loop may close the ledger, and a close begun on
one loop waited for on another. A mixin: `AsyncLedger` is the only class that has it.

A close's task lives on the loop that began it, and only that loop can await it. The loop that
opened the ledger is the only one that may close it while it is open (only it wakes the writes
a close waits for); once it is closed, any loop may, and a close begun on a loop that ended
before it finished is begun again. A close from yet another loop while a close runs on a second
one waits for `Ledger.close`, which waits for the close that second loop began (or closes the
ledger itself if that close never reached it) and raises what that one raised; then it lets
go of what that close's task would let go of once the ledger closed (`_let_go`: the outbox, the
threads, the followers), as that loop may end before its task gets there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from coordinator import InvalidRequest, LedgerClosed, LedgerError, Ticket

from engine._ledger import Ledger


class LoopClosing:
    """`close` and its task (`AsyncLedger`'s)."""

    _ledger: Ledger
    _loop: asyncio.AbstractEventLoop
    timeout_s: float
    _closing: asyncio.Future[None] | None
    _outbox: dict[Ticket, float]
    _unsettled: set[Ticket]
    _settled: asyncio.Future[None] | None
    _decider: ThreadPoolExecutor
    _workers: ThreadPoolExecutor
    _next_records: dict[int, asyncio.Future[None]]
    _withdraw: Callable[[Ticket, LedgerError], bool]

    async def close(self) -> None:
        """`Ledger.close`, on a thread of its own: the writes under way finish (bounded by
        `timeout_s`), those in the outbox too; followers of `events` end. Idempotent: a second
        call waits for the first to finish, and raises what it raised. On another loop:
        `InvalidRequest` while the loop that opened it is open (only that loop wakes the writes
        it waits for); once that loop is closed, any loop closes it, without waiting for
        wake-ups that can no longer come, and a close on a third loop while a second loop's
        runs waits for that one (through `Ledger.close`: a task is awaited on its own loop only)."""
        running = asyncio.get_running_loop()
        if running is not self._loop and not self._loop.is_closed():
            raise InvalidRequest("an AsyncLedger is bound to the event loop that opened it: close it there")
        closing = self._closing
        if closing is None or (self._loop.is_closed() and closing.get_loop().is_closed() and (
                not closing.done() or closing.cancelled())):
            # (A close begun on a loop now closed, that loop's end cancelled or left pending: it
            # may never have reached `Ledger.close`, and nothing will finish it. This one does;
            # a `Ledger.close` that close had begun is waited for by this one's. That loop may
            # be the ledger's own or one that closed it after it, itself ended since.)
            self._closing = closing = asyncio.ensure_future(self._close())
        elif closing.get_loop() is not running and (not closing.done() or closing.cancelled()):
            # (A close under way on another loop, still running: its task cannot be awaited
            # here. `Ledger.close` waits for the one that close began, or begins it. That task
            # may never get to its own letting go (its loop may end before it has run, or while
            # it waits for its turn): this close lets go too, once the ledger is closed.)
            try:
                await asyncio.to_thread(self._ledger.close)
            finally:
                self._let_go()
            return
        await asyncio.shield(closing)

    async def _close(self) -> None:
        try:
            if self._unsettled and not self._loop.is_closed():  # writes made here complete first, those of
                # cancelled coroutines too (a closed loop wakes none of them: their outcomes are the journal's)
                self._settled = self._loop.create_future()
                await asyncio.wait((self._settled,), timeout=self.timeout_s)
            await asyncio.to_thread(self._ledger.close)
        finally:
            self._let_go()

    def _let_go(self) -> None:
        """What a close does once `Ledger.close` has returned (or raised): withdraw the tickets
        left in the outbox (only if the ledger could not drain them in time), shut the decider
        and the workers down, wake the followers. Never waits. Safe to run again, and on two
        threads at once (a close task on a second loop, and a close on a third that closed the
        ledger while that task had not: `close`): a ticket is withdrawn once (`_withdraw`), a
        shut-down is idempotent, and only a follower's future on a loop still open is set (the
        ledger's own: only a close on it runs while it is open; a closed one has nobody left
        to wake)."""
        for ticket in list(self._outbox):
            self._withdraw(ticket, LedgerClosed(f"the ledger closed before transfer {ticket.request.id!r} was "
                                                "submitted; nothing was written for it"))
        self._decider.shutdown(wait=False)
        self._workers.shutdown(wait=False)
        for future in list(self._next_records.values()):
            if not future.done() and not future.get_loop().is_closed():
                future.set_result(None)  # followers look again, and find the ledger closed
