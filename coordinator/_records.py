"""Journal record encoding, and the index keys derived from records.

A record is a msgpack array whose first element is its kind:

    ACCOUNT [1, account, currency, overdraft_limit]
    COMMIT  [2, transfer, source, destination, amount,
             source_seq, source_balance, destination_seq, destination_balance]
    REJECT  [3, transfer, source, destination, amount, code]
    CHECKPOINT [4, [[account, currency, overdraft_limit, opened_lsn, seq, posted, last_lsn], ...]]

A CHECKPOINT is the account projection after every record before it; opening
starts from the newest one (found through the checkpoints index) and replays
only the tail.

A COMMIT carries both entries, stamped with their per-account seq and balance,
so replay re-derives them and checks they agree (house style 8). The entry index
is a projection of these records, written in bulk by each checkpoint for the
commits before it (see `coordinator._entries`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

import msgpack

from coordinator._errors import JournalCorrupted
from coordinator._limits import KEY_BYTES_MAX

ACCOUNT = 1
COMMIT = 2
REJECT = 3
CHECKPOINT = 4
KINDS = {ACCOUNT: "account", COMMIT: "commit", REJECT: "reject", CHECKPOINT: "checkpoint"}

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


def lsn_value(lsn: int) -> bytes:
    return _U64.pack(lsn)


def value_lsn(value: bytes) -> int:
    return _U64.unpack(value)[0]


encode: Callable[[list[Any]], bytes] = _pack
"""A record's bytes (the packer itself, not a function around it: one frame less a record)."""


def encode_entry_value(transfer_id: str, amount: int, balance: int, lsn: int) -> bytes:
    return _pack([transfer_id, amount, balance, lsn])


def decode(lsn: int, payload: bytes) -> list[Any]:
    """Decode and shape-check one record; raise `JournalCorrupted` naming `lsn`."""
    try:
        record = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise JournalCorrupted(f"journal record at LSN {lsn} does not decode: {error}", lsn) from error
    if not isinstance(record, list) or not record or record[0] not in _ARITY or len(record) != _ARITY[record[0]]:
        raise JournalCorrupted(f"journal record at LSN {lsn} has an unknown shape", lsn)
    return record


_ARITY = {ACCOUNT: 4, COMMIT: 9, REJECT: 6, CHECKPOINT: 2}
