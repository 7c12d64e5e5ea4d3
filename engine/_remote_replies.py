"""What a reply of `tally serve` means to `RemoteLedger` (`engine._remote`): the errors it
raises beyond a `Ledger`'s (`ServerOverloaded`, `UnexpectedReply`, `ServerUnreachable`,
`NotSent`), the codes and statuses the HTTP contract allows, and `ReplyChecks`, the client's
base class, which reads a reply's JSON into the engine's values, turns an error body into the
`LedgerError` it names, and keeps what breaks the contract in `faults`.

Its neighbours: `engine._remote` (`RemoteLedger`: the `Ledger` methods, each one request, and
sending it, `_send`), `engine._serve_errors`, `engine._serve_routes` and `engine._serve_keys`
(the server side of the same contract). Nothing here blocks or sends anything; `ReplyChecks`
takes the client's lock only to count a fault or note a key answered.

Errors: a `{"error": {"code", "message"}}` reply is raised as the `LedgerError` subclass of its
code (`LinkedTransferFailed` with its `index` and `cause`), so a caller catches what it catches
from a `Ledger`. What the contract does not allow is raised as `UnexpectedReply` and kept in
`faults`: a status that does not fit the code, an unknown code, a body that is not the
documented JSON, a 5xx without an error body. A write sent again after a 2xx answer or a
journaled refusal (one of `REJECTIONS`, or a refused chain), whose reply is not marked
`Idempotency-Replayed: true`, is kept in `faults` (its reply is still returned or raised). A
request that gets no answer (refused or broken connection, no reply in `timeout_s`) raises
`ServerUnreachable`: the outcome of a write is unknown, and resending the same id tells it.
"""

from __future__ import annotations

import threading
from dataclasses import fields
from typing import Any, TypeVar

import httpx

from coordinator import (
    REJECTIONS,
    Account,
    AccountExists,
    AccountNotFound,
    Balance,
    Entry,
    IdempotencyConflict,
    InvalidRequest,
    JournalCorrupted,
    LedgerClosed,
    LedgerError,
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    LinkedTransferFailed,
    Metadata,
    PendingTransferNotFound,
    Transfer,
)

FAULTS_KEPT_MAX = 20
"""Faults described in `faults`; beyond it they are only counted (`fault_count`)."""
BODY_SHOWN_CHARS = 200


class ServerOverloaded(LedgerError):
    """503 `overloaded`: the server turned the request away before it reached the ledger.
    Nothing was written; send it again later."""

    code = "overloaded"


class UnexpectedReply(LedgerError):
    """The server answered outside its HTTP contract (see the module docstring). The outcome of
    a write is unknown; the reply is described in the message."""

    code = "unexpected_reply"


class ServerUnreachable(LedgerError):
    """No answer: the connection was refused or broke, or no reply came in time. The outcome of
    a write is unknown: send it again with the same id to learn it."""

    code = "server_unreachable"
    nothing_sent = False


class NotSent(ServerUnreachable):
    """No connection could be made: nothing was sent, so nothing was written (a server down, or
    restarting). Sending it again is a new try, not a question about a first one."""

    nothing_sent = True


_ERRORS: dict[str, type[LedgerError]] = {
    **REJECTIONS,
    **{cls.code: cls for cls in (InvalidRequest, AccountExists, IdempotencyConflict, LedgerTimeout, LedgerUnavailable,
                                 LedgerClosed, LedgerLocked, JournalCorrupted, ServerOverloaded)},
}
"""The error classes a reply's code names (`LinkedTransferFailed` is built apart: it has a cause)."""
_STATUSES: dict[str, frozenset[int]] = {
    **{code: frozenset({422}) for code in REJECTIONS},
    AccountNotFound.code: frozenset({404, 422}),
    PendingTransferNotFound.code: frozenset({404, 422}),
    LinkedTransferFailed.code: frozenset({422}),
    InvalidRequest.code: frozenset({400, 413, 422}),
    AccountExists.code: frozenset({409}),
    IdempotencyConflict.code: frozenset({409}),
    LedgerTimeout.code: frozenset({503}),
    LedgerUnavailable.code: frozenset({503}),
    LedgerClosed.code: frozenset({503}),
    LedgerLocked.code: frozenset({503}),
    JournalCorrupted.code: frozenset({503}),
    ServerOverloaded.code: frozenset({503}),
}
"""The statuses issue 16 allows for each code: 400 invalid, 404 unknown account or transfer, 409
conflicts, 422 business refusals, 503 unavailable or timed out. The server's own codes for what
this client never sends (an unknown route, a body too large) or must never meet (500
`internal_error`) are outside the contract here."""

