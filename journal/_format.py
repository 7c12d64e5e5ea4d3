"""Record framing: one version byte, a CRC-32, the chain digest (version 2), then the payload.

Two record versions are read:

- version 1 (formats 1-3, before the chain): `version | crc32 | payload`;
- version 2 (every record written by this code): `version | crc32 | digest | payload`, where
  `digest` (32 bytes) is the record's link in the journal's hash chain:
  `digest_n = SHA-256(digest_{n-1} || LSN key_n || payload_n)`, and `digest_{n-1}` is
  `GENESIS` (32 zero bytes) for the first chained record (LSN 1 of a format-4 ledger, or the
  first record this code wrote into an older one).

The checksum covers the LSN, the version and the digest as well as the payload, so a record
copied under another key fails verification just as a flipped byte does. A CRC catches a
flipped bit, not a rewrite: anyone with the file can recompute it. The digest is what makes
a rewrite evident: changing, deleting or reordering a record changes every digest from it
on, so the chain no longer reaches the head an auditor noted (`journal._chain`). Reads check
the CRC only (cheap); the chain is walked by `Journal.verify_chain` (`tally verify`).

Why SHA-256: it is a cryptographic hash (no one can make two records with one digest), in
the standard library, and on these inputs (a digest, a key and a 100-300 byte payload) the
faster of the two candidates here: measured with `hashlib` on this machine (OpenSSL 3.0 with
the SHA extensions), 285-363 ns a record against BLAKE2b-256's 405-467 ns. (Without SHA
instructions in the CPU, BLAKE2b would win; the format names one hash, so it stays SHA-256.)

Framing is checked before a record is written (`frame_all` asserts its inputs) and again
whenever it is read back (`unframe`), the pair of checks of house style 8.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice, repeat
from operator import add

from journal._errors import JournalCorruptedError
from journal._limits import RECORD_VERSION, RECORD_VERSION_UNCHAINED

_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size
"""Bytes before the payload of an unchained (version 1) record."""
DIGEST_SIZE = 32
CHAINED_HEADER_SIZE = HEADER_SIZE + DIGEST_SIZE
"""Bytes before the payload of a chained (version 2) record."""
GENESIS = bytes(DIGEST_SIZE)
"""The digest the first chained record links to."""
_LSN = struct.Struct(">Q")
_CRC = struct.Struct(">I")
_VERSION_BYTE = bytes((RECORD_VERSION,))
_UNCHAINED_BYTE = bytes((RECORD_VERSION_UNCHAINED,))


def lsn_key(lsn: int) -> bytes:
    """The big-endian key under which record `lsn` is stored (sorts in LSN order)."""
    return _LSN.pack(lsn)


def key_lsn(key: bytes) -> int:
    """Inverse of `lsn_key`."""
    return _LSN.unpack(key)[0]


def _checksum(lsn_bytes: bytes, version: int, body: bytes | memoryview) -> int:
    """CRC-32 of the key, the version byte and the rest (the digest, if any, and the payload)."""
    return zlib.crc32(body, zlib.crc32(lsn_bytes + bytes((version,))))


def chain_digest(previous: bytes, key: bytes, payload: bytes) -> bytes:
    """The chain digest of the record `payload` stored under `key`, after one of digest `previous`
    (the payload hashed where it lies: a checkpoint's is tens of MiB)."""
    digest = hashlib.sha256(previous + key)
    digest.update(payload)
    return digest.digest()


def frame_all(first_lsn: int, payloads: Sequence[bytes], previous: bytes) -> tuple[list[bytes], bytes]:
    """The LSN key and the framed, chained record of each payload, flat (key, record, key,
    record...), at consecutive LSNs from `first_lsn`, chained from `previous` (the digest of
    record `first_lsn - 1`, or `GENESIS`): what a group commit writes; and the last digest.
    The digest and checksum are `chain_digest`'s and `_checksum`'s, computed inline (this
    loop runs once a record on the write path)."""
    assert first_lsn >= 1, first_lsn
    assert len(previous) == DIGEST_SIZE, previous
    pack_lsn, pack_header, crc32, version, sha256 = _LSN.pack, _HEADER.pack, zlib.crc32, _VERSION_BYTE, hashlib.sha256
    framed: list[bytes] = []
    for lsn, payload in enumerate(payloads, first_lsn):
        assert type(payload) is bytes and payload, "a record carries a non-empty payload"
        key = pack_lsn(lsn)
        previous = sha256(previous + key + payload).digest()
        body = previous + payload
        framed += (key, pack_header(RECORD_VERSION, crc32(body, crc32(key + version))) + body)
    return framed, previous


def frame_unchained(lsn: int, payload: bytes) -> bytes:
    """A version-1 record, as formats 1-3 wrote them: for tests and tools that build such a ledger."""
    return _HEADER.pack(RECORD_VERSION_UNCHAINED, _checksum(_LSN.pack(lsn), RECORD_VERSION_UNCHAINED, payload)) + payload


def unframe_keyed(key: bytes, value: bytes, lsn: int) -> bytes:
    """`unframe` for a record read with its key (the LSN's bytes) at hand: the scan's fast path."""
    if len(value) > CHAINED_HEADER_SIZE and value[0] == RECORD_VERSION:
        body = value[HEADER_SIZE:]
        if zlib.crc32(body, zlib.crc32(key + _VERSION_BYTE)) == _CRC.unpack_from(value, 1)[0]:
            return body[DIGEST_SIZE:]
    return unframe(lsn, value)  # says precisely what is wrong (or reads a version-1 record)


def unframe(lsn: int, value: bytes) -> bytes:
    """Verify a stored record and return its payload; raise `JournalCorruptedError` naming `lsn`."""
    return unframe_chained(lsn, value)[1]


def unframe_chained(lsn: int, value: bytes) -> tuple[bytes | None, bytes]:
    """Verify a stored record's checksum; return its chain digest (None for an unchained,
    version-1 record) and its payload. Raise `JournalCorruptedError` naming `lsn`."""
    if len(value) <= HEADER_SIZE:
        raise JournalCorruptedError(f"record is truncated ({len(value)} bytes)", lsn)
    version, crc = _HEADER.unpack_from(value)
    if version == RECORD_VERSION:
        if len(value) <= CHAINED_HEADER_SIZE:
            raise JournalCorruptedError(f"record is truncated ({len(value)} bytes)", lsn)
    elif version != RECORD_VERSION_UNCHAINED:
        raise JournalCorruptedError(f"unknown record version {version}", lsn)
    view = memoryview(value)  # (read where it lies: a checkpoint's record is tens of MiB, copied once, below)
    if _checksum(_LSN.pack(lsn), version, view[HEADER_SIZE:]) != crc:
        raise JournalCorruptedError("checksum mismatch", lsn)
    if version == RECORD_VERSION_UNCHAINED:
        return None, bytes(view[HEADER_SIZE:])
    return bytes(view[HEADER_SIZE:CHAINED_HEADER_SIZE]), bytes(view[CHAINED_HEADER_SIZE:])


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
