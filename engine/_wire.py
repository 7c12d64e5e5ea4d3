"""What crosses between the router and a shard's actor: plain tuples, not dataclasses.

Ray pickles a call's arguments and reply with cloudpickle, whose pickler is asked about every
object that is not a str, an int, a float, a bool or None: a `TransferRequest` or a `Transfer`
costs 2 to 3.5 us to pickle or unpickle, ~10 us a transfer for the round trip (about what the
shard spends deciding it). A tuple of plain values costs ~0.15 us. So requests and outcomes
travel as rows; a `LedgerError` travels as itself (rare, and it must keep its class).

A batch of rows travels as one msgpack blob (`pack`, `unpack`): Ray's own serializer
calls back into Python for each row of a list, ~5 us a row; one blob is one bytes object to
Ray, and msgpack's C code packs and unpacks a row in well under a microsecond. Inside a blob
a `LedgerError` is its pickle (bytes).

Rows: a request `(id, source, destination, amount, code, reference, metadata, pending,
timeout_s)`, a prepare `(None, id, source, peer, amount, code, reference, metadata)` (its
metadata the protocol's: `engine._shard_steps.prepare_row`), a credit (`engine._shard_steps.credit_row`),
and a transfer the 13 fields of `Transfer` in order; metadata as a plain dict or None.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from coordinator import LedgerError, Metadata, Transfer, TransferRequest, stamped_transfer, transfer_request

Row = tuple[Any, ...]
Outcome = Row | LedgerError


def plain_metadata(metadata: Mapping[str, str | int] | None) -> dict[str, str | int] | None:
    """Metadata as a row carries it: a plain dict (msgpack packs no `Metadata`), or None."""
    return None if metadata is None else dict(metadata)


def request_row(request: TransferRequest) -> Row:
    return (request.id, request.source, request.destination, request.amount, request.code, request.reference,
            plain_metadata(request.metadata), request.pending, request.timeout_s)


def request_of(row: Row) -> TransferRequest:
    return transfer_request(*row)


def transfer_row(transfer: Transfer) -> Row:
    return (transfer.id, transfer.source, transfer.destination, transfer.amount, transfer.lsn, transfer.timestamp,
            transfer.code, transfer.reference, plain_metadata(transfer.metadata), transfer.kind, transfer.pending_id,
            transfer.status, transfer.timeout_s)


def transfer_of(row: Row) -> Transfer:
    metadata = row[8]
    return stamped_transfer(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                            None if metadata is None else Metadata(metadata), row[9], row[10], row[11], row[12])


def outcome_rows(outcomes: Sequence[Transfer | LedgerError]) -> list[Outcome]:
    return [outcome if isinstance(outcome, LedgerError) else transfer_row(outcome) for outcome in outcomes]


def outcomes_of(rows: Sequence[Outcome]) -> list[Transfer | LedgerError]:
    return [row if isinstance(row, LedgerError) else transfer_of(row) for row in rows]


def pack(rows: Sequence[Row | LedgerError]) -> bytes:
    """Rows (an error among them pickled) as one msgpack blob."""
    return msgpack.packb([pickle.dumps(row) if isinstance(row, LedgerError) else row for row in rows])  # type: ignore[no-any-return]


def unpack(blob: bytes) -> list[Outcome]:
    """`pack`'s rows again, as tuples (a pickled error as the error)."""
    rows = msgpack.unpackb(blob, use_list=False)
    return [pickle.loads(row) if isinstance(row, bytes) else row for row in rows]


def unpack_rows(blob: bytes) -> list[Row]:
    """`pack`'s rows again, as tuples, for a blob of requests (no error among them)."""
    return list(msgpack.unpackb(blob, use_list=False))
