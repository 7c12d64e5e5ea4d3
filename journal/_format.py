"""Record framing: one version byte, a CRC-32, then the caller's payload.

The checksum covers the LSN as well as the payload, so a record copied under
another key fails verification just as a flipped byte does. Framing is checked
before a record is written (`frame_all` asserts its inputs) and again whenever it is
read back (`unframe`), the pair of checks of house style 8.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice, repeat
from operator import add

from journal._errors import JournalCorruptedError
from journal._limits import RECORD_VERSION

_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size
_LSN = struct.Struct(">Q")
_CRC = struct.Struct(">I")
_VERSION_BYTE = bytes((RECORD_VERSION,))


def lsn_key(lsn: int) -> bytes:
    """The big-endian key under which record `lsn` is stored (sorts in LSN order)."""
    return _LSN.pack(lsn)


def key_lsn(key: bytes) -> int:
    """Inverse of `lsn_key`."""
    return _LSN.unpack(key)[0]


def _checksum(lsn_bytes: bytes, version: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(lsn_bytes + bytes((version,))))


def frame_all(first_lsn: int, payloads: Sequence[bytes]) -> list[bytes]:
    """The LSN key and the framed record of each payload, flat (key, record, key, record...),
    at consecutive LSNs from `first_lsn`: what a group commit writes. The checksum is
    `_checksum`'s, computed inline."""
    assert first_lsn >= 1, first_lsn
    pack_lsn, pack_header, crc32, version = _LSN.pack, _HEADER.pack, zlib.crc32, _VERSION_BYTE
    framed: list[bytes] = []
    for lsn, payload in enumerate(payloads, first_lsn):
        assert type(payload) is bytes and payload, "a record carries a non-empty payload"
        key = pack_lsn(lsn)
        framed += (key, pack_header(RECORD_VERSION, crc32(payload, crc32(key + version))) + payload)
    return framed


def unframe_keyed(key: bytes, value: bytes, lsn: int) -> bytes:
    """`unframe` for a record read with its key (the LSN's bytes) at hand: the scan's fast path."""
    if len(value) > HEADER_SIZE and value[0] == RECORD_VERSION:
        payload = value[HEADER_SIZE:]
        if zlib.crc32(payload, zlib.crc32(key + _VERSION_BYTE)) == _CRC.unpack_from(value, 1)[0]:
            return payload
    return unframe(lsn, value)  # says precisely what is wrong


def unframe(lsn: int, value: bytes) -> bytes:
    """Verify a stored record and return its payload; raise `JournalCorruptedError` naming `lsn`."""
    if len(value) <= HEADER_SIZE:
        raise JournalCorruptedError(f"record is truncated ({len(value)} bytes)", lsn)
    version, crc = _HEADER.unpack_from(value)
    if version != RECORD_VERSION:
        raise JournalCorruptedError(f"unknown record version {version}", lsn)
    payload = bytes(value[HEADER_SIZE:])
    if _checksum(_LSN.pack(lsn), version, payload) != crc:
        raise JournalCorruptedError("checksum mismatch", lsn)
    return payload


def index_seed(name: str) -> int:
    """Where an index's entry checksums start: an entry copied into another index fails too."""
    return zlib.crc32(name.encode())


def frame_index_value(seed: int, key: bytes, value: bytes) -> bytes:
    """An index entry's value as stored (format 2 on): the value, then a CRC-32 of the index,
    the key and the value, so a flipped byte in the key or the value is found on reading."""
    return value + _CRC.pack(zlib.crc32(value, zlib.crc32(key, seed)))


def framed_pairs(seed: int, flat: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(key, value as stored) of each entry of `flat` (key, value, key, value...), each value
    framed as `frame_index_value` frames it. Lazy, and in maps rather than a Python call an
    entry: a checkpoint's hundreds of thousands of entries go through here, into `putmulti`.
    `flat` is iterated four times."""
    keys, values = islice(flat, 0, None, 2), islice(flat, 1, None, 2)
    sums = map(zlib.crc32, islice(flat, 1, None, 2), map(zlib.crc32, islice(flat, 0, None, 2), repeat(seed)))
    return zip(keys, map(add, values, map(_CRC.pack, sums)), strict=True)


def unframe_index_value(seed: int, name: str, key: bytes, stored: bytes) -> bytes:
    """Verify a stored index entry and return its value; raise `JournalCorruptedError`."""
    value = stored[:-_CRC.size]
    if len(stored) < _CRC.size or _CRC.unpack_from(stored, len(value))[0] != zlib.crc32(value, zlib.crc32(key, seed)):
        raise JournalCorruptedError(f"an entry fails its checksum (key {key[:64]!r})", where=f"the {name} index")
    return value


def unframe_index_values(seed: int, name: str, keys: list[bytes], stored: list[bytes]) -> list[bytes]:
    """`unframe_index_value` of a leaf's worth of entries at once (an open verifies every
    index entry: this is that loop, in maps rather than a call an entry)."""
    values = [value[:-_CRC.size] for value in stored]
    sums = list(map(_CRC.pack, map(zlib.crc32, values, map(zlib.crc32, keys, repeat(seed)))))
    if [value[-_CRC.size:] for value in stored] != sums:
        for key, value in zip(keys, stored, strict=True):
            unframe_index_value(seed, name, key, value)  # raises for the first bad one
    return values
