"""`tally serve`'s FastAPI application: the lifespan that opens the ledger, the guard in front
of every route (token, body size, requests in flight), and the handlers that make every
failure a JSON error (`engine._serve_errors`).

Imported by `engine._serve.make_app` only, once it knows FastAPI is installed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import AsyncLedger, LedgerError, __version__
from engine._serve_errors import RouteRefusesMethod, allowed_methods, error_body, error_response, status_of
from engine._serve_keys import KeyLocks
from engine._serve_routes import router

REQUESTS_IN_FLIGHT_MAX = 4_096
"""Most requests served at once (event streams included); one more is 503 `overloaded`."""
VALIDATION_ERRORS_SHOWN_MAX = 10
"""Most validation errors one 400 names (a linked chain of 1,000 bad legs would name 1,000)."""

BODY_READ_S = 30.0
"""Longest a request's body may take to arrive, from its headers on (shorter than the
graceful shutdown's wait, `engine._serve.GRACEFUL_SHUTDOWN_S`); then 408 `request_timeout`
and its place among the requests in flight is free again."""

BODY_READ_STOPPING_S = 1.0
"""Once the server is stopping, the longest a body still awaited may take (one on its way
arrives; a client that stalled is answered 503 and the stop goes on)."""

OPEN_PATHS = frozenset({"/health"})
"""Paths served without the bearer token, and whatever the requests in flight (a liveness
probe answers while the server is busy)."""

logger = logging.getLogger("tally.serve")

DESCRIPTION = """An HTTP JSON service on a Tally ledger (`tally serve`).

