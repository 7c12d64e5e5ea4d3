"""`tally serve`'s routes: each one call of the public `AsyncLedger` API (README.md,
"Serving over HTTP").

Runs on the server's event loop; a route awaits the ledger and never blocks the loop.

Idempotency (as Stripe and Formance do it): every write takes an `Idempotency-Key` header,
which is the id of what it writes (the transfer, the post or void, the account, a linked
chain's first leg). The ledger itself is idempotent by id: a retry with the same fields
returns the original outcome (the transfer, or the same refusal again), and one that differs
raises `IdempotencyConflict` (`AccountExists` for an account). A route asks what became of the
key before it submits (`outcome`, or `account` for an account) to know whether its answer is a
replay (`Idempotency-Replayed: true`); requests of one key are served one at a time in this
process (`KeyLocks`), so two concurrent requests of a key are an original and a replay.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from engine import (
    Account,
    AccountNotFound,
    AsyncLedger,
    IdempotencyConflict,
    InvalidRequest,
    LedgerClosed,
    LedgerError,
    Transfer,
    TransferRequest,
    jsonable,
)
from engine._serve_errors import ERRORS, REPLAYED, error_body, error_response, status_of
from engine._serve_events import event_stream
from engine._serve_models import (
    AccountBody,
    AccountJSON,
    BalanceJSON,
    EntriesJSON,
    ErrorJSON,
    HealthJSON,
    LinkedBody,
    PostBody,
    TransferBody,
    TransferJSON,
    TransfersJSON,
    VoidBody,
)

_PostOrVoidBody = TypeVar("_PostOrVoidBody", PostBody, VoidBody)

ENTRIES_PAGE_MAX = 10_000
"""Most entries `GET /accounts/{id}/entries` returns at once (as `transfers`' page)."""
ENTRIES_PAGE_DEFAULT = 100


def _digits_alone(value: Any) -> Any:
    """A number in a query or a header is ASCII decimal digits alone: pydantic's lax int would
    read `1_0` as 10, and `3.0`, `+3` or ` 3` as 3 (Python's `int` another script's digits
    too), a client's slip answered as if it had meant another number."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise PydanticCustomError("int_parsing", "Input should be a whole number in the digits 0-9 alone")
    return value


Whole = Annotated[int, BeforeValidator(_digits_alone)]
"""A query parameter's or a header's number."""
WholeOrNone = Annotated[int | None, BeforeValidator(_digits_alone)]
EntriesLimit = Annotated[int, Query(ge=0, le=ENTRIES_PAGE_MAX), BeforeValidator(_digits_alone)]
"""(`Query` before the validator: after it, FastAPI would put its bounds in the OpenAPI
document as `ge` and `le`, not JSON Schema's `minimum` and `maximum`.)"""

KeyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key",
    description="The id of what this writes (required); the same key and body again replays the answer.")]



def _refuse_queries(request: Request, known: frozenset[str]) -> None:
    """`InvalidRequest` for a query parameter not in `known`, or one given twice."""
    if not request.scope.get("query_string"):  # (most requests: nothing to look at)
        return
    given = [name for name, _ in request.query_params.multi_items()]
    names = set(given)
    unknown = sorted(names - known)
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s) {', '.join(map(repr, unknown))}: "
                             + (f"this route takes {', '.join(sorted(known))}" if known else "this route takes none"))
    if len(names) != len(given):
        repeated = sorted(name for name, count in Counter(given).items() if count > 1)
        raise InvalidRequest(f"query parameter(s) {', '.join(map(repr, repeated))} given more than once: give each once")


def _query_names(route: APIRoute) -> frozenset[str]:
    """The query parameters a route declares (its dependencies' too): found once, as its
    handler is made."""
    names: set[str] = set()
    waiting = [route.dependant]
    while waiting:
        dependant = waiting.pop()
        names.update(field.alias for field in dependant.query_params)
        waiting += dependant.dependencies
    return frozenset(names)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members as a dict, refusing a key given twice (a proxy or a log that
    reads the first of two `amount`s would record another amount than the ledger moved)."""
    members = dict(pairs)
    if len(members) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise json.JSONDecodeError(f"the key {name!r} is given more than once in an object", "", 0)
            seen.add(name)
    return members


class _StrictBody(Request):
    """A request whose JSON body may not give a key twice (`_unique_keys`)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_unique_keys)
        return self._json


