"""Request validation: pure, first, and before any id history is consulted."""

from __future__ import annotations

import os
import re

from collections.abc import Callable, Mapping
from typing import Any

from coordinator._errors import InvalidRequest
from coordinator._limits import (
    AMOUNT_MAX,
    CODE_MAX,
    ID_LENGTH_MAX,
    LINKED_LEGS_MAX,
    METADATA_KEY_LENGTH_MAX,
    METADATA_KEYS_MAX,
    METADATA_VALUE_LENGTH_MAX,
    REFERENCE_LENGTH_MAX,
    TIMEOUT_S_MAX,
    TIMESTAMP_MAX,
)
from coordinator._values import Metadata, Resolution, TransferRequest

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


def seconds_of(value: object) -> int | float | None:
    """`value` as a plain int or float if it is a number of seconds one may give (an int or a
    float, a subclass read by its own value, not by methods of its own, which may raise); None
    for anything else, a bool included. NaN stays NaN: the caller's range check refuses it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return float.__float__(value)  # a subclass's value, whatever it overrides
    if isinstance(value, int):
        return int.__int__(value)
    return None


def items_of(sequence: object, what: str) -> list[Any]:
    """The items of a sequence the caller gave (already found to be one), read once into a
    list; `InvalidRequest` if reading it raises (its `__len__` and `__iter__` are the caller's
    code: an error of theirs is bad input, not ours)."""
    try:
        return list(sequence)  # type: ignore[call-overload]
    except Exception as error:
        raise InvalidRequest(f"{what}: its items could not be read ({shown(error)})") from None


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


def check_code(value: object) -> int:
    if type(value) is not int or not 0 <= value <= CODE_MAX:
        raise InvalidRequest(f"code must be an int in 0..{CODE_MAX}, got {shown(value)}")
    return value


def check_reference(value: object) -> str | None:
    if value is not None and (type(value) is not str or len(value) > REFERENCE_LENGTH_MAX or not _utf8(value)):
        raise InvalidRequest(f"reference must be None or a str of at most {REFERENCE_LENGTH_MAX} characters that "
                             f"UTF-8 can encode, got {shown(value)}")
    return value


def check_metadata(value: object) -> Metadata | None:
    """None, or the mapping as a read-only `Metadata` (a copy), if it is one metadata may be."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"metadata must be None or a mapping, got {type(value).__name__}")
    try:
        items = list(value.items())
    except Exception as error:  # a mapping whose items() raises is the caller's; say so, typed
        raise InvalidRequest(f"metadata could not be read: {error!r}") from error
    if not items:
        return None  # no metadata: the same as None, for a retry too
    if len(items) > METADATA_KEYS_MAX:
        raise InvalidRequest(f"metadata may have at most {METADATA_KEYS_MAX} keys, got {len(items)}")
    for key, item in items:
        if type(key) is not str or not 0 < len(key) <= METADATA_KEY_LENGTH_MAX or not _utf8(key):
            raise InvalidRequest(f"a metadata key must be a str of 1..{METADATA_KEY_LENGTH_MAX} characters that "
                                 f"UTF-8 can encode, got {shown(key)}")
        if type(item) is str:
            if len(item) > METADATA_VALUE_LENGTH_MAX or not _utf8(item):
                raise InvalidRequest(f"metadata value of {key!r} must be a str of at most {METADATA_VALUE_LENGTH_MAX} "
                                     f"characters that UTF-8 can encode, got {shown(item)}")
        elif type(item) is not int or not -AMOUNT_MAX <= item <= AMOUNT_MAX:
            raise InvalidRequest(f"metadata value of {key!r} must be a str or an int in ±(2**63-1), got {shown(item)}")
    return value if type(value) is Metadata else Metadata(dict(items))


def check_timeout(value: object, pending: bool) -> int | None:
    if value is None:
        return None
    if not pending:
        raise InvalidRequest("timeout_s is allowed only with pending=True")
    if type(value) is not int or not 1 <= value <= TIMEOUT_S_MAX:
        raise InvalidRequest(f"timeout_s must be None or an int in 1..{TIMEOUT_S_MAX}, got {shown(value)}")
    return value


