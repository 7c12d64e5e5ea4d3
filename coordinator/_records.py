"""Journal record encoding, and the index keys derived from records.

A record is a msgpack array whose first element is its kind. Format 3 writes:

    ACCOUNT4 [12, timestamp, account, currency, overdraft_limit, code, metadata]
        an account opened, at a timestamp of the same sequence as the transfers' (since
        point-in-time reads: before, ACCOUNT3 [5, account, currency, overdraft_limit, code,
        metadata], still read)
    TRANSFER3 [6, timestamp, linked, leg, leg...]
        leg: [kind, id, source, destination, amount, code, reference, metadata, timeout_s,
              pending_id, requested, source_seq, source_balance, destination_seq, destination_balance]
    PLAIN3 [10, timestamp, id, source, destination, amount, source_seq, source_balance,
            destination_seq, destination_balance]
        the common case written short: a TRANSFER3 of one single transfer with no code,
        reference or metadata (read back as that TRANSFER3: every reader sees one shape)
    REFUSAL3 [7, timestamp, linked, index, code, request, request...]
        request: the first 11 fields of a leg
    EXPIRY3 [8, timestamp, [pending_id, ...]]
    CHECKPOINT3 [9, last_timestamp, index_entries,
                 [[account, currency, overdraft_limit, code, metadata, opened_lsn, seq, posted, last_lsn], ...],
                 [[pending_id, source, destination, amount, deadline, lsn, code], ...]]
    CHECKPOINT5 [13, last_timestamp, index_entries, previous_lsn, accounts, sweep_next,
                 [row, ...], [pending, ...], pending_previous_lsn, [closed_id, ...], pendings_open,
                 pending_sweep_from]
        as a CHECKPOINT4, but the open pending transfers too only in part (see below); before
        it, CHECKPOINT4 [11, ... the first eight fields], every open pending transfer, still read

and formats 1 and 2 wrote (still read, never written):

    ACCOUNT [1, account, currency, overdraft_limit]
    COMMIT  [2, transfer, source, destination, amount,
             source_seq, source_balance, destination_seq, destination_balance]
    REJECT  [3, transfer, source, destination, amount, code]
    CHECKPOINT [4, [[account, currency, overdraft_limit, opened_lsn, seq, posted, last_lsn], ...]]

A TRANSFER3 record is one decision: a transfer, a post or a void of a pending transfer, or
every leg of a linked chain, all committed at once; the i-th leg's timestamp is the
record's plus i nanoseconds. A leg's kind is SINGLE, PENDING, POST or VOID; a single
transfer's and a post's legs carry both entries, stamped with their per-account seq and
balance, so replay re-derives them and checks they agree (house style 8); a pending
transfer's and a void's carry none (their stamps are 0). `requested` is the amount a post
asked for (None: all of it), `amount` what it moved. A REFUSAL3 is the refusal of a
request or a chain: `index` names the request refused, `code` why; every id in it is
consumed. An EXPIRY3 ends pending transfers whose deadline came.

A checkpoint is the projection after every record before it (the accounts, and the open
pending transfers); opening starts from the newest one (found through the checkpoints
index) and replays only the tail. A CHECKPOINT4 holds the rows of the accounts that changed
or opened since the checkpoint before it (`previous_lsn`), and of a slice of the rest taken
in creation order from `sweep_next`, at least as long as the changed ones: so it costs what
changed, not the size of the ledger, and every account has a row in the last few. Every other
account's row is that of the newest checkpoint before it that has one: opening walks back the
chain until it has `accounts` rows, which the sweep bounds by about twice the accounts. One
with `previous_lsn` 0 holds every account.

A CHECKPOINT5 does for the open pending transfers what a CHECKPOINT4 does for the accounts,
on a chain of its own (`pending_previous_lsn`: a checkpoint of a ledger of few accounts holds
every account, and need not hold every one of many open pending transfers): it holds those opened since
the checkpoint at `pending_previous_lsn`, and a slice of the rest in the order they were
opened, going on from where the last one's stopped (as large a part of them as it holds of
the accounts, and at least 1/16 of them, so the walk back is short; `pending_sweep_from` is
the LSN where the next one's starts: the first open at or after it); and it names the ones
closed (posted, voided or expired) since then. Opening walks that chain back, newest
first, taking each pending transfer's row unless a newer checkpoint named it closed, until it
has `pendings_open` of them: every row taken is of one open at the newest, so that many is
every one (the count is trusted, as the rows are: a replay checks both, `tally verify`). One with `pending_previous_lsn` 0 holds every open pending transfer (and the walk
stops there), as does a CHECKPOINT4 met on the way back.

`index_entries` counts the entries every record up to
this one added to the accounts, transfers and checkpoints indexes (see
`coordinator._recovery.check_index_counts`).

The entry index is a projection of the records, written in bulk behind each checkpoint for
the records before it (see `coordinator._entries`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

import msgpack

from coordinator._errors import JournalCorrupted
from coordinator._limits import KEY_BYTES_MAX
from coordinator._values import PENDING, POST, SINGLE, VOID, Request, TransferRequest

ACCOUNT = 1
COMMIT = 2
REJECT = 3
CHECKPOINT = 4
ACCOUNT3 = 5
TRANSFER3 = 6
REFUSAL3 = 7
EXPIRY3 = 8
CHECKPOINT3 = 9
PLAIN3 = 10
CHECKPOINT4 = 11
ACCOUNT4 = 12
CHECKPOINT5 = 13
KIND_NEWEST = CHECKPOINT5
"""The newest kind of record this version reads (a larger one is a newer version's)."""
LEG_FIELDS = 15
REQUEST_FIELDS = 11
RESOLUTION_MARK = b"\xfe"
"""The first byte of a transfers index key that names what resolved a pending transfer (its
id's key follows): never the first byte of UTF-8, nor `DIGEST_MARK`."""

ACCOUNTS_INDEX = "accounts"
TRANSFERS_INDEX = "transfers"
ENTRIES_INDEX = "entries"
CHECKPOINTS_INDEX = "checkpoints"
INDEX_NAMES = (ACCOUNTS_INDEX, TRANSFERS_INDEX, ENTRIES_INDEX, CHECKPOINTS_INDEX)

_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_pack = msgpack.Packer(use_bin_type=True).pack

DIGEST_MARK = b"\xff"
"""The first byte of an index key that is a digest: it never starts UTF-8."""


def id_key(identifier: str) -> bytes:
    """The index key of an id: its UTF-8, or a digest when too long for LMDB."""
    raw = identifier.encode()
    if len(raw) <= KEY_BYTES_MAX:
        return raw
    return DIGEST_MARK + hashlib.blake2b(raw, digest_size=32).digest()


def entry_prefix(account: str) -> bytes:
    key = id_key(account)
    return _U16.pack(len(key)) + key


ENTRY_SEQ_END = 2**64 - 1
"""Past every seq: `entry_key(account, ENTRY_SEQ_END)` ends the account's key range."""


def entry_key(account: str, seq: int) -> bytes:
    return entry_prefix(account) + _U64.pack(seq)


HOLDS_MARK = _U64.pack(ENTRY_SEQ_END)
"""After an account's entry key prefix, the start of its hold rows' keys: past every entry key
of the account (`entry_key(account, ENTRY_SEQ_END)` ends those), before the next account's."""


def holds_key(account: str, lsn: int) -> bytes:
    """The entry index key of the account's hold row for the record at `lsn`: what its pending
    transfers hold on it and bring it after that record (`encode_holds`). The records that
    change them (a pending transfer, a post, a void, an expiry) make hold rows, which reach the
    index as entries do, with the next checkpoint (`coordinator._entries`), so an account's
    hold rows in LSN order are the history of its pending amounts; `coordinator._asof` reads
    the one at or before an LSN."""
    return entry_prefix(account) + HOLDS_MARK + _U64.pack(lsn)


HOLDS_FROM_KEY = _U16.pack(0xFFFF) + b"holds-from"
"""The entry index key whose value is the LSN from which every record that changes an
account's pending amounts has its hold rows: the first record a release that makes them
appended to the ledger (1 for a ledger it made), with which it is written, beside a
*baseline* row (at LSN 0) for each account with pending amounts then: what the records before
the mark left them. No account's key starts like it (an id's key
is at most `KEY_BYTES_MAX` bytes), so it sorts after every account's rows."""


INDEXED_TO_KEY = _U16.pack(0xFFFF) + b"indexed-to"
"""The entry index key whose value is the LSN of the newest checkpoint whose entries and hold
rows the index holds (they are written behind the checkpoint, in slices: see
`coordinator._entries`). Absent, in a journal no release with slices wrote a checkpoint to:
the newest checkpoint's. It sorts after every account's rows, as `HOLDS_FROM_KEY` does."""


def is_entry_key(key: bytes) -> bool:
    """Whether an entry index key is an entry's (not a hold row's, nor a mark's)."""
    return key != INDEXED_TO_KEY and not is_hold_key(key)


def is_hold_key(key: bytes) -> bool:
    """Whether an entry index key is a hold row's or `HOLDS_FROM_KEY` (not an entry's)."""
    if key == HOLDS_FROM_KEY:
        return True
    end = 2 + int.from_bytes(key[:2], "big")
    return len(key) == end + 16 and key[end:end + 8] == HOLDS_MARK


def encode_holds(held: int, incoming: int) -> bytes:
    """A hold row's value: [held, incoming] after its record."""
    return _pack([held, incoming])


def lsn_value(lsn: int) -> bytes:
    return _U64.pack(lsn)


def value_lsn(value: bytes) -> int:
    return _U64.unpack(value)[0]


encode: Callable[[list[Any]], bytes] = _pack
"""A record's bytes (the packer itself, not a function around it: one frame less a record)."""


def encode_entry_value(transfer_id: str, amount: int, balance: int, lsn: int, timestamp: int | None) -> bytes:
    """An entry index value: [transfer, amount, balance, lsn, timestamp], or, for an entry of a
    format-1 or -2 commit (`timestamp` None), the four fields those wrote."""
    if timestamp is None:
        return _pack([transfer_id, amount, balance, lsn])
    return _pack([transfer_id, amount, balance, lsn, timestamp])


def request_fields(request: Request) -> list[Any]:
    """The fields a record keeps of a request (the first `REQUEST_FIELDS` of a leg)."""
    metadata = None if request.metadata is None else request.metadata.as_dict()  # type: ignore[attr-defined]
    if type(request) is TransferRequest:
        return [PENDING if request.pending else SINGLE, request.id, request.source, request.destination,
                request.amount, request.code, request.reference, metadata, request.timeout_s, None, None]
    return [VOID if request.void else POST, request.id, None, None, None, 0, request.reference,  # type: ignore[union-attr]
            metadata, None, request.pending_id, request.amount]  # type: ignore[union-attr]


def resolution_key(pending_id: str) -> bytes:
    """The transfers index key under which the LSN of what resolved `pending_id` is stored."""
    return RESOLUTION_MARK + id_key(pending_id)


def decode(lsn: int, payload: bytes) -> list[Any]:
    """Decode and shape-check one record; raise `JournalCorrupted` naming `lsn`. A plain leg
    comes back in the full form (every reader sees one shape of leg)."""
    try:
        record = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise JournalCorrupted(f"journal record at LSN {lsn} does not decode: {error}", lsn) from error
    if not isinstance(record, list) or not record or not _shaped(record):
        if isinstance(record, list) and record and type(record[0]) is int and record[0] > KIND_NEWEST:
            raise JournalCorrupted(f"journal record at LSN {lsn} is of kind {record[0]}, which this version of Tally "
                                   "does not read: written by a newer version? Open it with that one", lsn)
        raise JournalCorrupted(f"journal record at LSN {lsn} has an unknown shape", lsn)
    if record[0] == PLAIN3:
        _, timestamp, tid, source, destination, amount, *stamp = record
        return [TRANSFER3, timestamp, False, [0, tid, source, destination, amount, 0, None, None, None, None, None,
                                              *stamp]]
    return record



_ARITY = {ACCOUNT: 4, COMMIT: 9, REJECT: 6, CHECKPOINT: 2, ACCOUNT3: 6, ACCOUNT4: 7, EXPIRY3: 3, CHECKPOINT3: 5, PLAIN3: 10, CHECKPOINT4: 8,
          CHECKPOINT5: 12}
_LISTS = {TRANSFER3: (3, LEG_FIELDS), REFUSAL3: (5, REQUEST_FIELDS)}
"""Kinds of any length: (where the lists start, the length of each)."""


def _shaped(record: list[Any]) -> bool:
    kind = record[0]
    arity = _ARITY.get(kind)
    if arity is not None:
        return len(record) == arity
    shape = _LISTS.get(kind)
    if shape is None:
        return False
    start, fields = shape
    return len(record) > start and all(type(part) is list and len(part) == fields for part in record[start:])
