"""Commit marks: each commit writes, into the meta database, its LMDB transaction id and the
shape of every other database it made (`COMMIT_MARK_KEY`), so the snapshot a meta page names
can be told from an older tree under it, or from one whose catalog is an older tree's: what a
power loss during a commit's one flush may leave (`journal._unfinished`). Opening checks the
mark of the snapshot it opens (`check_commit_mark`); `journal._unfinished` the marks of both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import lmdb

from journal._errors import JournalCorruptedError
from journal._names import META_DB
from journal._pages import Tree


SHAPE_FIELDS = ("entries", "depth", "branch_pages", "leaf_pages", "overflow_pages")
"""What a commit mark holds of each database but the meta database, after the transaction id:
the counters LMDB keeps in the database's record (`lmdb.Transaction.stat`), which the page walk
checks against the pages it finds (`journal._pages`)."""


def marked_databases(names: Iterable[bytes]) -> list[bytes]:
    """The databases whose shape a commit mark holds, in its order: all but the meta database."""
    return sorted(name for name in names if name != META_DB)


stat_shape: Callable[[Any], tuple[int, ...]] = itemgetter(*SHAPE_FIELDS)
"""One database's shape (`SHAPE_FIELDS`) from LMDB's `stat` of it: an `itemgetter`, which
takes the five counters in C (once a database a commit)."""

_DECIMAL = b"%d".__mod__
"""A number's decimal digits, as bytes."""


def commit_mark(txn: lmdb.Transaction, dbs: Sequence[Any]) -> bytes:
    """The commit mark of write transaction `txn` once everything else it writes is staged:
    its id, then the shape of each of `dbs` (`SHAPE_FIELDS`; the handles of
    `marked_databases`, in that order). The id alone would not do: a power loss in the
    commit's flush may leave the leaf holding the mark written and the catalog above it
    not, an older tree's, which names that older tree's records and indexes whole
    (`tests/test_unfinished.py`); their shape is then not the one the mark says."""
    numbers = [txn.id()]
    for db in dbs:
        numbers += stat_shape(txn.stat(db))
    return b" ".join(map(_DECIMAL, numbers))  # (every commit: `map` calls it in C; a generator made a frame a number)


def read_mark(value: bytes | None) -> int | None:
    """A commit mark's transaction id (-1 if it holds none, or anything but numbers; None if
    there is none)."""
    if value is None:
        return None
    parts = value.split(b" ")
    return int(parts[0]) if all(part.isdigit() and len(part) <= 20 for part in parts) else -1


def mark_shape(value: bytes | None) -> tuple[int, ...] | None:
    """The shape of the databases a commit mark holds (`commit_mark`), None if it holds none."""
    if value is None or read_mark(value) == -1:
        return None
    return tuple(int(part) for part in value.split(b" ")[1:]) or None


def shape_of(trees: Mapping[bytes, Tree]) -> tuple[int, ...]:
    """The shape (`SHAPE_FIELDS`) of the databases a page walk found, as a commit mark holds it."""
    return tuple(getattr(trees[name], field) for name in marked_databases(trees) for field in SHAPE_FIELDS)


def shape_disagrees(mark: int | None, shape: tuple[int, ...] | None, txnid: int, found: tuple[int, ...]) -> bool:
    """Whether the snapshot of LMDB transaction `txnid` holds the mark of its own commit
    (`mark`, with `shape`) and databases of another shape than that commit made (`found`):
    the catalog, or a tree under it, is not the one that commit wrote."""
    return mark == txnid and shape is not None and shape != found


STALE_BY_MIN = 3
"""How far behind its meta page's transaction T the commit mark of an older tree under it is,
at least, when that tree is what T's pages held before T reused them: LMDB's commit T reuses
only pages that transaction T-2 or one before it freed (`mdb_find_oldest`: ids below T-1),
pages last written by transaction T-3 or one before it. A mark of T-1 or T-2 is no such tree:
a commit or two that did not write the mark (not Tally's journal: a test's or a tool's raw
LMDB write), whose tree is what it wrote."""


def is_stale_mark(mark: int | None, txnid: int) -> bool:
    """Whether the snapshot of LMDB transaction `txnid` holding commit mark `mark` (None: none,
    a ledger last written before marks) is an older tree under a newer meta page: a mark
    `STALE_BY_MIN` or more behind, ahead of it, or not a number."""
    return mark is not None and not txnid - STALE_BY_MIN < mark <= txnid


def check_commit_mark(value: bytes | None, txnid: int, data_file: str, found: tuple[int, ...]) -> None:
    """Raise `JournalCorruptedError` if the snapshot of LMDB transaction `txnid` holds the
    commit mark `value` of an older tree (`is_stale_mark`), or its own over databases of
    another shape than its commit made (`shape_disagrees`; `found`: theirs): its pages are
    not the ones its commit wrote."""
    mark, shape = read_mark(value), mark_shape(value)
    if is_stale_mark(mark, txnid):
        shown = "no number" if mark == -1 else f"the commit mark of transaction {mark}"
        raise JournalCorruptedError(
            f"the snapshot of LMDB transaction {txnid} holds {shown}: its pages are not the ones its commit wrote "
            "(the machine stopped while that commit was being flushed?)", where=data_file)
    if shape_disagrees(mark, shape, txnid, found):
        raise JournalCorruptedError(
            f"the snapshot of LMDB transaction {txnid} holds that commit's mark, but its databases are not the ones "
            f"that commit made (their shape {found}, the mark's {shape}): its pages are not the ones its commit "
            "wrote (the machine stopped while that commit was being flushed?)", where=data_file)


def shape_in(txn: lmdb.Transaction, dbs: Mapping[bytes, Any]) -> tuple[int, ...]:
    """The shape (`SHAPE_FIELDS`) of the databases `txn` sees, as a commit mark holds it."""
    return tuple(number for name in marked_databases(dbs) for number in stat_shape(txn.stat(dbs[name])))