_Value = TypeVar("_Value", Account, Balance, Entry, Transfer)

class ReplyChecks:
    """The reading of replies of `RemoteLedger` (see the module docstring); `RemoteLedger`
    holds what they read and count."""

    _lock: threading.Lock
    _answered: set[str]
    faults: list[str]
    fault_count: int

    def _check_replay(self, key: str, response: httpx.Response, where: str) -> None:
        """Note `key` answered; a fault if it was answered before and this reply is not marked a replay."""
        with self._lock:
            again = key in self._answered
            self._answered.add(key)
        if again and response.headers.get("Idempotency-Replayed", "").lower() != "true":
            self._fault(f"{where}: the write keyed {key!r} was answered before, and its replay is not marked"
                        " Idempotency-Replayed: true")

    def _json(self, response: httpx.Response, where: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise self._unexpected(f"{where}: {response.status_code} with a body that is not JSON: "
                                   f"{response.text[:BODY_SHOWN_CHARS]!r}") from None

    def _error(self, response: httpx.Response, where: str) -> LedgerError:
        status = response.status_code
        data = self._json(response, where)
        error = data.get("error") if isinstance(data, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(code, str) or not isinstance(message, str):
            return self._unexpected(f"{where}: {status} without an error body {{\"error\": {{\"code\", \"message\"}}}}:"
                                    f" {response.text[:BODY_SHOWN_CHARS]!r}")
        if status not in _STATUSES.get(code, ()):
            known = "an unknown code" if code not in _STATUSES else f"not a status for {code!r}"
            return self._unexpected(f"{where}: {status} {code!r} ({known}): {message}")
        assert isinstance(error, dict)
        if code == LinkedTransferFailed.code:
            return self._linked_failure(error, message, where)
        return _ERRORS[code](message)

    def _linked_failure(self, error: dict[str, Any], message: str, where: str) -> LedgerError:
        index, cause = error.get("index"), error.get("cause")
        cause_code = cause.get("code") if isinstance(cause, dict) else None
        if not isinstance(index, int) or cause_code not in REJECTIONS:
            return self._unexpected(f"{where}: a linked_transfer_failed error without an index and a cause:"
                                    f" {error!r}")
        assert isinstance(cause, dict) and isinstance(cause_code, str)
        return LinkedTransferFailed(message, index, REJECTIONS[cause_code](str(cause.get("message", ""))))

    def _read(self, cls: type[_Value], data: Any) -> _Value:
        try:
            return _value(cls, data)
        except UnexpectedReply as error:
            self._fault(str(error))
            raise

    def _rows(self, data: Any, name: str) -> list[Any]:
        try:
            return _listed(data, name)
        except UnexpectedReply as error:
            self._fault(str(error))
            raise

    def _unexpected(self, description: str) -> UnexpectedReply:
        self._fault(description)
        return UnexpectedReply(description)

    def _fault(self, description: str) -> None:
        with self._lock:
            self.fault_count += 1
            if len(self.faults) < FAULTS_KEPT_MAX:
                self.faults.append(description)

class Missing(Exception):
    """A 404 that `get_transfer` answers as None."""

def _listed(data: Any, name: str) -> list[Any]:
    """The list a reply holds under `name` (`{"entries": [...]}`)."""
    rows = data.get(name) if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise UnexpectedReply(f"expected a list of {name}, got {str(data)[:BODY_SHOWN_CHARS]!r}")
    return rows


def _value(cls: type[_Value], data: Any) -> _Value:
    """The `cls` a reply's JSON object describes (fields by name; extra fields ignored)."""
    if not isinstance(data, dict):
        raise UnexpectedReply(f"expected a JSON object of {cls.__name__}, got {str(data)[:BODY_SHOWN_CHARS]!r}")
    names = {f.name for f in fields(cls)}
    given = {name: value for name, value in data.items() if name in names}
    if given.get("metadata") is not None:
        given["metadata"] = Metadata(given["metadata"])
    try:
        return cls(**given)
    except TypeError as error:
        raise UnexpectedReply(f"a {cls.__name__} reply lacks a field ({error}): {str(data)[:BODY_SHOWN_CHARS]!r}") \
            from None
