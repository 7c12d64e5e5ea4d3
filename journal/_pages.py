"""LMDB's data file, read as raw bytes: the part of LMDB's on-disk format Tally owns outright.

LMDB has no page checksums and trusts its file: it follows page numbers and node offsets
through a memory map. A page past the file's end is a SIGBUS, which kills the process; a
damaged branch key sends a point lookup to the wrong leaf, so an id the journal holds reads
as absent; a free list naming a live page makes the next write overwrite it. So before LMDB
reads a data file, Tally walks it here with `os.pread` (never a map: a short file is an
error, not a signal), from a meta page `journal._meta` checked, and checks:

1. every page the meta reaches (`walk`): inside the file, its header and its number, every
   node's offsets inside the page, the nodes packed exactly between `mp_upper` and the
   page's end (as LMDB always leaves them), keys strictly ascending and inside the range
   their parent branch gives them (so no lookup is misrouted), every page reached once,
   overflow runs inside the snapshot, and each database's counters (entries, depth, pages)
   equal to what the walk found;
2. the free list: the pages it names and the pages the trees use are disjoint and together
   cover every page up to the snapshot's high-water mark (free pages past the file's end
   are allowed: LMDB writes a page before it first reads it), and its newest record is of
   the meta page's own transaction (`_check_free_list_age`: an older free list under a newer
   meta page would give the next commits pages the two newest snapshots still hold).

This reads the layout of LMDB 0.9 on a 64-bit little-endian host (the only one py-lmdb's
bundled engine writes here); anything else is reported as damage rather than guessed at.
Cost: one pass over the reachable pages, about half a microsecond a node (see `bench/README.md`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from itertools import repeat
from operator import add, and_, floordiv, lt, sub

from journal._meta import (
    DB_RECORD_BYTES,
    DEPTH_MAX,
    NO_PAGE,
    PAGE,
    PAGE_HEADER_BYTES,
    Database,
    Meta,
    corrupt,
)

if TYPE_CHECKING:
    from journal._walk_aside import Aside

NODE_HEADER_BYTES = 8
P_BRANCH, P_LEAF, P_OVERFLOW = 0x01, 0x02, 0x04
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
MDB_INTEGERKEY = 0x08

_OVERFLOW_PAGES = struct.Struct("<I")  # mp_pages, over mp_lower and mp_upper
_NODE = struct.Struct("<HHHH")  # mn_lo, mn_hi, mn_flags, mn_ksize
_U64 = struct.Struct("<Q")
Visit = Callable[[bytes, list[bytes], list[bytes]], None]
"""Called with a database's name and one leaf's keys and values."""


@dataclass
class Tree:
    """What `walk` found in one database."""

    entries: int = 0
    branch_pages: int = 0
    leaf_pages: int = 0
    overflow_pages: int = 0
    depth: int = 0
    first_key: bytes | None = None
    last_key: bytes | None = None


@dataclass
class Layout:
    """The verified layout of a data file: its committed meta and every tree in it."""

    meta: Meta
    file_bytes: int
    trees: dict[bytes, Tree] = field(default_factory=dict)
    """Named databases by name (b"records", ...), with what the walk found in each."""


class PageWalk:
    """One pass over every page reachable from a meta; raises at the first fault."""

    def __init__(self, fd: int, meta: Meta, data_file: str,
                 visit: Visit | None) -> None:
        self.key_bytes = 0
        """Of every key in the tree being walked, if not 0."""
        self.fd = fd
        self.meta = meta
        self.page_bytes = meta.page_bytes
        self.pages = meta.last_page + 1
        self.file_pages = os.fstat(fd).st_size // meta.page_bytes
        """Pages the file holds now: every page LMDB would read must be one (it only grows)."""
        self.data_file = data_file
        self.seen = bytearray(self.pages)
        self.seen[0] = self.seen[1] = 1
        self.visit = visit
        self.catalog = False
        """Walking the main database, whose entries are the named databases' records."""
        self._ptrs: dict[int, struct.Struct] = {}
        self._uniforms: dict[tuple[int, int, int, int], struct.Struct] = {}
        """`_uniform`'s reader of a leaf's nodes, by (nodes, key bytes, value bytes, pad)."""

    def read(self, pgno: int, count: int = 1) -> bytes:
        data = os.pread(self.fd, count * self.page_bytes, pgno * self.page_bytes)
        if len(data) != count * self.page_bytes:
            raise corrupt(f"the file is truncated: page {pgno}, which the snapshot uses, lies past its end",
                          self.data_file)
        return data

    def claim(self, pgno: int, count: int, where: str) -> None:
        """Mark pages used; each page may be used once, and only below the high-water mark."""
        if pgno < 2 or pgno + count > self.pages:
            raise corrupt(f"refers to page {pgno} (of {count}), outside pages 2..{self.pages - 1}", where)
        seen = self.seen
        if any(seen[pgno : pgno + count]):
            raise corrupt(f"refers to page {pgno}, which another part of the file already uses", where)
        seen[pgno : pgno + count] = b"\x01" * count

    def main_database(self) -> list[tuple[bytes, bytes]]:
        """The main database walked whole: each named database's name and record, in key order."""
        catalog: list[tuple[bytes, bytes]] = []
        self.visit = lambda _name, keys, values: catalog.extend(zip(keys, values, strict=True))
        self.catalog = True
        try:
            self.tree(b"", self.meta.main)
        finally:
            self.catalog = False
        return catalog

    def tree(self, name: bytes, db: Database, integer_keys: bool = False) -> Tree:
        where = f"the {_shown(name)} database of {self.data_file}"
        if db.flags & ~MDB_INTEGERKEY or bool(db.flags & MDB_INTEGERKEY) != integer_keys:
            raise corrupt(f"unexpected flags {db.flags:#x}", where)
        found = Tree()
        if db.root == NO_PAGE:
            if db.entries or db.depth or db.branch_pages or db.leaf_pages or db.overflow_pages:
                raise corrupt("empty, yet its counters are not zero", where)
            return found
        self.page(name, db.root, 1, None, None, found, integer_keys)
        counted = (found.entries, found.depth, found.branch_pages, found.leaf_pages, found.overflow_pages)
        claimed = (db.entries, db.depth, db.branch_pages, db.leaf_pages, db.overflow_pages)
        if counted != claimed:
            raise corrupt(f"its record claims (entries, depth, branch, leaf, overflow pages) {claimed}, "
                          f"its pages hold {counted}: pages are lost or a counter is damaged", where)
        return found

    def page(self, name: bytes, pgno: int, depth: int, low: bytes | None, high: bytes | None,
             found: Tree, integer_keys: bool) -> None:
        """Check page `pgno` of database `name` and everything under it. Every key under it
        must be >= `low` and < `high` (None: unbounded), as the parent's separators say."""
        where = f"page {pgno} of the {_shown(name)} database of {self.data_file}"
        if depth > DEPTH_MAX:
            raise corrupt(f"deeper than LMDB's {DEPTH_MAX} levels", where)
        self.claim(pgno, 1, where)
        data = self.read(pgno)
        stored, _pad, flags, lower, upper = PAGE.unpack_from(data)
        if stored != pgno:
            raise corrupt(f"its header says page {stored}", where)
        if flags not in (P_BRANCH, P_LEAF):
            raise corrupt(f"flags {flags:#x} are not a branch's or a leaf's", where)
        page_bytes = self.page_bytes
        if not PAGE_HEADER_BYTES <= lower <= upper <= page_bytes or lower % 2:
            raise corrupt(f"bad free-space bounds (lower {lower}, upper {upper})", where)
        count = (lower - PAGE_HEADER_BYTES) >> 1
        if not count:
            raise corrupt("no nodes", where)
        ptrs = self._ptrs.get(count)
        if ptrs is None:
            ptrs = self._ptrs[count] = struct.Struct(f"<{count}H")
        offsets = ptrs.unpack_from(data, PAGE_HEADER_BYTES)
        if min(offsets) < upper or max(offsets) > page_bytes - NODE_HEADER_BYTES:
            raise corrupt("a node pointer points outside the page's nodes", where)
        found.depth = max(found.depth, depth)
        if flags == P_BRANCH:
            found.branch_pages += 1
            self._branch(name, data, offsets, upper, depth, low, high, found, integer_keys, where)
        else:
            found.leaf_pages += 1
            self._leaf(name, data, offsets, upper, low, high, found, integer_keys, where)

    def _branch(self, name: bytes, data: bytes, offsets: tuple[int, ...], upper: int, depth: int,
                low: bytes | None, high: bytes | None, found: Tree, integer_keys: bool, where: str) -> None:
        unpack_node, page_bytes = _NODE.unpack_from, self.page_bytes
        children: list[int] = []
        keys: list[bytes | None] = []
        used = 0  # node 0's key is never read: the parent's bound stands in for it
        for i, at in enumerate(offsets):
            lo, hi, fl, key_bytes = unpack_node(data, at)
            end = at + NODE_HEADER_BYTES + key_bytes
            if end > page_bytes:
                raise corrupt(f"node {i} runs past the page", where)
            used += (end - at + 1) & ~1
            children.append(lo | hi << 16 | fl << 32)
            keys.append(data[at + NODE_HEADER_BYTES : end] if i else low)  # node 0's key is the parent's bound
        if used != page_bytes - upper:
            raise corrupt(f"its nodes take {used} bytes, its header says {page_bytes - upper}", where)
        if len(children) < 2:
            raise corrupt("a branch with a single child", where)
        bounds = [*keys[1:], high]
        _check_order(keys[1:], low, high, integer_keys, where)  # type: ignore[arg-type]
        for child, key, bound in zip(children, keys, bounds, strict=True):
            self.page(name, child, depth + 1, key, bound, found, integer_keys)

    def _leaf(self, name: bytes, data: bytes, offsets: tuple[int, ...], upper: int,
              low: bytes | None, high: bytes | None, found: Tree, integer_keys: bool, where: str) -> None:
        # Written as maps over whole columns rather than a loop over nodes: an open walks
        # every leaf of the file, and this keeps it near a third of a microsecond a node.
        # Most leaves hold nodes of one size, read in one call (`_uniform`): less again.
        uniform = None if self.catalog else self._uniform(data, offsets, upper)
        if uniform is not None:
            keys, values = uniform
            self._leaf_keys(keys, low, high, found, integer_keys, where)
            if self.visit is not None:
                self.visit(name, keys, values)
            return
        unpack_node, page_bytes = _NODE.unpack_from, self.page_bytes
        sizes_low, sizes_high, flags, key_sizes = zip(*[unpack_node(data, at) for at in offsets], strict=True)
        if self.key_bytes and key_sizes.count(self.key_bytes) != len(key_sizes):
            raise corrupt(f"a key is not {self.key_bytes} bytes long", where)
        key_starts = list(map(add, offsets, repeat(NODE_HEADER_BYTES)))
        value_starts = list(map(add, key_starts, key_sizes))
        if self.catalog or any(flags) or any(sizes_high):
            ends = [self._value_end(i, flag, low_ | high_ << 16, start, where)
                    for i, (flag, low_, high_, start) in enumerate(zip(flags, sizes_low, sizes_high, value_starts, strict=True))]
        else:
            ends = list(map(add, value_starts, sizes_low))
        if max(ends) > page_bytes:
            raise corrupt(f"node {ends.index(max(ends))} runs past the page", where)
        lengths = map(sub, ends, offsets)
        if sum(map(and_, map(add, lengths, repeat(1)), repeat(-2))) != page_bytes - upper:
            raise corrupt("its nodes do not fill the page from its free-space bound to its end", where)
        keys = list(map(data.__getitem__, map(slice, key_starts, value_starts)))
        self._leaf_keys(keys, low, high, found, integer_keys, where)
        visit = self.visit
        if visit is None and F_BIGDATA not in flags:
            return
        values = list(map(data.__getitem__, map(slice, value_starts, ends)))
        for i, flag in enumerate(flags):
            if flag == F_BIGDATA:
                size = sizes_low[i] | sizes_high[i] << 16
                values[i] = self._overflow(name, _U64.unpack_from(data, value_starts[i])[0], size, found, where,
                                           visit is not None)
        if visit is not None:
            visit(name, keys, values)

    def _uniform(self, data: bytes, offsets: tuple[int, ...], upper: int) -> tuple[list[bytes], list[bytes]] | None:
        """The keys and values of a leaf (in key order) whose nodes are all one size, with a
        key of one length and a value in line (no flags), packed from `upper` to the page's
        end one after another in some order: what most leaves of the indexes and of the
        records are. Read in one `unpack_from`, the loops over nodes in C. None for any other
        leaf (a node differs, or the nodes do not tile the page exactly), which `_leaf` then
        checks node by node: so this takes only leaves that check would pass."""
        count, page_bytes = len(offsets), self.page_bytes
        size, rest = divmod(page_bytes - upper, count)
        key_bytes = data[upper + 6] | data[upper + 7] << 8  # the first node's mn_ksize, then its mn_lo
        value_bytes = data[upper] | data[upper + 1] << 8
        # A node takes an even number of bytes (LMDB starts each on an even offset): one byte of
        # pad after a node of an odd size, none after an even one, as `_leaf` rounds them.
        pad = size - NODE_HEADER_BYTES - key_bytes - value_bytes
        if rest or pad != (key_bytes + value_bytes) & 1 or (self.key_bytes and key_bytes != self.key_bytes):
            return None
        shape = (count, key_bytes, value_bytes, pad)
        nodes = self._uniforms.get(shape)
        if nodes is None:
            nodes = self._uniforms[shape] = struct.Struct("<" + f"HHHH{key_bytes}s{value_bytes}s{pad}x" * count)
        fields = nodes.unpack_from(data, upper)  # per node: mn_lo, mn_hi, mn_flags, mn_ksize, key, value
        if (fields[0::6].count(value_bytes) != count or fields[1::6].count(0) != count
                or fields[2::6].count(0) != count or fields[3::6].count(key_bytes) != count
                or sorted(offsets) != list(range(upper, page_bytes, size))):
            return None
        order = list(map(floordiv, map(sub, offsets, repeat(upper)), repeat(size)))  # node i is the order[i]-th
        keys, values = fields[4::6], fields[5::6]
        return list(map(keys.__getitem__, order)), list(map(values.__getitem__, order))

    def _leaf_keys(self, keys: list[bytes], low: bytes | None, high: bytes | None, found: Tree,
                   integer_keys: bool, where: str) -> None:
        """A leaf's keys in order and inside its parent's bounds, after the previous leaf's; counted."""
        _check_order(keys, low, high, integer_keys, where)
        if found.last_key is not None and not _after(found.last_key, keys[0], integer_keys):
            raise corrupt("its first key does not follow the previous leaf's last", where)
        if found.first_key is None:
            found.first_key = keys[0]
        found.entries += len(keys)
        found.last_key = keys[-1]

    def _value_end(self, i: int, flags: int, size: int, start: int, where: str) -> int:
        """Where node `i`'s value ends in the page, its value starting at `start`: in line,
        an overflow run's page number (8 bytes), or a named database's record (in the main
        database only, which holds nothing else)."""
        if flags == 0 and not self.catalog:
            return start + size
        if flags == F_BIGDATA and not self.catalog:
            return start + 8
        if flags == F_SUBDATA and self.catalog and size == DB_RECORD_BYTES:
            return start + size
        raise corrupt(f"node {i} has flags {flags:#x}", where)

    def _overflow(self, name: bytes, pgno: int, size: int, found: Tree, where: str, whole: bool) -> bytes:
        """The value stored on the overflow run at `pgno` (`size` bytes), its header checked;
        only the run's first page unless `whole` (a checkpoint's run may be megabytes). A run
        may be longer than its value needs (LMDB rewrites a smaller value in place): it is
        the run's own page count that is in use."""
        needed = (PAGE_HEADER_BYTES - 1 + size) // self.page_bytes + 1
        head = self.read(pgno)
        stored, _pad, flags = PAGE.unpack_from(head)[:3]
        (pages,) = _OVERFLOW_PAGES.unpack_from(head, 12)
        if stored != pgno or flags != P_OVERFLOW or pages < needed:
            raise corrupt(f"its overflow run at page {pgno} has a bad header (page {stored}, flags {flags:#x}, "
                          f"{pages} pages for {size} bytes)", where)
        self.claim(pgno, pages, where)
        if pgno + needed > self.file_pages:  # LMDB would map the run's pages past the file's end
            raise corrupt(f"the file is truncated: the overflow run at page {pgno} reaches page {pgno + needed - 1}, "
                          f"past its end ({self.file_pages} pages)", self.data_file)
        found.overflow_pages += pages
        data = self.read(pgno, needed) if whole else head
        return data[PAGE_HEADER_BYTES : PAGE_HEADER_BYTES + size]


