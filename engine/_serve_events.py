"""`GET /events`: the ledger's event stream as Server-Sent Events.

One message per event: `id: <lsn>` and `data: <the Event as JSON>`, then a blank line, so a
browser's `EventSource` (or any SSE client) resumes after a reconnection from the
`Last-Event-ID` it sends. The stream runs on the server's loop: it awaits the ledger's async
iterator, which a follower sleeps in until the journal writer wakes it.

It ends when the client goes away, when the ledger closes, when the server begins to stop
(`app.state.stopping`: a stream that never ended would keep a graceful shutdown waiting for
ever), and, with `follow=false`, at the last durable event. A `LedgerError` met after the first
byte (a damaged record) ends it with an `event: error` message carrying the JSON error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from engine import AsyncLedger, Event, LedgerError
from engine._serve_errors import error_body, error_response
from engine import jsonable

KEEPALIVE_S = 15.0
"""Longest silence on a following stream: then a comment line, which keeps proxies from
closing it as idle and tells the server soon when the client has gone."""
FIRST_EVENT_WAIT_S = 0.05
"""How long the route waits for the first event before it starts the response: an error
(an `after_lsn` that is no LSN) is answered as a JSON error, not as a broken stream."""


def _message(event: Event) -> bytes:
    return f"id: {event.lsn}\ndata: {json.dumps(jsonable(event), separators=(',', ':'))}\n\n".encode()


async def event_stream(request: Request, ledger: AsyncLedger, after_lsn: int, follow: bool) -> Response:
    """The SSE response of the events after `after_lsn`. Raises the `LedgerError` of a bad
    `after_lsn` before any byte is sent."""
    iterator = ledger.events(after_lsn, follow=follow)  # InvalidRequest, LedgerClosed: raised here
    stopping: asyncio.Event = request.app.state.stopping
    first: asyncio.Task[Event] = asyncio.ensure_future(anext(iterator))
    await asyncio.wait((first,), timeout=FIRST_EVENT_WAIT_S)
    if first.done() and not first.cancelled():
        error = first.exception()
        if isinstance(error, LedgerError):
            await _close(iterator)
            return error_response(error)
    return StreamingResponse(_messages(iterator, first, stopping), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _messages(iterator: AsyncIterator[Event], pending: asyncio.Task[Event],
                    stopping: asyncio.Event) -> AsyncIterator[bytes]:
    stop = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            done, _ = await asyncio.wait((pending, stop), timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
            if pending in done:
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    return
                except LedgerError as error:
                    yield f"event: error\ndata: {json.dumps(error_body(error.code, str(error)))}\n\n".encode()
                    return
                yield _message(event)
                pending = asyncio.ensure_future(anext(iterator))
            elif stop in done:
                return
            else:
                yield b": keep-alive\n\n"
    finally:
        for task in (pending, stop):
            task.cancel()
        await asyncio.gather(pending, stop, return_exceptions=True)
        await _close(iterator)


async def _close(iterator: Any) -> None:
    """Close an async generator (ends a follower's wait at once)."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        try:
            await close()
        except (LedgerError, RuntimeError):  # a generator cancelled mid-read: nothing left to release
            pass
