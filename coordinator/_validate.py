"""Request validation: pure, first, and before any id history is consulted."""

from __future__ import annotations

import re

from coordinator._errors import InvalidRequest
from coordinator._limits import AMOUNT_MAX, ID_LENGTH_MAX
from coordinator._values import TransferRequest

_CURRENCY = re.compile(r"[A-Z0-9]{1,16}")


def check_id(value: object, what: str) -> str:
    if type(value) is not str or not value or len(value) > ID_LENGTH_MAX or not _utf8(value):
        raise InvalidRequest(
            f"{what} must be a non-empty str of at most {ID_LENGTH_MAX} characters that UTF-8 can encode "
            f"(no lone surrogates), got {value!r:.80}"
        )
    return value


def _utf8(value: str) -> bool:
    """True if `value` encodes as UTF-8, as every id must (its index key is its UTF-8)."""
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate, say "\ud800"
        return False
    return True


def check_amount(value: object, what: str = "amount", minimum: int = 1) -> int:
    # `type(...) is int` refuses bool (a subclass of int) and int subclasses alike.
    if type(value) is not int or not minimum <= value <= AMOUNT_MAX:
        raise InvalidRequest(f"{what} must be an int in {minimum}..2**63-1, got {value!r:.80}")
    return value


def check_currency(value: object) -> str:
    if type(value) is not str or not _CURRENCY.fullmatch(value):
        raise InvalidRequest(f"currency must be 1-16 characters of A-Z and 0-9, got {value!r:.80}")
    return value


def check_overdraft_limit(value: object) -> int | None:
    if value is None:
        return None
    return check_amount(value, "overdraft_limit", minimum=0)


def check_transfer(request: object) -> TransferRequest:
    """Return the request if it is well formed; raise `InvalidRequest` saying what is wrong."""
    if type(request) is TransferRequest:  # the fast path: the checks below, in one expression
        tid, source, destination, amount = request.id, request.source, request.destination, request.amount
        if (
            type(tid) is str and type(source) is str and type(destination) is str and type(amount) is int
            and 0 < len(tid) <= ID_LENGTH_MAX and 0 < len(source) <= ID_LENGTH_MAX
            and 0 < len(destination) <= ID_LENGTH_MAX and 1 <= amount <= AMOUNT_MAX and source != destination
            and tid.isascii() and source.isascii() and destination.isascii()  # else `_utf8`, below
        ):
            return request
    if not isinstance(request, TransferRequest):
        raise InvalidRequest(f"expected a TransferRequest, got {type(request).__name__}")
    check_id(request.id, "transfer id")
    check_id(request.source, "source")
    check_id(request.destination, "destination")
    check_amount(request.amount)
    if request.source == request.destination:
        raise InvalidRequest(f"source and destination are the same account {request.source!r}")
    return request