def check_transfer(request: object) -> TransferRequest:
    """Return the request if it is well formed (its metadata made a read-only copy); raise
    `InvalidRequest` saying what is wrong."""
    if type(request) is TransferRequest:  # the fast path: the checks below, in one expression
        tid, source, destination, amount = request.id, request.source, request.destination, request.amount
        if (
            type(tid) is str and type(source) is str and type(destination) is str and type(amount) is int
            and 0 < len(tid) <= ID_LENGTH_MAX and 0 < len(source) <= ID_LENGTH_MAX
            and 0 < len(destination) <= ID_LENGTH_MAX and 1 <= amount <= AMOUNT_MAX and source != destination
            and tid.isascii() and source.isascii() and destination.isascii()  # else `_utf8`, below
            and type(request.code) is int and request.code == 0 and request.reference is None
            and request.metadata is None
        ):
            pending, timeout_s = request.pending, request.timeout_s
            if timeout_s is None:
                if pending is False or pending is True:
                    return request
            elif pending is True and type(timeout_s) is int and 1 <= timeout_s <= TIMEOUT_S_MAX:
                return request
    if not isinstance(request, TransferRequest):
        raise InvalidRequest(f"expected a TransferRequest, got {type(request).__name__}")
    tid, source, destination, amount = request.id, request.source, request.destination, request.amount
    code, reference, metadata, pending, timeout_s = (request.code, request.reference, request.metadata,
                                                     request.pending, request.timeout_s)
    check_id(tid, "transfer id")
    check_id(source, "source")
    check_id(destination, "destination")
    check_amount(amount)
    if source == destination:
        raise InvalidRequest(f"source and destination are the same account {source!r}")
    check_code(code)
    check_reference(reference)
    checked = check_metadata(metadata)
    if type(pending) is not bool:
        raise InvalidRequest(f"pending must be a bool, got {shown(pending)}")
    check_timeout(timeout_s, pending)
    if type(request) is not TransferRequest or checked is not metadata:  # go on with the values checked, read once
        return TransferRequest(tid, source, destination, amount, code, reference, checked, pending, timeout_s)
    return request


def check_resolution(request: Resolution) -> Resolution:
    """A post or void request, checked like `check_transfer` (metadata copied)."""
    tid, pending_id, amount = request.id, request.pending_id, request.amount
    if (  # the fast path: the checks below, in one expression
        type(tid) is str and type(pending_id) is str and 0 < len(tid) <= ID_LENGTH_MAX
        and 0 < len(pending_id) <= ID_LENGTH_MAX and tid.isascii() and pending_id.isascii()
        and (amount is None or (type(amount) is int and 1 <= amount <= AMOUNT_MAX))
        and request.reference is None and request.metadata is None
    ):
        return request
    check_id(request.id, "transfer id")
    check_id(request.pending_id, "pending_id")
    if request.amount is not None:
        check_amount(request.amount)
    check_reference(request.reference)
    checked = check_metadata(request.metadata)
    if checked is not request.metadata:
        return Resolution(request.id, request.pending_id, request.amount, request.reference, checked, request.void)
    return request


def check_chain(requests: object) -> list[TransferRequest]:
    """A linked chain: a non-empty list of at most `LINKED_LEGS_MAX` well-formed requests with
    distinct ids."""
    if isinstance(requests, (str, bytes)) or not isinstance(requests, (list, tuple)):
        raise InvalidRequest(f"transfer_linked takes a list of TransferRequest, got {type(requests).__name__}")
    requests = items_of(requests, "transfer_linked")
    if not 1 <= len(requests) <= LINKED_LEGS_MAX:
        raise InvalidRequest(f"a linked chain has 1..{LINKED_LEGS_MAX} transfers, got {len(requests)}")
    checked = [check_transfer(request) for request in requests]
    ids = {request.id for request in checked}
    if len(ids) != len(checked):
        raise InvalidRequest("the transfers of a linked chain must have distinct ids")
    return checked


def check_path(value: object) -> str:
    """A ledger directory's path as a str, checked before anything touches the disk: a str
    or an `os.PathLike` of one, not empty, without NUL, and one UTF-8 can encode (LMDB
    takes the path in UTF-8)."""
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise InvalidRequest(f"a path must be a str or an os.PathLike of str, got {type(value).__name__}")
    path = str.__str__(path)  # a plain str (LMDB refuses a subclass), its own text whatever `__str__` it has
    if not path or "\x00" in path or not _utf8(path):
        raise InvalidRequest(f"a path must be non-empty, without NUL, and UTF-8 (no undecodable bytes), "
                             f"got {shown(path)}")
    return path


def checked_clock(clock: Callable[[], int]) -> Callable[[], int]:
    """`clock`, refusing what is not nanoseconds since the epoch (an `int` in
    0..`TIMESTAMP_MAX`): a timestamp is journaled as one. A bad reading fails the decision it
    was for with `InvalidRequest`, and nothing bad is journaled."""

    def checked() -> int:
        try:
            now = clock()
        except Exception as error:  # a clock that fails: a bad reading too
            raise InvalidRequest(f"clock_ns must return an int of nanoseconds in 0..{TIMESTAMP_MAX}, but it raised "
                                 f"{error!r}") from error
        if type(now) is not int or not 0 <= now <= TIMESTAMP_MAX:
            raise InvalidRequest(f"clock_ns must return an int of nanoseconds in 0..{TIMESTAMP_MAX}, got {shown(now)}")
        return now

    return checked