Every write takes an `Idempotency-Key` header: the id of what it writes. The same key and body
again return the original answer with `Idempotency-Replayed: true`; a different body under the
key is 409 `idempotency_conflict`. Amounts are JSON integers of minor units. Every error is
`{"error": {"code": ..., "message": ...}}`.
"""


class _BodyTooLarge(HTTPException):
    def __init__(self, body_bytes_max: int) -> None:
        super().__init__(413, f"the body is larger than this server's limit of {body_bytes_max:,} bytes")


class _BodyTooSlow(HTTPException):
    def __init__(self) -> None:
        super().__init__(408, f"the body did not arrive within {BODY_READ_S:g} s of the request's headers",
                         headers={"Connection": "close"})  # RFC 9110 15.5.9: the connection is done with


class _Stopping(HTTPException):
    def __init__(self) -> None:
        super().__init__(503, "the server is stopping and the body had not arrived: nothing was done, retry with "
                              "the same Idempotency-Key")


def stop_serving(app: FastAPI) -> None:
    """On the loop, once the server is told to stop: the event streams end (`stopping`), and
    a request still waiting for its body waits at most `BODY_READ_STOPPING_S` more (then 503),
    rather than holding the graceful shutdown for up to `BODY_READ_S`."""
    app.state.stopping.set()
    soon = app.state.body_deadline = asyncio.get_running_loop().time() + BODY_READ_STOPPING_S  # for later reads too
    for waiting in list(app.state.body_waits):
        when = waiting.when()
        if when is not None and when > soon:  # None: answered already, waiting only for the client to leave
            waiting.reschedule(soon)


def stopped_at_once(app: FastAPI, cut_short: int) -> str:
    """The line `tally serve` prints after a second Ctrl-C (`engine._serve.serve`): what it cut
    short, and whether the ledger closed."""
    ledger = getattr(app.state, "ledger", None)
    failure = app.state.shutdown_error
    if ledger is None:
        closed = "no ledger was open"
    elif ledger.closed and failure is None:
        closed = "the ledger closed"
    else:
        closed = f"the ledger was not closed cleanly{f': {failure}' if failure is not None else ''}"
    cancelled = (f"{cut_short} request{'s' if cut_short != 1 else ''} under way cancelled (a retry with the same "
                 "Idempotency-Key learns each outcome)" if cut_short else "no request was under way")
    return f"tally serve: stopped at once (a second Ctrl-C): {cancelled}; {closed}"


def _bearing(authorization: bytes, token: bytes) -> bool:
    """Whether an `Authorization` header's value is `Bearer <token>` (the scheme in any case,
    one or more spaces after it: RFC 9110 11.4)."""
    scheme, _, credentials = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.lstrip(b" "), token)


class Guard:
    """Pure ASGI middleware run before any route: the bearer token (every path but
    `OPEN_PATHS`, compared in constant time), the body limit (by `Content-Length` at once, and
    by the bytes read for a body without one), the time a body may take (`BODY_READ_S`), and
    the bound on requests in flight (but for `OPEN_PATHS`)."""

    def __init__(self, app: ASGIApp, token: str | None, body_bytes_max: int,
                 requests_in_flight_max: int = REQUESTS_IN_FLIGHT_MAX) -> None:
        self.app = app
        self.expected = None if token is None else token.encode()
        """The credentials after the scheme, `Bearer` in any case (RFC 9110 11.1: a scheme is
        case-insensitive), compared in constant time."""
        self.body_bytes_max = body_bytes_max
        self.requests_in_flight_max = requests_in_flight_max
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: Mapping[bytes, bytes] = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in OPEN_PATHS and not _bearing(
                headers.get(b"authorization", b""), self.expected):
            await _send_error(send, "unauthorized", "this server needs the header `Authorization: Bearer <token>` "
                                                    "with its token", [(b"www-authenticate", b"Bearer")])
            return
        if not _utf8_path(scope):
            await _send_error(send, "invalid_request", "the path is not UTF-8 once percent-decoded: an id in it "
                                                       "would be read as another")
            return
        if not _utf8(scope.get("query_string", b"")):
            await _send_error(send, "invalid_request", "the query is not UTF-8 once percent-decoded: an id in it "
                                                       "would be read as another")
            return
        length = headers.get(b"content-length", b"0")  # a malformed one never gets here: the HTTP parser refuses it
        if length.isdigit() and int(length) > self.body_bytes_max:
            await _send_error(send, "body_too_large", str(_BodyTooLarge(self.body_bytes_max).detail))
            return
        if self.in_flight >= self.requests_in_flight_max and scope["path"] not in OPEN_PATHS:
            await _send_error(send, "overloaded", f"this server is serving its limit of "
                                                  f"{self.requests_in_flight_max:,} requests at once: retry later")
            return
        received = 0
        deadline: float | None = asyncio.get_running_loop().time() + BODY_READ_S
        """Until the body is whole (after it, `receive` waits for the client to leave: no limit)."""
        state = getattr(scope.get("app"), "state", None)  # the application's, once its lifespan ran
        waits: set[asyncio.Timeout] | None = getattr(state, "body_waits", None)

        current: asyncio.Timeout | None = None
        """The bound of the body read under way, if one is."""

        async def counted() -> Message:
            nonlocal received, deadline, current
            if deadline is None:
                return await receive()
            stopping_by = getattr(state, "body_deadline", None)  # set by `stop_serving`
            waiting = asyncio.timeout_at(deadline if stopping_by is None else min(deadline, stopping_by))
            try:
                async with waiting:
                    current = waiting
                    if waits is not None:
                        waits.add(waiting)  # `stop_serving` cuts it short
                    try:
                        message = await receive()
                    finally:
                        current = None
                        if waits is not None:
                            waits.discard(waiting)
            except TimeoutError:
                if not waiting.expired():
                    raise
                stopped = getattr(state, "body_deadline", None) is not None  # read again: it may have come meanwhile
                raise (_Stopping() if stopped else _BodyTooSlow()) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.body_bytes_max:
                    raise _BodyTooLarge(self.body_bytes_max)
                if not message.get("more_body", False):
                    deadline = None
            return message

        async def answering(message: Message) -> None:
            nonlocal deadline
            if deadline is not None and message["type"] == "http.response.start":
                # Answered (an event stream, say, of a request that declared a body it never
                # sent): what `receive` waits for now is the client leaving, without a bound.
                deadline = None
                if current is not None and current.when() is not None and not current.expired():
                    current.reschedule(None)  # (the read runs in a task of its own: this is another)
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, counted, answering)
        finally:
            self.in_flight -= 1


def _utf8_path(scope: Scope) -> bool:
    """Whether the request's path, percent-decoded, is UTF-8 (the server decodes it with
    replacement characters: `/accounts/%FF` would name the account "\\ufffd")."""
    raw: bytes | None = scope.get("raw_path")
    if raw is None:  # a server that does not say: the decoded path is all there is
        return True
    return _utf8(raw.split(b"?", 1)[0])


def _utf8(raw: bytes) -> bool:
    """Whether `raw` (a path or a query), percent-decoded, is UTF-8."""
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _send_error(send: Send, code: str, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    response = JSONResponse(error_body(code, message), status_of(code))
    response.raw_headers.extend(headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def build_app(ledger_path: str, token: str | None, body_bytes_max: int, ledger_options: dict[str, Any]) -> FastAPI:
    """The application (see `engine._serve.make_app`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.stopping = asyncio.Event()
        app.state.body_waits = set()
        app.state.loop = asyncio.get_running_loop()
        app.state.keys = KeyLocks()
        try:
            opened = await AsyncLedger.open(ledger_path, **ledger_options)
        except LedgerError as error:
            app.state.startup_error = error
            raise
        app.state.ledger = opened
        try:
            yield
        finally:
            app.state.stopping.set()
            try:
                await opened.close()
            except LedgerError as error:
                app.state.shutdown_error = error
                raise

    # No redirect to the path without its trailing slash: a path that is no route is 404
    # not_found with a JSON error, as README says (the redirect was an empty 307).
    app = FastAPI(title="Tally", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  redirect_slashes=False)
    app.state.startup_error = None
    app.state.shutdown_error = None
    app.include_router(router)
    # Every route that takes methods, for a 405's `Allow` (`allowed_methods`): FastAPI keeps
    # the included router's own routes behind an object of its own.
    app.state.method_routes = (*(route for route in app.router.routes if getattr(route, "methods", None)),
                               *router.routes)
    app.add_exception_handler(LedgerError, _ledger_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(Guard, token=token, body_bytes_max=body_bytes_max)
    if token is not None:
        _declare_bearer(app)
    return app


def _declare_bearer(app: FastAPI) -> None:
    """Say in the OpenAPI document what `Guard` asks for: a bearer token on every route but
    the open ones (so generated clients send it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            for path in OPEN_PATHS:
                for operation in schema.get("paths", {}).get(path, {}).values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _ledger_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, LedgerError)
    return error_response(error)


async def _invalid(_request: Request, error: Exception) -> JSONResponse:
    """A body or a parameter of the wrong shape: 400 invalid_request naming each problem
    (never echoing the input)."""
    assert isinstance(error, RequestValidationError)
    found = error.errors()
    shown = "; ".join(_problem(each) for each in found[:VALIDATION_ERRORS_SHOWN_MAX])
    if len(found) > VALIDATION_ERRORS_SHOWN_MAX:
        shown += f"; and {len(found) - VALIDATION_ERRORS_SHOWN_MAX} more"
    return JSONResponse(error_body("invalid_request", shown), 400)


def _problem(found: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in found.get("loc", ()))
    if found.get("type") == "json_invalid":
        return f"the body is not valid JSON: {found.get('ctx', {}).get('error', 'decode error')}"
    if found.get("type") == "missing" and where == "body":
        return "a JSON body is required (with Content-Type: application/json)"
    if found.get("type") in ("model_type", "dict_type", "model_attributes_type") and where == "body":
        return "the body must be a JSON object, sent with Content-Type: application/json"
    return f"{where}: {found.get('msg', 'invalid')}"


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own refusals: no such route (404), a method the route has not (405), a
    body too slow (408) or too large (413) met while reading, or still awaited when the server
    stops (503 `ledger_closed`); anything else it raises is a bad request (400)."""
    assert isinstance(error, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "body_too_large",
            503: "ledger_closed"}.get(error.status_code, "invalid_request")
    raw: bytes | None = request.scope.get("raw_path")  # as sent: /transfers/p%2Fpost is not /transfers/p/post
    path = request.url.path if raw is None else raw.split(b"?", 1)[0].decode("ascii", "replace")
    message = {"not_found": f"no route {request.method} {path}",
               "method_not_allowed": f"{path} does not take {request.method}"}.get(code, str(error.detail))
    headers = error.headers
    if code == "method_not_allowed" and not isinstance(error, RouteRefusesMethod):  # Starlette's: its first route's
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return JSONResponse(error_body(code, message), status_of(code), headers=headers)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    """A bug: logged with its traceback; the client gets a JSON 500 that says nothing of it."""
    logger.error("unexpected error serving %s %s", request.method, request.url.path, exc_info=error)
    return JSONResponse(error_body("internal_error", "the server met an unexpected error; it is logged"), 500)