def _after(before: bytes, key: bytes, integer_keys: bool) -> bool:
    if integer_keys:
        return _integer(key) > _integer(before)
    return key > before


def _integer(key: bytes) -> int:
    return int.from_bytes(key, "little")


def _check_order(keys: list[bytes], low: bytes | None, high: bytes | None, integer_keys: bool, where: str) -> None:
    """Keys strictly ascending, the first >= `low`, the last < `high` (None: unbounded).
    LMDB compares keys as memcmp with the shorter first, as Python compares bytes; the free
    list compares them as integers."""
    if integer_keys:
        if any(len(key) != 8 for key in keys):
            raise corrupt("an integer key that is not 8 bytes", where)
        values = [_integer(key) for key in keys]
        ordered = all(map(lt, values, values[1:]))
        inside = (low is None or values[0] >= _integer(low)) and (high is None or values[-1] < _integer(high))
    else:
        ordered = all(map(lt, keys, keys[1:]))
        inside = (low is None or keys[0] >= low) and (high is None or keys[-1] < high)
    if not ordered:
        raise corrupt("its keys are out of order", where)
    if not inside:
        raise corrupt("a key lies outside the range its parent branch gives the page", where)


def _shown(name: bytes) -> str:
    return name.decode(errors="replace") if name else "main"