class _StrictRoute(APIRoute):
    """A route that takes only the query parameters it declares, each once (a misspelt filter,
    `?acount=`, would otherwise be ignored, and the answer read as filtered when it is not;
    `/health` ignores its query, a probe's cache-buster), and reads its body as `_StrictBody`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        known = _query_names(self)
        checked = self.path != "/health"

        async def strict(request: Request) -> Response:
            if checked:
                _refuse_queries(request, known)
            return await handler(_StrictBody(request.scope, request.receive))

        return strict


router = APIRouter(route_class=_StrictRoute)


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


def _ledger(request: Request) -> AsyncLedger:
    ledger: AsyncLedger = request.app.state.ledger
    return ledger


def _key(request: Request, header: str | None, body_id: str | None) -> str:
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


async def _written(request: Request, key: str, write: Callable[[], Awaitable[Account | Transfer | list[Transfer]]],
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
            return error_response(error, replayed=prior is not None and _journaled(error))
        return _created(jsonable(made) if not isinstance(made, list) else {"transfers": jsonable(made)},
                        replayed=prior is not None)


def _spelled_out(request: Request, route: str) -> bool:
    """Whether the path's last segment, as the client sent it, is `route` (percent-encoded or
    not): routes match the decoded path, where `/accounts/x%2Fbalance`, the account
    "x/balance", looks like the balance route of the account "x"."""
    raw: bytes | None = request.scope.get("raw_path")
    if raw is None:  # a server that does not say: trust the decoded path
        return True
    path = raw.split(b"?", 1)[0]  # (a query, should a server leave it there: a path carries `?` encoded)
    return unquote_to_bytes(path.rsplit(b"/", 1)[-1]) == route.encode()


async def _object_or_empty(request: Request, body: _PostOrVoidBody | None, empty: _PostOrVoidBody) -> _PostOrVoidBody:
    """A post's or a void's body: `empty` for no body at all. FastAPI reads the JSON `null` as
    no body too, but it is not an object: it is refused as `[]` is (not read as a post of the whole
    amount)."""
    if body is not None:
        return body
    if await request.body():
        raise InvalidRequest("the body must be a JSON object, sent with Content-Type: application/json, or "
                             "empty")
    return empty


def _journaled(error: LedgerError) -> bool:
    """Whether `error` is a refusal the journal keeps (so a retry is a replay), not an
    operating error (timeout, closed...) or an invalid request, which record nothing."""
    return status_of(error.code) in (404, 422)


@router.post("/accounts", status_code=201, response_model=None,
             responses={201: {"model": AccountJSON}, **ERRORS})
async def create_account(request: Request, body: AccountBody, idempotency_key: KeyHeader = None) -> Response:
    """Open an account; the Idempotency-Key is its id. The same key and body again replays the
    answer; different parameters are 409 account_exists."""
    ledger = _ledger(request)
    key = _key(request, idempotency_key, body.id)

    async def prior_of(account_id: str) -> Account | None:
        try:
            return await ledger.account(account_id)
        except AccountNotFound:
            return None

    return await _written(request, key, lambda: ledger.create_account(
        key, currency=body.currency, overdraft_limit=body.overdraft_limit, code=body.code,
        metadata=body.metadata), prior_of)


@router.get("/accounts/{account_id:path}/balance", response_model=None,
            responses={200: {"model": BalanceJSON}, **ERRORS})
async def balance(request: Request, account_id: str, at_lsn: WholeOrNone = None,
                  at_timestamp: WholeOrNone = None) -> Response:
    """Its balance now, or after the record at `at_lsn`, or at `at_timestamp` (nanoseconds
    since the epoch): at most one of the two."""
    if not _spelled_out(request, "balance"):  # the account whose id ends in "/balance"
        return await _account_read_as_itself(request, f"{account_id}/balance")
    found = await _ledger(request).balance(account_id, at_lsn=at_lsn, at_timestamp=at_timestamp)
    return JSONResponse(jsonable(found))


@router.get("/accounts/{account_id:path}/entries", response_model=None,
            responses={200: {"model": EntriesJSON}, **ERRORS})
async def entries(request: Request, account_id: str, after: Whole = 0,
                  limit: EntriesLimit = ENTRIES_PAGE_DEFAULT) -> Response:
    """Its entries with seq > `after`, in seq order, at most `limit`; the next page is
    `after` = the last one's seq."""
    if not _spelled_out(request, "entries"):  # the account whose id ends in "/entries"
        return await _account_read_as_itself(request, f"{account_id}/entries")
    found = await _ledger(request).entries(account_id, after, limit)
    return JSONResponse({"entries": jsonable(found)})


