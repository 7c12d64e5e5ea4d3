"""`AsyncLedger.events`' iterator (`engine._async`): `engine._follow.follow_events`, with its
waits on the loop. A mixin: `AsyncLedger` is the only class that has it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from coordinator import Event, EventReader, LedgerClosed, ledger_error
from journal import Completion, JournalError

from engine._follow import FOLLOW_POLL_S
from engine._ledger import Ledger

FOLLOW_SLICE_S = 1.0
"""Longest one wait of an `events` follower before it looks again whether the ledger closed."""


class LoopFollowing:
    """Followers of the event stream, woken by the writer through the loop."""

    _ledger: Ledger
    _loop: asyncio.AbstractEventLoop
    _next_records: dict[int, asyncio.Future[None]]
    _wake: Callable[[asyncio.Future[None], Any, Completion], None]
    _on_worker: Any

    @property
    def _readonly(self) -> bool:
        return self._ledger._journal.readonly

    async def _follow(self, after_lsn: int, follow: bool, timeout_s: float | None) -> AsyncIterator[Event]:
        """`events`' iterator: `engine._follow.follow_events`, with the waits on the loop."""
        ledger, loop = self._ledger, self._loop
        reader = EventReader(ledger._journal, after_lsn)
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            try:
                chunk = await self._on_worker(self._read_chunk, reader)
            except LedgerClosed:
                if follow:
                    return
                raise
            for event in chunk:
                yield event
            if chunk and timeout_s is not None:
                deadline = loop.time() + timeout_s  # the time without a new event counts from here
            if not reader.caught_up:
                continue
            if not follow or ledger.closed or not await self._next_record(reader.after_lsn, deadline):
                return

    def _read_chunk(self, reader: EventReader) -> list[Event]:
        ledger = self._ledger
        with ledger._call():
            return reader.read(ledger._events_last_lsn())

    async def _next_record(self, after_lsn: int, deadline: float | None) -> bool:
        """Sleep until a record after `after_lsn` is durable; False once the ledger closed, or
        the loop's clock passed `deadline` without one. `LedgerUnavailable` if the journal
        failed (no record will come), as `Ledger.events` raises it."""
        ledger, loop = self._ledger, self._loop
        if self._readonly:  # another process writes it: poll
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(FOLLOW_POLL_S[1])
            return not ledger.closed
        future = self._record_after(min(after_lsn, ledger._journal.durable_lsn))  # (an LSN still to come: the next)
        while not future.done():
            wait_s = FOLLOW_SLICE_S if deadline is None else min(FOLLOW_SLICE_S, deadline - loop.time())
            if wait_s <= 0:
                return False
            await asyncio.wait((future,), timeout=wait_s)  # a timeout leaves nothing behind
            if ledger.closed:
                return False
        failure = ledger._journal.failure
        if isinstance(failure, JournalError):
            raise ledger_error(failure) from failure
        return not ledger.closed

    def _record_after(self, after_lsn: int) -> asyncio.Future[None]:
        """The future set once a record after `after_lsn` is durable (or the journal failed or
        closed), one per LSN for every follower waiting there."""
        waiting = self._next_records
        future = waiting.get(after_lsn)
        if future is not None:
            return future
        for lsn in [lsn for lsn, done in waiting.items() if done.done()]:
            del waiting[lsn]
        future = waiting[after_lsn] = self._loop.create_future()
        try:
            completion = self._ledger._journal.durable_completion(after_lsn + 1)
        except JournalError:
            completion = None  # failed: the follower finds the failure
        if completion is None or not completion.add_callback(partial(self._wake, future, None)):
            future.set_result(None)
        return future
