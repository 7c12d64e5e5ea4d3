"""`tally serve`'s errors: every one is JSON `{"error": {"code": ..., "message": ...}}`.

`code` is the `LedgerError` code (README.md lists them), or one of the server's own:
`transfer_not_found`, `not_found` (no such route), `method_not_allowed`, `unauthorized`,
`request_timeout`, `body_too_large`, `headers_too_large`, `overloaded`, `internal_error`. The
status follows the code (`STATUS_BY_CODE`): 400 an invalid request, 404 an unknown account or transfer, 409 a
conflict, 422 a refusal, 503 the ledger cannot answer now (a retry with the same
Idempotency-Key learns the outcome).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from engine import LedgerError, LinkedTransferFailed
from engine._serve_models import ErrorJSON

STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "account_not_found": 404,
    "transfer_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "read_only_ledger": 405,  # (`make_app(path, readonly=True)` takes no write, ever: not one to retry, as a 503 is)
    "request_timeout": 408,
    "body_too_large": 413,
    "headers_too_large": 431,
    "account_exists": 409,
    "idempotency_conflict": 409,
    "currency_mismatch": 422,
    "insufficient_funds": 422,
    "balance_overflow": 422,
    "pending_transfer_not_found": 422,
    "pending_transfer_already_posted": 422,
    "pending_transfer_already_voided": 422,
    "pending_transfer_expired": 422,
    "exceeds_pending_amount": 422,
    "linked_transfer_failed": 422,
    "ledger_unavailable": 503,
    "timeout": 503,
    "ledger_closed": 503,
    "ledger_locked": 503,
    "journal_corrupted": 503,
    "overloaded": 503,
    "unauthorized": 401,
    "internal_error": 500,
}
"""The HTTP status of each error code; a `LedgerError` code not listed is a refusal, 422."""

REPLAYED = "Idempotency-Replayed"
"""The header that marks a replayed answer (its value is `true`)."""

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorJSON, "description": description} for status, description in (
        (400, "invalid request: a malformed body or parameter, a missing Idempotency-Key, a key and an id that "
              "disagree"),
        (401, "no valid bearer token (the server was given --token-file)"),
        (404, "unknown account or transfer"),
        (408, "the body did not arrive in time (request_timeout): nothing was done"),
        (409, "idempotency_conflict (the key was used for a different request) or account_exists"),
        (413, "body larger than the server's limit"),
        (431, "request line and headers larger than the server's limit (headers_too_large); the connection is "
              "closed"),
        (422, "refused: insufficient funds, currency mismatch, a pending transfer's state, a linked chain's leg"),
        (503, "the ledger is unavailable, closed, or timed out (retry with the same Idempotency-Key)"),
    )
}


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON of an error."""
    return {"error": {"code": code, "message": message, **extra}}


def error_response(error: LedgerError, replayed: bool = False, request: Request | None = None) -> JSONResponse:
    """The JSON answer to `error`: `{"error": {"code", "message"}}`, and for a refused linked
    chain the refused leg's `index` and its own refusal as `cause`. A `read_only_ledger` (405)
    names in `Allow` the reads its `request`'s path takes (none: empty)."""
    extra: dict[str, Any] = {}
    if isinstance(error, LinkedTransferFailed):
        extra = {"index": error.index, "cause": {"code": error.cause.code, "message": str(error.cause)}}
    headers = {REPLAYED: "true"} if replayed else {"Allow": "" if request is None else allowed_methods(
        request, reads_only=True)} if error.code == "read_only_ledger" else None
    return JSONResponse(error_body(error.code, str(error), **extra), status_of(error.code), headers=headers)


class RouteRefusesMethod(HTTPException):
    """A 405 a route raises itself, with the `Allow` it says (Starlette's own 405, which names
    only the first route of the path, is made whole by `allowed_methods`)."""

    def __init__(self, allow: str) -> None:
        super().__init__(405, headers={"Allow": allow})


def allowed_methods(request: Request, reads_only: bool = False) -> str:
    """The `Allow` of a 405 to `request`: the methods of every route whose path matches its
    path (Starlette's own names only the first such route's: `POST /transfers` would hide
    `GET /transfers`), with `reads_only` only GET and HEAD, sorted."""
    methods: set[str] = set()
    for route in request.app.state.method_routes:  # (set up by `engine._serve_app.build_app`)
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    if reads_only:
        methods &= {"GET", "HEAD"}
    return ", ".join(sorted(methods))


def status_of(code: str) -> int:
    """The HTTP status of an error code (an unlisted `LedgerError` code is a refusal: 422)."""
    return STATUS_BY_CODE.get(code, 422)