@router.get("/accounts/{account_id:path}", response_model=None,
            responses={200: {"model": AccountJSON}, **ERRORS})
async def account(request: Request, account_id: str) -> Response:
    """The account."""
    return JSONResponse(jsonable(await _ledger(request).account(account_id)))


async def _account_read_as_itself(request: Request, account_id: str) -> Response:
    """`GET /accounts/{account_id}` of an account whose id ends in a route's name: that
    route's query parameters are not the account route's, which takes none."""
    _refuse_queries(request, frozenset())
    return await account(request, account_id)


@router.post("/transfers", status_code=201, response_model=None,
             responses={201: {"model": TransferJSON}, **ERRORS})
async def transfer(request: Request, body: TransferBody, idempotency_key: KeyHeader = None) -> Response:
    """Move `amount` from `source` to `destination` (with `pending`, hold it); the
    Idempotency-Key is the transfer's id. Answers once the outcome is durable."""
    ledger = _ledger(request)
    key = _key(request, idempotency_key, body.id)
    return await _written(request, key, lambda: ledger.transfer(
        key, source=body.source, destination=body.destination, amount=body.amount, code=body.code,
        reference=body.reference, metadata=body.metadata, pending=body.pending, timeout_s=body.timeout_s),
        ledger.outcome)


@router.post("/transfers/linked", status_code=201, response_model=None,
             responses={201: {"model": TransfersJSON}, **ERRORS})
async def transfer_linked(request: Request, body: LinkedBody, idempotency_key: KeyHeader = None) -> Response:
    """Apply the legs all or none, in order. The Idempotency-Key is the first leg's id
    (`legs[0].id` omitted or equal to it); a later leg `i` without an id gets `{key}.{i}`.
    A refusal is 422 linked_transfer_failed with the leg's `index` and its `cause`."""
    ledger = _ledger(request)
    key = _key(request, idempotency_key, body.legs[0].id)
    requests = [TransferRequest(key if i == 0 else leg.id if leg.id is not None else f"{key}.{i}", leg.source,
                                leg.destination, leg.amount, leg.code, leg.reference, leg.metadata, leg.pending,
                                leg.timeout_s)
                for i, leg in enumerate(body.legs)]
    return await _written(request, key, lambda: ledger.transfer_linked(requests), ledger.outcome)


@router.post("/transfers/{pending_id:path}/post", status_code=201, response_model=None,
             responses={201: {"model": TransferJSON}, **ERRORS})
async def post_pending(request: Request, pending_id: str, body: PostBody | None = None,
                       idempotency_key: KeyHeader = None) -> Response:
    """Post `amount` (absent: all) of the pending transfer; the Idempotency-Key is the post's
    own transfer id. The body may be empty."""
    if not _spelled_out(request, "post"):  # POST /transfers/p%2Fpost: the transfer "p/post", which takes no POST
        raise HTTPException(405, headers={"Allow": "GET"})
    ledger = _ledger(request)
    body = await _object_or_empty(request, body, PostBody())
    key = _key(request, idempotency_key, body.id)
    return await _written(request, key, lambda: ledger.post_pending(
        key, pending_id=pending_id, amount=body.amount, reference=body.reference, metadata=body.metadata),
        ledger.outcome)


@router.post("/transfers/{pending_id:path}/void", status_code=201, response_model=None,
             responses={201: {"model": TransferJSON}, **ERRORS})
