"""Idempotency in `tally serve` (as Stripe and Formance do it; README.md, "Serving over HTTP").

Every write takes an `Idempotency-Key` header (`KeyHeader`, read by `key_of`), which is the
id of what it writes (the transfer, the post or void, the account, a linked chain's first
leg). The ledger itself is idempotent by id: a retry with the same fields returns the original
outcome (the transfer, or the same refusal again), and one that differs raises
`IdempotencyConflict` (`AccountExists` for an account). A route asks what became of the key
before it submits (`outcome`, or `account` for an account) to know whether its answer is a
replay (`Idempotency-Replayed: true`); requests of one key are served one at a time in this
process (`KeyLocks`), so two concurrent requests of a key are an original and a replay
(`written`, which each write route of `engine._serve_routes` calls).

Runs on the server's event loop; `written` awaits the key's lock and the ledger, never blocks
the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Header, Request, Response
from fastapi.responses import JSONResponse

from engine import Account, IdempotencyConflict, InvalidRequest, LedgerError, Transfer, jsonable
from engine._serve_errors import REPLAYED, error_response, status_of

KeyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key",
    description="The id of what this writes (required); the same key and body again replays the answer.")]


class KeyLocks:
    """One `asyncio.Lock` per idempotency key in use, dropped once no request holds or waits
    for it (so it holds as many keys as there are requests in flight). Loop thread only."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def _created(value: Any, replayed: bool) -> JSONResponse:
    return JSONResponse(value, 201, headers={REPLAYED: "true"} if replayed else None)



def key_of(request: Request, header: str | None, body_id: str | None) -> str:
    """The request's idempotency key: the header, as UTF-8; `InvalidRequest` if it is missing,
    given more than once (which would be the id?), or the body names another id."""
    if header is None:
        raise InvalidRequest("the Idempotency-Key header is required: it is the id of what this request writes, "
                             "and a retry with the same key and body replays the answer")
    if len(request.headers.getlist("idempotency-key")) > 1:
        raise InvalidRequest("the Idempotency-Key header is given more than once: give it once, the id of what "
                             "this request writes")
    try:
        key = header.encode("latin-1").decode("utf-8")  # the header's bytes, as HTTP carries them
    except UnicodeError:
        raise InvalidRequest("the Idempotency-Key header is not UTF-8") from None
    if body_id is not None and body_id != key:
        raise InvalidRequest(f"the body's id {body_id!r} differs from the Idempotency-Key {key!r}: omit it, or "
                             "give the same")
    return key


async def written(request: Request, key: str, write: Callable[[], Awaitable[Account | Transfer | list[Transfer]]],
                   prior_of: Callable[[str], Awaitable[object]]) -> Response:
    """Run `write()` for `key` once the key's earlier requests are done: its answer, marked a
    replay when `prior_of(key)` found the key already had a durable outcome and the ledger
    gave that outcome again (not an `IdempotencyConflict`)."""
    async with request.app.state.keys.hold(key):
        prior = await prior_of(key)
        try:
            made = await write()
        except IdempotencyConflict as error:
            return error_response(error)
        except LedgerError as error:
            return error_response(error, replayed=prior is not None and _journaled(error), request=request)
        return _created(jsonable(made) if not isinstance(made, list) else {"transfers": jsonable(made)},
                        replayed=prior is not None)



def _journaled(error: LedgerError) -> bool:
    """Whether `error` is a refusal the journal keeps (so a retry is a replay), not an
    operating error (timeout, closed...) or an invalid request, which record nothing."""
    return status_of(error.code) in (404, 422)