def walk(fd: int, meta: Meta, data_file: str, visit: Visit | None = None, names: frozenset[bytes] = frozenset(),
         first: bytes = b"", key_bytes: Mapping[bytes, int] | None = None, aside: Aside | None = None) -> Layout:
    """Check every page reachable from `meta` (see the module docstring); return the layout.
    `visit(name, keys, values)` gets the entries of the named databases in `names`, a leaf
    at a time, in key order; database `first` is walked before the others, then the others
    from the fewest entries (as their records say) to the most; every key of a database in
    `key_bytes` must be that long. With `aside`, a second process may walk the last trees
    (`journal._walk_aside`): what this returns or raises is the same either way."""
    pages = PageWalk(fd, meta, data_file, None)
    free_records: list[bytes] = []
    pages.visit = lambda _name, _keys, values: free_records.extend(values)
    _check_free_list_age(pages.tree(b"free list", meta.free, integer_keys=True), meta, data_file)
    catalog = pages.main_database()
    layout = Layout(meta, 0)

    def walk_tree(name: bytes, record: bytes) -> None:
        pages.visit = visit if name in names else None
        pages.key_bytes = (key_bytes or {}).get(name, 0)
        layout.trees[name] = pages.tree(name, Database.parse(record))

    ordered = sorted(catalog, key=lambda item: (item[0] != first, Database.parse(item[1]).entries, item[0]))
    head = ordered[:1] if ordered and ordered[0][0] == first else []
    if first and not head:  # (damage, not a format: every format names it; the visit would take it for one)
        raise corrupt(f"its main database names no {_shown(first)} database", f"the main database of {data_file}")
    for name, record in head:
        walk_tree(name, record)  # (the meta database: the format the index checks need)
    if aside is None:
        for name, record in ordered[len(head):]:
            walk_tree(name, record)
    else:
        aside.walk(ordered[len(head):], walk_tree, pages, layout.trees)
    _check_free_list(pages, free_records, data_file)
    return layout