async def void_pending(request: Request, pending_id: str, body: VoidBody | None = None,
                       idempotency_key: KeyHeader = None) -> Response:
    """Release the whole hold of the pending transfer; the Idempotency-Key is the void's own
    transfer id. The body may be empty."""
    if not _spelled_out(request, "void"):  # as for a post
        raise HTTPException(405, headers={"Allow": "GET"})
    ledger = _ledger(request)
    body = await _object_or_empty(request, body, VoidBody())
    key = _key(request, idempotency_key, body.id)
    return await _written(request, key, lambda: ledger.void_pending(
        key, pending_id=pending_id, reference=body.reference, metadata=body.metadata), ledger.outcome)


@router.get("/transfers", response_model=None, responses={200: {"model": TransfersJSON}, **ERRORS})
async def transfers(request: Request, account: str | None = None, code: WholeOrNone = None,
                    kind: Literal["single", "pending", "post", "void"] | None = None, after_lsn: Whole = 0,
                    until_lsn: WholeOrNone = None, limit: Whole = 100, reverse: bool = False) -> Response:
    """Durable transfers made by the records in (`after_lsn`, `until_lsn`], in LSN order
    (newest first with `reverse`), filtered; `limit` 1..10,000. The next page: `after_lsn` =
    the last one's lsn (backward: `until_lsn` = its lsn - 1)."""
    found = await _ledger(request).transfers(account=account, code=code, kind=kind, after_lsn=after_lsn,
                                             until_lsn=until_lsn, limit=limit, reverse=reverse)
    return JSONResponse({"transfers": jsonable(found)})


@router.get("/transfers/{transfer_id:path}", response_model=None,
            responses={200: {"model": TransferJSON}, **ERRORS})
async def get_transfer(request: Request, transfer_id: str) -> Response:
    """The transfer with its status as of now; 404 transfer_not_found if the id is unknown,
    still in flight, or was refused (the message says which refusal)."""
    found = await _ledger(request).outcome(transfer_id)
    if isinstance(found, Transfer):
        return JSONResponse(jsonable(found))
    message = f"no transfer {transfer_id!r}" if found is None else str(found)  # "... was refused: <code>"
    return JSONResponse(error_body("transfer_not_found", message), 404)


@router.get("/events", response_model=None, responses={
    200: {"content": {"text/event-stream": {}},
          "description": "one `id: <lsn>` and one `data: <event as JSON>` per event"}, **ERRORS})
async def events(request: Request, after_lsn: Whole = 0, follow: bool = True,
                 last_event_id: Annotated[WholeOrNone, Header(alias="Last-Event-ID")] = None) -> Response:
    """The ledger's events as Server-Sent Events, after `after_lsn`, or after the
    `Last-Event-ID` header's LSN (a reconnecting client's; it wins over `after_lsn`).
    Following by default: it waits for new events, with a comment line as a keep-alive; with
    `follow=false` it ends at the last durable event. An LSN past the last durable one is 400:
    a client's id from another ledger, or from before this one was restored from a copy, would
    otherwise wait there, then skip the events it never saw (`Ledger.events` reads it as nothing
    yet, for a follower in this process); a number that is no LSN (past 2**64-1) is 400 too."""
    if last_event_id is not None:
        after_lsn = last_event_id
    ledger = _ledger(request)
    end = (await ledger.head()).lsn
    if after_lsn > end:
        raise InvalidRequest(f"after LSN {after_lsn}: this ledger's last durable LSN is {end}")
    return await event_stream(request, ledger, after_lsn, follow)


@router.get("/health", response_model=None, responses={200: {"model": HealthJSON}, 503: {"model": ErrorJSON}})
async def health(request: Request) -> Response:
    """200 while the ledger is open and can write (no token needed); 503 once its journal has
    failed (a full disk), which refuses every write until the ledger is reopened: a
    supervisor restarts the server then."""
    ledger: AsyncLedger | None = getattr(request.app.state, "ledger", None)
    if ledger is None or ledger.closed:
        return error_response(LedgerClosed("the ledger is not open"))
    failure = ledger.failure
    if failure is not None:
        return error_response(failure)
    return JSONResponse({"status": "ok"})
