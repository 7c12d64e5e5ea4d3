"""`tally serve`'s routes: each one call of the public `AsyncLedger` API (README.md,
"Serving over HTTP").

Runs on the server's event loop; a route awaits the ledger and never blocks the loop.

Every write is idempotent by its `Idempotency-Key`, the id of what it writes
(`engine._serve_keys`: `key_of` reads it, `written` runs the write and marks a replay); the
router's route class takes only the query parameters a route declares and JSON bodies that
give no key twice, and a number in a query or a header is digits alone
(`engine._serve_strict`).
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator

from engine import (
    Account,
    AccountNotFound,
    AsyncLedger,
    InvalidRequest,
    LedgerClosed,
    Transfer,
    TransferRequest,
    jsonable,
)
from engine._serve_errors import ERRORS, RouteRefusesMethod, error_body, error_response
from engine._serve_events import event_stream
from engine._serve_keys import KeyHeader, key_of, written
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
from engine._serve_strict import StrictRoute, Whole, WholeOrNone, digits_alone, refuse_queries

_PostOrVoidBody = TypeVar("_PostOrVoidBody", PostBody, VoidBody)

ENTRIES_PAGE_MAX = 10_000
"""Most entries `GET /accounts/{id}/entries` returns at once (as `transfers`' page)."""
ENTRIES_PAGE_DEFAULT = 100

EntriesLimit = Annotated[int, Query(ge=0, le=ENTRIES_PAGE_MAX), BeforeValidator(digits_alone)]
"""(`Query` before the validator: after it, FastAPI would put its bounds in the OpenAPI
document as `ge` and `le`, not JSON Schema's `minimum` and `maximum`.)"""

router = APIRouter(route_class=StrictRoute)


def _ledger(request: Request) -> AsyncLedger:
    ledger: AsyncLedger = request.app.state.ledger
    return ledger


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


@router.post("/accounts", status_code=201, response_model=None,
             responses={201: {"model": AccountJSON}, **ERRORS})
async def create_account(request: Request, body: AccountBody, idempotency_key: KeyHeader = None) -> Response:
    """Open an account; the Idempotency-Key is its id. The same key and body again replays the
    answer; different parameters are 409 account_exists."""
    ledger = _ledger(request)
    key = key_of(request, idempotency_key, body.id)

    async def prior_of(account_id: str) -> Account | None:
        try:
            return await ledger.account(account_id)
        except AccountNotFound:
            return None

    return await written(request, key, lambda: ledger.create_account(
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
    refuse_queries(request, frozenset())
    return await account(request, account_id)


@router.post("/transfers", status_code=201, response_model=None,
             responses={201: {"model": TransferJSON}, **ERRORS})
async def transfer(request: Request, body: TransferBody, idempotency_key: KeyHeader = None) -> Response:
    """Move `amount` from `source` to `destination` (with `pending`, hold it); the
    Idempotency-Key is the transfer's id. Answers once the outcome is durable."""
    ledger = _ledger(request)
    key = key_of(request, idempotency_key, body.id)
    return await written(request, key, lambda: ledger.transfer(
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
    key = key_of(request, idempotency_key, body.legs[0].id)
    requests = [TransferRequest(key if i == 0 else leg.id if leg.id is not None else f"{key}.{i}", leg.source,
                                leg.destination, leg.amount, leg.code, leg.reference, leg.metadata, leg.pending,
                                leg.timeout_s)
                for i, leg in enumerate(body.legs)]
    return await written(request, key, lambda: ledger.transfer_linked(requests), ledger.outcome)


@router.post("/transfers/{pending_id:path}/post", status_code=201, response_model=None,
             responses={201: {"model": TransferJSON}, **ERRORS})
async def post_pending(request: Request, pending_id: str, body: PostBody | None = None,
                       idempotency_key: KeyHeader = None) -> Response:
    """Post `amount` (absent: all) of the pending transfer; the Idempotency-Key is the post's
    own transfer id. The body may be empty."""
    if not _spelled_out(request, "post"):  # POST /transfers/p%2Fpost: the transfer "p/post", which takes no POST
        raise RouteRefusesMethod("GET")
    ledger = _ledger(request)
    body = await _object_or_empty(request, body, PostBody())
    key = key_of(request, idempotency_key, body.id)
    return await written(request, key, lambda: ledger.post_pending(
        key, pending_id=pending_id, amount=body.amount, reference=body.reference, metadata=body.metadata),
        ledger.outcome)


@router.post("/transfers/{pending_id:path}/void", status_code=201, response_model=None,
             responses={201: {"model": TransferJSON}, **ERRORS})
async def void_pending(request: Request, pending_id: str, body: VoidBody | None = None,
                       idempotency_key: KeyHeader = None) -> Response:
    """Release the whole hold of the pending transfer; the Idempotency-Key is the void's own
    transfer id. The body may be empty."""
    if not _spelled_out(request, "void"):  # as for a post
        raise RouteRefusesMethod("GET")
    ledger = _ledger(request)
    body = await _object_or_empty(request, body, VoidBody())
    key = key_of(request, idempotency_key, body.id)
    return await written(request, key, lambda: ledger.void_pending(
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


@router.api_route("/health", methods=["GET", "HEAD"], response_model=None,  # (HEAD: a load balancer's check)
                  responses={200: {"model": HealthJSON}, 503: {"model": ErrorJSON}})
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