def _check_free_list_age(free: Tree, meta: Meta, data_file: str) -> None:
    """The free list's newest record (the largest key: a transaction id) is of `meta`'s own
    transaction, unless the list is empty. LMDB saves the pages a commit frees under that
    commit's id, and every commit Tally makes frees one at least: it changes the meta
    database (its commit mark, `journal._marks`), whose page the snapshot before held, and
    LMDB copies such a page rather than write over it. Only the commit that makes a ledger
    frees nothing (the list is then empty). An older newest record is an older free list
    under a newer meta page, as a power loss in a commit's flush may leave it
    (`journal._unfinished`): its records, keyed by older transactions, may name pages the two
    newest snapshots hold as free long enough to be reused, and the next commits would write
    over those snapshots. (The coverage check after the walk need not see it: the pages it
    names may still be exactly the ones not in use.)"""
    if free.last_key is None:
        return
    newest = _integer(free.last_key)
    if newest != meta.txnid:
        relation = "older" if newest < meta.txnid else "newer"
        raise corrupt(f"its newest record is of transaction {newest}, not of its meta page's {meta.txnid}: "
                      f"the free list is {relation} than the meta page", f"the free list of {data_file}")


def _check_free_list(pages: PageWalk, records: list[bytes], data_file: str) -> None:
    """The free list names each page not in use exactly once, and none in use."""
    where = f"the free list of {data_file}"
    seen = pages.seen
    for record in records:
        if len(record) < 8 or len(record) % 8:
            raise corrupt(f"a record of {len(record)} bytes is not a page list", where)
        count = _U64.unpack_from(record)[0]
        if count != len(record) // 8 - 1:
            raise corrupt(f"a record says it lists {count} pages and holds {len(record) // 8 - 1}", where)
        listed = struct.unpack_from(f"<{count}Q", record, 8)
        for pgno in listed:
            if not 2 <= pgno < pages.pages:
                raise corrupt(f"lists page {pgno}, outside pages 2..{pages.pages - 1}", where)
            if seen[pgno]:
                raise corrupt(f"lists page {pgno}, which is in use: a write would overwrite it", where)
            seen[pgno] = 1
    missing = seen.find(0)
    if missing != -1:
        raise corrupt(f"page {missing} is neither in use nor free: a page is lost", where)
