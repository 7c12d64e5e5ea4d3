"""Request validation: pure, first, and before any id history is consulted."""

from __future__ import annotations

import os
import re

from coordinator._errors import InvalidRequest
from coordinator._limits import AMOUNT_MAX, ID_LENGTH_MAX
from coordinator._values import TransferRequest

_CURRENCY = re.compile(r"[A-Z0-9]{1,16}")


def shown(value: object) -> str:
    """`value` as an error message shows it: its repr, cut to 80 characters, and never an
    error of its own (an int of more than 4,300 digits has no repr; a subclass's may raise)."""
    if type(value) is int and value.bit_length() > 256:
        return f"an int of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # a repr that raises is the caller's bug; say what the value is instead
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def check_id(value: object, what: str) -> str:
    if type(value) is not str or not value or len(value) > ID_LENGTH_MAX or not _utf8(value):
        raise InvalidRequest(
            f"{what} must be a non-empty str of at most {ID_LENGTH_MAX} characters that UTF-8 can encode "
            f"(no lone surrogates), got {shown(value)}"
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
        raise InvalidRequest(f"{what} must be an int in {minimum}..2**63-1, got {shown(value)}")
    return value


def check_currency(value: object) -> str:
    if type(value) is not str or not _CURRENCY.fullmatch(value):
        raise InvalidRequest(f"currency must be 1-16 characters of A-Z and 0-9, got {shown(value)}")
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
    tid, source, destination, amount = request.id, request.source, request.destination, request.amount
    check_id(tid, "transfer id")
    check_id(source, "source")
    check_id(destination, "destination")
    check_amount(amount)
    if source == destination:
        raise InvalidRequest(f"source and destination are the same account {source!r}")
    if type(request) is not TransferRequest:  # a subclass: go on with the values checked, read once
        return TransferRequest(tid, source, destination, amount)
    return request


def check_path(value: object) -> str:
    """A ledger directory's path as a str, checked before anything touches the disk: a str
    or an `os.PathLike` of one, not empty, without NUL, and one UTF-8 can encode (LMDB
    takes the path in UTF-8)."""
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise InvalidRequest(f"a path must be a str or an os.PathLike of str, got {type(value).__name__}")
    if not path or "\x00" in path or not _utf8(path):
        raise InvalidRequest(f"a path must be non-empty, without NUL, and UTF-8 (no undecodable bytes), "
                             f"got {shown(path)}")
    return path
