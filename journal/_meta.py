"""LMDB's two meta pages, read as raw bytes: which snapshot a data file commits, and whether
the pair can be trusted to say so.

LMDB writes transaction N's meta to page N % 2, so a healthy file holds two consecutive
transaction ids (or two zeros, before its first commit), and LMDB opens the higher. A flipped
byte in either page would make LMDB refuse the file as "not an LMDB file", open an older
snapshot, or open one whose roots point anywhere, all without saying which page is damaged.
Here each page is checked on its own (LMDB's magic and data version, a sane page size, its own
page number, roots inside its snapshot's pages) and the pair against each other.

This reads the layout of LMDB 0.9 on a 64-bit little-endian host (the only one py-lmdb's
bundled engine writes here); anything else is reported as damage rather than guessed at.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from journal._errors import JournalCorruptedError
from journal._limits import MAP_SIZE_BYTES_MAX

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
PAGE_HEADER_BYTES = 16
DB_RECORD_BYTES = 48
NO_PAGE = (1 << 64) - 1
"""`md_root` of an empty database."""
DEPTH_MAX = 32
"""LMDB's cursor stack: no tree is deeper."""
PAGE_BYTES_MIN, PAGE_BYTES_MAX = 512, 1 << 15
P_META = 0x08

PAGE = struct.Struct("<QHHHH")  # mp_pgno, mp_pad, mp_flags, mp_lower, mp_upper
_DB = struct.Struct("<IHHQQQQQ")  # md_pad, md_flags, md_depth, branch, leaf, overflow pages, entries, root
_META = struct.Struct("<IIQQ")  # mm_magic, mm_version, mm_address, mm_mapsize
_META_TAIL = struct.Struct("<QQ")  # mm_last_pg, mm_txnid
_META_DBS_AT = PAGE_HEADER_BYTES + _META.size
_META_TAIL_AT = _META_DBS_AT + 2 * DB_RECORD_BYTES
META_BYTES = _META_TAIL_AT + _META_TAIL.size


@dataclass(frozen=True)
class Database:
    """An `MDB_db` record: one B-tree's root and counters."""

    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int
    page_bytes: int
    """`md_pad`: the free list's record carries the file's page size here."""

    @classmethod
    def parse(cls, data: bytes, at: int = 0) -> Database:
        pad, flags, depth, branch, leaf, overflow, entries, root = _DB.unpack_from(data, at)
        return cls(flags, depth, branch, leaf, overflow, entries, root, pad)


@dataclass(frozen=True)
class Meta:
    """One meta page: which snapshot it commits, and the roots of the two core trees."""

    number: int
    """0 or 1: where it sits in the file."""
    txnid: int
    last_page: int
    free: Database
    main: Database

    @property
    def page_bytes(self) -> int:
        return self.free.page_bytes


def corrupt(reason: str, where: str) -> JournalCorruptedError:
    return JournalCorruptedError(reason, where=where)


def read_metas(fd: int, data_file: str) -> tuple[Meta, Meta]:
    """Both meta pages of the open data file `fd`, each checked on its own."""
    first = os.pread(fd, META_BYTES, 0)
    if not first:
        raise corrupt("the file is empty (0 bytes)", data_file)
    if len(first) < META_BYTES:
        raise corrupt(f"the file is truncated to {len(first)} bytes: not even one meta page", data_file)
    meta0 = _parse(first, 0, data_file)
    second = os.pread(fd, META_BYTES, meta0.page_bytes)
    if len(second) < META_BYTES:
        raise corrupt(f"the file is truncated to {meta0.page_bytes + len(second)} bytes: meta page 1 is missing",
                      data_file)
    meta1 = _parse(second, 1, data_file)
    if meta1.page_bytes != meta0.page_bytes:
        raise corrupt(f"the meta pages disagree on the page size ({meta0.page_bytes} and {meta1.page_bytes})",
                      f"meta page 1 of {data_file}")
    return meta0, meta1


