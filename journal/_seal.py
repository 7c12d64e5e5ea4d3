"""The seal: what a clean close leaves so that the next open need not walk every page.

Opening checks the data file as raw bytes before LMDB follows a page number
(`journal._pages`): one pass over every reachable page, about half a microsecond a node,
which is most of opening a large ledger (~4.5 s for a million accounts). A clean close
(`Journal.close` of a ledger it wrote, with no failure) makes that same pass, once nothing
writes the file any more, and if it finds nothing wrong writes `tally.seal` beside the data
file: the transaction id of the committed snapshot, its high-water page, a CRC-32 of every
MiB of the file up to that page, and the layout the walk found, the whole framed by its own
CRC-32. (The old seal is removed first, so no seal ever stands for bytes other than those
its close walked.) So the walk moves from the next open to this close: the time is the
same, but a restarting host waits for it before the old process lets go, not after. A close
after an open that committed nothing, whose file still sums as the seal says, keeps that seal
and walks nothing (`journal._check.seal_stands`): those are still the bytes it stands for.

An open that finds a seal whose snapshot is the committed one and whose every CRC matches
the file as it is now takes the layout from it instead of walking: those are the bytes the
close walked. Anything else (no seal, a damaged or foreign one, another snapshot, one
changed MiB) means the full walk, as before. Damage found by the walk at close is logged and
left unsealed, so the next open reports it. `tally verify`, the tools and read-only opens
always walk. Reading and summing the file costs about a tenth of walking it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from typing import Any

import msgpack

from journal._anchor import read_small_file, write_aside
from journal._errors import JournalCorruptedError
from journal._meta import Meta
from journal._pages import Layout, Tree

logger = logging.getLogger("tally.journal")

SEAL_FILE = "tally.seal"
SEAL_VERSION = 2
"""Raised whenever the page walk checks more than it did (2: the walk's unknown meta key and
free-list age checks, 4222a9f and 67ee6ed; and closes that keep a seal standing): a seal of
an older walk is not taken, and the next walk seals anew."""
CHUNK_BYTES = 1 << 20
"""The file is summed in pieces of this size (one CRC-32 each)."""

SEAL_BYTES_MAX = 1 << 24
"""Most a seal is read of (one CRC a MiB and a few trees: a terabyte's seal is ~4 MiB); a
longer one fails its frame's check."""

_CRC = struct.Struct("<I")


def file_sums(fd: int, end: int) -> bytes:
    """The CRC-32 of each `CHUNK_BYTES` of the file up to `end`, packed (a short read: short).

    The second half of the chunks is summed on a thread of its own: reading and summing
    let go of the interpreter, so the two halves take two cores (a million accounts'
    800 MiB: ~0.26 s on one core)."""
    offsets = range(0, end, CHUNK_BYTES)
    half = len(offsets) // 2
    if not half:
        return _sums_of(fd, end, offsets)[0]
    later: list[tuple[bytes, bool] | OSError] = []

    def sum_later() -> None:
        try:
            later.append(_sums_of(fd, end, offsets[half:]))
        except OSError as error:  # raised here, by the caller, if the first half reads whole
            later.append(error)

    helper = threading.Thread(target=sum_later, daemon=True, name="tally-seal-sums")
    helper.start()
    try:
        first, short = _sums_of(fd, end, offsets[:half])
    finally:
        helper.join()  # (it only reads and sums: no lock, no wait of its own)
    if short:
        return first
    if isinstance(later[0], OSError):
        raise later[0]
    return first + later[0][0]


def _sums_of(fd: int, end: int, offsets: range) -> tuple[bytes, bool]:
    """The packed CRC-32s of the chunks at `offsets`, and whether a read came back short
    (the last summed)."""
    sums = bytearray()
    for offset in offsets:
        chunk = os.pread(fd, min(CHUNK_BYTES, end - offset), offset)
        sums += _CRC.pack(zlib.crc32(chunk))
        if len(chunk) < min(CHUNK_BYTES, end - offset):
            return bytes(sums), True
    return bytes(sums), False


def write_seal(path: str, meta: Meta, sums: bytes, ledger_id: bytes | None, trees: dict[bytes, Tree]) -> None:
    """Write the seal of the snapshot `meta`, whose file summed to `sums` before a walk found it
    laid out as `trees` (so a byte changed during the walk fails the sums, and the next open
    walks). Durable before it returns (written aside, synced, renamed, the directory synced).
    Raises `OSError`, naming the file aside when it is anything but a regular file of its own
    (a FIFO, whose open for writing would wait for a reader; a directory; a link), which is
    left as it is; the file aside it made is removed if it cannot be written (a full disk)."""
    body = msgpack.packb([SEAL_VERSION, ledger_id, meta.txnid, meta.last_page, meta.page_bytes, sums,
                          [[name, tree.entries, tree.branch_pages, tree.leaf_pages, tree.overflow_pages, tree.depth,
                            tree.first_key, tree.last_key] for name, tree in sorted(trees.items())]],
                         use_bin_type=True)
    write_aside(os.path.join(path, SEAL_FILE), _CRC.pack(zlib.crc32(body)) + body)


def sealed_layout(path: str, fd: int, meta: Meta, data_file: str) -> Layout | None:
    """The layout the seal in `path` vouches for, if it seals exactly the snapshot `meta`
    commits and the file's bytes up to its high-water page are those it summed; else None."""
    try:
        framed = read_small_file(os.path.join(path, SEAL_FILE), "the seal", SEAL_BYTES_MAX)
    except FileNotFoundError:
        return None
    except (OSError, JournalCorruptedError) as error:  # (not a regular file: nothing it vouches for)
        logger.warning("the seal of %s cannot be read (%s): checking every page", data_file, error)
        return None
    fields = _unframe(framed)
    if fields is None:
        logger.warning("the seal of %s is damaged: checking every page", data_file)
        return None
    version, _ledger_id, txnid, last_page, page_bytes, sums, trees = fields
    if version != SEAL_VERSION or (txnid, last_page, page_bytes) != (meta.txnid, meta.last_page, meta.page_bytes):
        return None  # another snapshot: written since, or not this file's
    if file_sums(fd, (last_page + 1) * page_bytes) != sums:
        logger.warning("%s changed since its seal was written, with no commit: checking every page", data_file)
        return None
    layout = Layout(meta, 0)
    for name, entries, branch, leaf, overflow, depth, first_key, last_key in trees:
        layout.trees[name] = Tree(entries, branch, leaf, overflow, depth, first_key, last_key)
    return layout


def _unframe(framed: bytes) -> list[Any] | None:
    if len(framed) < _CRC.size or _CRC.unpack_from(framed)[0] != zlib.crc32(framed[_CRC.size:]):
        return None
    try:
        fields = msgpack.unpackb(framed[_CRC.size:], raw=False, use_list=True)
    except Exception:  # msgpack raises several unrelated types on bad input; the CRC matched, so a bug
        return None
    if not isinstance(fields, list) or len(fields) != 7:
        return None
    return fields