def _parse(data: bytes, number: int, data_file: str) -> Meta:
    where = f"meta page {number} of {data_file}"
    pgno, _pad, flags, _lower, _upper = PAGE.unpack_from(data)
    magic, version, _address, _map_bytes = _META.unpack_from(data, PAGE_HEADER_BYTES)
    if magic != MAGIC:
        raise corrupt(f"bad magic number {magic:#x} (LMDB's is {MAGIC:#x})", where)
    if version != DATA_VERSION:
        raise corrupt(f"LMDB data version {version}, not {DATA_VERSION}", where)
    if pgno != number or flags != P_META:
        raise corrupt(f"the page header says page {pgno} with flags {flags:#x}, not meta page {number}", where)
    free = Database.parse(data, _META_DBS_AT)
    main = Database.parse(data, _META_DBS_AT + DB_RECORD_BYTES)
    last_page, txnid = _META_TAIL.unpack_from(data, _META_TAIL_AT)
    page_bytes = free.page_bytes
    if not PAGE_BYTES_MIN <= page_bytes <= PAGE_BYTES_MAX or page_bytes & (page_bytes - 1):
        raise corrupt(f"implausible page size {page_bytes}", where)
    if last_page < 1 or (last_page + 1) * page_bytes > MAP_SIZE_BYTES_MAX:  # (no ledger's map is larger)
        raise corrupt(f"last page {last_page}", where)
    for name, db in (("free list", free), ("main database", main)):
        if db.root != NO_PAGE and not 2 <= db.root <= last_page:
            raise corrupt(f"the {name}'s root page {db.root} is outside its snapshot's pages 2..{last_page}", where)
        if db.depth > DEPTH_MAX:
            raise corrupt(f"the {name}'s depth {db.depth} is past LMDB's {DEPTH_MAX}", where)
    return Meta(number, txnid, last_page, free, main)


def committed_meta(meta0: Meta, meta1: Meta, data_file: str) -> Meta:
    """The meta LMDB will open (the higher transaction id), once the pair is consistent: a
    pair that breaks the commit parity has a damaged page, and LMDB would open whichever id
    is higher without a word."""
    t0, t1 = meta0.txnid, meta1.txnid
    if t0 % 2:
        raise corrupt(f"odd transaction id {t0} in the even slot", f"meta page 0 of {data_file}")
    if t1 and not t1 % 2:
        raise corrupt(f"even transaction id {t1} in the odd slot", f"meta page 1 of {data_file}")
    if not (t0 == t1 == 0 or abs(t0 - t1) == 1):
        raise corrupt(f"the meta pages hold transaction ids {t0} and {t1}, not two consecutive ones: "
                      "one of them is damaged", data_file)
    return meta1 if t1 > t0 else meta0


def meta_with_txnid(page: bytes, number: int, txnid: int) -> bytes:
    """The first `META_BYTES` of a meta page, `page`, as meta page `number` committing `txnid`
    (its page number and transaction id replaced; roots and counters kept), checked as
    `read_metas` checks a page (`journal._unfinished`)."""
    made = bytearray(page[:META_BYTES])
    struct.pack_into("<Q", made, 0, number)
    last_page, _ = _META_TAIL.unpack_from(made, _META_TAIL_AT)
    _META_TAIL.pack_into(made, _META_TAIL_AT, last_page, txnid)
    _parse(bytes(made), number, f"meta page {number}")
    return bytes(made)


def metas_each(fd: int, data_file: str, page_bytes_guess: int) -> tuple[list[Meta], list[JournalCorruptedError]]:
    """Each meta page that checks on its own (`_parse`), newest first, and what was wrong with
    the others: for a salvage (`journal._rescue`), which reads the newest snapshot a whole meta
    page names when the pair is not consistent. Meta page 1 is looked for at the page size meta
    page 0 gives, or at `page_bytes_guess` (the host's page size, LMDB's) if page 0 is damaged."""
    found: list[Meta] = []
    faults: list[JournalCorruptedError] = []
    page_bytes = page_bytes_guess
    for number in (0, 1):
        try:
            data = os.pread(fd, META_BYTES, number * page_bytes)
        except OSError as error:
            if error.errno != errno.EIO:
                raise
            faults.append(corrupt("the device reports an I/O error reading it", f"meta page {number} of {data_file}"))
            continue
        try:
            if len(data) < META_BYTES:
                raise corrupt(f"the file is truncated to {number * page_bytes + len(data)} bytes: meta page "
                              f"{number} is missing", data_file)
            meta = _parse(data, number, data_file)
        except JournalCorruptedError as fault:
            faults.append(fault)
            continue
        found.append(meta)
        page_bytes = meta.page_bytes
    if len(found) == 2 and found[0].page_bytes != found[1].page_bytes:
        faults.append(corrupt(f"the meta pages disagree on the page size ({found[0].page_bytes} and "
                              f"{found[1].page_bytes})", f"meta page 1 of {data_file}"))
        found.pop()
    return sorted(found, key=lambda meta: meta.txnid, reverse=True), faults
