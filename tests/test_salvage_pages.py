"""A salvage of a data file whose pages keep it from opening (`journal._rescue`): its records are
read page by page around the damage, and everything before the first record lost is copied.

Each test damages a real ledger's data file where a disk would (a page zeroed, a byte of a
branch flipped, a meta page gone) and holds the salvage to what the ledger held before the
damage: NEW verifies whole, holds exactly the transfers committed before the first LSN lost (the
same ids, amounts and balances), the report lists every record lost, and the damaged ledger is
left as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest
from coordinator import INDEX_NAMES, Checkpointed, Committed, records
from engine import JournalCorrupted, Ledger, TransferRequest
from engine import _cli, _tools_audit, _tools_salvage
from journal import Journal, rescue
from journal._anchor import create_anchor, read_anchor
from journal._format import frame_unchained, lsn_key, unframe_chained
from journal._meta import Database, Meta, read_metas
from journal._names import FORMAT_KEY, LEDGER_ID_KEY, META_DB, RECORDS_DB
from journal._pages import PageWalk, Tree
from support import newest_meta

PAGE = 4096
TRANSFERS = 2000
NOTE = {f"note{n}": "x" * 250 for n in range(4)}
"""A kilobyte of metadata a transfer: three records a page, a records tree three levels deep."""
ACCOUNTS = 40


@dataclass(frozen=True)
class Pristine:
    """A ledger as it was before the damage: where it is, and what each LSN committed."""

    path: Path
    transfers: dict[int, tuple[str, ...]]
    """LSN -> the ids of the transfers its commit made."""
    state_hash: str
    last_lsn: int
    checkpoints: int
    """Checkpoint records: a salvage copies every other record (NEW makes its own checkpoints)."""


def build(path: Path) -> Pristine:
    """A ledger of a few thousand records over hundreds of pages (a records tree three levels
    deep), and what each of its LSNs committed."""
    with Ledger.open(path, checkpoint_interval=500) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for n in range(ACCOUNTS):
            ledger.create_account(f"a{n:02d}", currency="USD")
        for n in range(60):  # (their checkpoints outgrow a page: each record of one lies on an overflow run)
            ledger.create_account(f"z{n:02d}-" + "x" * 120, currency="USD")
        ledger.transfer_many([TransferRequest(f"t-{n}", "bank", f"a{n % ACCOUNTS:02d}", 100 + n % 7, metadata=NOTE)
                              for n in range(TRANSFERS)])
        state_hash = ledger.state_hash()
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        read = list(records(journal))
    finally:
        journal.close()
    made = {record.lsn: tuple(transfer.id for transfer in record.transfers)
            for record in read if isinstance(record, Committed)}
    return Pristine(path, made, state_hash, len(read), sum(isinstance(record, Checkpointed) for record in read))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return build(tmp_path_factory.mktemp("pristine") / "ledger")


def copy_of(pristine: Pristine, tmp_path: Path) -> Path:
    path = tmp_path / "ledger"
    shutil.copytree(pristine.path, path)
    return path


class _Mapped(PageWalk):
    """The page walk, noting each page of each tree it reads: the tree, the page's level and,
    for a page of the records, the first and last LSN under it."""

    def __init__(self, fd: int, meta: Meta, data_file: str) -> None:
        super().__init__(fd, meta, data_file, None)
        self.noted: dict[int, tuple[bytes, int, int, int]] = {}
        """Page number -> (tree, depth, first LSN, last LSN under it)."""
        self.overflows: list[tuple[int, int]] = []
        """Of the records: (the leaf, the first page of an overflow run it names)."""
        self._page = 0

    def page(self, name: bytes, pgno: int, depth: int, low: bytes | None, high: bytes | None, found: Tree,
             integer_keys: bool) -> None:
        before, previous = found.entries, found.last_key
        self._page = pgno
        super().page(name, pgno, depth, low, high, found, integer_keys)
        start = int.from_bytes(previous, "big") + 1 if previous is not None and name == RECORDS_DB else 1
        self.noted[pgno] = (name, depth, start, start + found.entries - before - 1)


    def _overflow(self, name: bytes, pgno: int, size: int, found: Tree, where: str, whole: bool) -> bytes:
        if name == RECORDS_DB:
            self.overflows.append((self._page, pgno))
        return super()._overflow(name, pgno, size, found, where, whole)


def tree_pages(path: Path) -> dict[int, tuple[bytes, int, int, int]]:
    """Each page of each named tree of the ledger at `path`: (tree, depth, first LSN, last LSN
    under it: of a page of the records)."""
    return _mapped(path).noted


def _mapped(path: Path) -> _Mapped:
    """The walk of every named tree of the ledger at `path`, done."""
    return _mapped_at(path, newest_meta(path))


def _mapped_at(path: Path, meta: Meta) -> _Mapped:
    """The walk of every named tree of the snapshot `meta` of the ledger at `path`, done."""
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        walk = _Mapped(fd, meta, data_file)
        catalog = _catalog_of(walk)
        walk.visit = None
        for name, record in catalog.items():
            walk.tree(name, Database.parse(record))
        return walk
    finally:
        os.close(fd)


def records_pages(path: Path) -> dict[int, tuple[int, int, int]]:
    """Each page of the records tree of the ledger at `path`: (depth, first LSN, last LSN under it)."""
    return {pgno: (depth, first, last) for pgno, (name, depth, first, last) in tree_pages(path).items()
            if name == RECORDS_DB}


def read_metas_of(path: Path) -> tuple[Meta, Meta]:
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        return read_metas(fd, data_file)
    finally:
        os.close(fd)


def flip_txnid_top_byte(path: Path, meta: Meta) -> None:
    """A bit of the top byte of `meta`'s transaction id (mm_txnid, its page's last 8 bytes of meta) flipped."""
    with open(path / "data.mdb", "r+b") as data:
        at = meta.number * PAGE + 16 + 24 + 2 * 48 + 8 + 7
        data.seek(at)
        top = data.read(1)[0]
        data.seek(at)
        data.write(bytes([top ^ 0x40]))


def snapshots(path: Path) -> list[tuple[int, int, int]]:
    """Each snapshot of the ledger at `path` (both meta pages'): its transaction id, and its
    records database's entries and root page."""
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        found = []
        for meta in read_metas(fd, data_file):
            records = Database.parse(_catalog_of(PageWalk(fd, meta, data_file, None))[RECORDS_DB])
            found.append((meta.txnid, records.entries, records.root))
        return found
    finally:
        os.close(fd)


def meta_database_roots(path: Path) -> set[int]:
    """The root page of the meta database (one leaf) of each snapshot of the ledger at `path`."""
    return {meta_database_root(path, meta) for meta in read_metas_of(path)}


def meta_database_root(path: Path, meta: Meta) -> int:
    """The root page of the meta database of the snapshot `meta` of the ledger at `path`."""
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        return Database.parse(_catalog_of(PageWalk(fd, meta, data_file, None))[META_DB]).root
    finally:
        os.close(fd)


def leaf_holding(path: Path, meta: Meta, lsn: int) -> int:
    """The records leaf holding `lsn` in the snapshot `meta` of the ledger at `path`."""
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        walk = _Mapped(fd, meta, str(path / "data.mdb"))
        walk.tree(RECORDS_DB, Database.parse(_catalog_of(walk)[RECORDS_DB]))
    finally:
        os.close(fd)
    leaf_depth = max(depth for name, depth, _, _ in walk.noted.values() if name == RECORDS_DB)
    return next(pgno for pgno, (name, depth, first, last) in walk.noted.items()
                if name == RECORDS_DB and depth == leaf_depth and first <= lsn <= last)


def _catalog_of(walk: PageWalk) -> dict[bytes, bytes]:
    """The main database of `walk`'s snapshot: each named database's record, by its name."""
    return dict(walk.main_database())


def set_records_count(path: Path, entries: int) -> None:
    """The records database's entry count, in the newest snapshot's catalog, made `entries`."""
    root = newest_meta(path).main.root
    with open(path / "data.mdb", "r+b") as data:
        data.seek(root * PAGE)
        catalog = bytearray(data.read(PAGE))
        at = catalog.index(RECORDS_DB) + len(RECORDS_DB) + 32  # its MDB_db record's md_entries
        catalog[at : at + 8] = entries.to_bytes(8, "little")
        data.seek(root * PAGE)
        data.write(catalog)


def zero_page(path: Path, pgno: int) -> None:
    with open(path / "data.mdb", "r+b") as data:
        data.seek(pgno * PAGE)
        data.write(bytes(PAGE))


def file_digest(path: Path) -> str:
    return hashlib.sha256((path / "data.mdb").read_bytes()).hexdigest()


def salvage(path: Path, into: Path) -> dict:
    return _tools_salvage.salvage(str(path), str(into))


def lsns_of(rows: Iterable[dict]) -> list[int]:
    """The LSNs rows of a salvage's `lost` stand for (a row with `through_lsn`, each from its `lsn`)."""
    return [lsn for row in rows for lsn in range(row["lsn"], row.get("through_lsn", row["lsn"]) + 1)]


def assert_a_prefix_was_saved(pristine: Pristine, into: Path, report: dict, first_lost: int | None) -> None:
    """NEW verifies whole and holds exactly the transfers the ledger committed before LSN
    `first_lost` (None: every one); the report lists every commit from there on as lost, by its
    transfer ids."""
    assert report["first_corrupt_lsn"] == first_lost and report["whole"] is False
    assert _tools_audit.verify(str(into))["verdict"] == "whole"
    if first_lost is None:
        first_lost = pristine.last_lsn + 1
        assert not report["lost"] or min(row["lsn"] for row in report["lost"]) >= first_lost
    else:
        assert report["verdict"] == "salvaged: everything before the first corrupt record was copied"
    kept = [tid for lsn, ids in sorted(pristine.transfers.items()) if lsn < first_lost for tid in ids]
    gone = {tid for lsn, ids in pristine.transfers.items() if lsn >= first_lost for tid in ids}
    with Ledger.open(into, readonly=True) as copy:
        for tid in kept:
            made = copy.get_transfer(tid)
            assert made is not None and made.amount == 100 + int(tid[2:]) % 7, tid
        assert all(copy.get_transfer(tid) is None for tid in sorted(gone)[:200])
        assert sum(copy.balance(f"a{n:02d}").posted for n in range(ACCOUNTS)) == sum(
            100 + int(tid[2:]) % 7 for tid in kept)
    named: dict[int, list[str]] = {}  # what the report lists by LSN: a commit's transfers, or nothing known
    for row in report["lost"]:
        for lsn in range(row["lsn"], row.get("through_lsn", row["lsn"]) + 1):
            named.setdefault(lsn, []).extend([row["transfer"]] if row["transfer"] is not None else [])
    assert not named or min(named) == first_lost
    for lsn, ids in pristine.transfers.items():  # every commit from the first lost on: listed, by its ids if read
        if lsn >= first_lost:
            assert named.get(lsn) in ([], list(ids)), (lsn, named.get(lsn), ids)


def test_a_zeroed_leaf_of_the_records_loses_only_its_records_and_what_follows_them(pristine: Pristine,
                                                                                    tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    pages = records_pages(path)
    leaves = sorted((first, last, pgno) for pgno, (depth, first, last) in pages.items()
                    if depth == max(depth for depth, _, _ in pages.values()))
    first, last, pgno = leaves[len(leaves) // 2]
    zero_page(path, pgno)
    damaged = file_digest(path)

    report = salvage(path, tmp_path / "new")

    assert_a_prefix_was_saved(pristine, tmp_path / "new", report, first)
    assert f"page {pgno} of the records database" in report["problem"]
    assert report["damaged_pages"] == [report["problem"]]
    gone = lsns_of(row for row in report["lost"] if row["why"].startswith("in a damaged page of the records"))
    assert gone == list(range(first, last + 1))  # the page's own records, and no other: the rest were read
    after = [row["lsn"] for row in report["lost"] if row["why"] == "commit after the corruption"]
    assert after and min(after) > last and max(after) == max(pristine.transfers)
    assert file_digest(path) == damaged
    assert not [name for name in os.listdir(tmp_path / "new") if name.startswith(".")]  # (the scratch journal is gone)


def test_a_damaged_branch_of_the_records_loses_its_subtree_and_the_records_past_it_are_listed(
        pristine: Pristine, tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    pages = records_pages(path)
    branches = sorted((first, last, pgno) for pgno, (depth, first, last) in pages.items() if depth == 2)
    assert len(branches) >= 3, "the fixture should have a records tree three levels deep"
    first, last, pgno = branches[1]
    with open(path / "data.mdb", "r+b") as data:  # a bit of its header's flags: no longer a branch
        data.seek(pgno * PAGE + 10)
        flags = data.read(1)[0]
        data.seek(pgno * PAGE + 10)
        data.write(bytes([flags ^ 0x40]))

    report = salvage(path, tmp_path / "new")

    assert_a_prefix_was_saved(pristine, tmp_path / "new", report, first)
    assert f"page {pgno} of the records database" in report["problem"] and "flags" in report["problem"]
    gone = lsns_of(row for row in report["lost"] if row["why"].startswith("in a damaged page"))
    assert gone == list(range(first, last + 1))


def test_damage_outside_the_records_loses_nothing_and_new_has_the_same_books(pristine: Pristine,
                                                                              tmp_path: Path) -> None:
    """A page of an index zeroed: every record is read and copied, NEW's indexes made anew."""
    path = copy_of(pristine, tmp_path)
    leaf = max(pgno for pgno, (name, depth, _, _) in tree_pages(path).items() if name == b"entries" and depth == 2)
    zero_page(path, leaf)

    report = salvage(path, tmp_path / "new")

    assert report["first_corrupt_lsn"] is None and report["lost"] == [] and report["whole"] is False
    assert report["records_copied"] == pristine.last_lsn - pristine.checkpoints
    assert report["verdict"].startswith("salvaged: every record was read around the damaged pages and verifies")
    assert f"page {leaf} of the" in report["problem"]
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.state_hash() == pristine.state_hash


def test_a_zeroed_meta_page_reads_the_snapshot_before_it_and_lists_the_last_commit_as_lost(
        pristine: Pristine, tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    with Ledger.open(path) as ledger:  # the last commit: in the newest snapshot only
        ledger.transfer("last", source="bank", destination="a00", amount=5)
        last_lsn = ledger.get_transfer("last").lsn  # type: ignore[union-attr]
    newest = newest_meta(path)
    older_entries = min(snapshots(path))[1]  # (what the snapshot before the newest holds: the copy's all)
    assert older_entries < last_lsn, "the last commit should be the one that wrote the transfer 'last'"
    zero_page(path, newest.number)

    report = salvage(path, tmp_path / "new")

    assert f"meta page {newest.number}" in report["damaged_pages"][0]
    assert report["lost"] and {row["why"] for row in report["lost"]} == {_tools_salvage.AFTER_THE_SNAPSHOT}
    assert report["first_corrupt_lsn"] == older_entries + 1
    assert_a_prefix_was_saved(pristine, tmp_path / "new", report, older_entries + 1)
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.get_transfer("last") is None


def test_a_damaged_data_file_of_another_ledger_is_refused_and_new_is_not_made(pristine: Pristine,
                                                                               tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    other = tmp_path / "other"
    with Ledger.open(other) as ledger:
        ledger.create_account("x", currency="USD")
    shutil.copyfile(other / "tally.anchor", path / "tally.anchor")
    leaves = [pgno for pgno, (depth, _, _) in records_pages(path).items() if depth == 3]
    zero_page(path, leaves[3])

    with pytest.raises(JournalCorrupted, match="belongs to ledger"):
        salvage(path, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_damaged_records_root_is_read_from_the_snapshot_before_it_losing_only_the_last_commit(
        pristine: Pristine, tmp_path: Path) -> None:
    """Each commit writes the records' root anew (LMDB copies a page before it changes it): the
    snapshot before the newest has a root of its own, whole, and lacks only the last commit."""
    path = copy_of(pristine, tmp_path)
    with Ledger.open(path) as ledger:
        ledger.transfer("last", source="bank", destination="a00", amount=5)
    (older_entries, older_root), (newest_entries, root) = (snapshot[1:] for snapshot in sorted(snapshots(path)))
    assert older_root != root, "the last commit should be the one that wrote the transfer 'last'"
    zero_page(path, root)

    report = salvage(path, tmp_path / "new")

    assert f"page {root} of the records database" in report["damaged_pages"][0]
    assert report["lost"] == [{"lsn": older_entries + 1, **({"through_lsn": newest_entries}
                                                           if newest_entries > older_entries + 1 else {}),
                               "transfer": None, "why": _tools_salvage.AFTER_THE_SNAPSHOT}]
    assert_a_prefix_was_saved(pristine, tmp_path / "new", report, older_entries + 1)
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.get_transfer("last") is None and copy.get_transfer(f"t-{TRANSFERS - 1}") is not None


def test_a_data_file_whose_meta_pages_are_both_damaged_has_nothing_to_salvage(pristine: Pristine,
                                                                              tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    zero_page(path, 0)
    zero_page(path, 1)

    with pytest.raises(JournalCorrupted, match="meta page"):
        salvage(path, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_recover_points_to_the_salvage_and_the_cli_prints_what_it_saved(pristine: Pristine, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = copy_of(pristine, tmp_path)
    leaf = max(pgno for pgno, (depth, _, _) in records_pages(path).items() if depth == 3)
    zero_page(path, leaf)

    assert _cli.main(["recover", str(path)]) == 1
    said = capsys.readouterr().out
    assert f"`tally recover {path} --salvage --into NEW` copies the records it can still read" in said

    assert _cli.main(["recover", str(path), "--salvage", "--into", str(tmp_path / "new"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["records_copied"] > 0 and report["damaged_pages"] and report["lost"]


def test_rescue_of_a_whole_ledger_reads_every_record_as_stored(pristine: Pristine, tmp_path: Path) -> None:
    """The pair check of the rescue's page walk: on a ledger that opens, it reads exactly the
    records LMDB serves, byte for byte, and no damage."""
    path = copy_of(pristine, tmp_path)
    rescued = rescue(str(path), str(tmp_path / "scratch"), INDEX_NAMES)

    assert rescued.records_read == pristine.last_lsn and rescued.through_lsn == pristine.last_lsn
    assert rescued.first_missing_lsn is None and not rescued.records_faults and not rescued.snapshot_faults
    original, copy = (Journal.open_readonly(where, index_names=INDEX_NAMES)
                      for where in (path, tmp_path / "scratch"))
    try:
        assert copy.problem is None and copy.last_lsn == original.last_lsn
        assert list(copy.scan()) == list(original.scan()) and copy.head() == original.head()
    finally:
        original.close()
        copy.close()


def test_salvage_after_any_one_records_page_is_zeroed_saves_the_records_before_it(pristine: Pristine,
                                                                                   tmp_path: Path) -> None:
    """Seeded: a few pages of the records tree, leaves and branches, each zeroed in a fresh copy."""
    pages = records_pages(pristine.path)
    chosen = random.Random(7).sample(sorted(pgno for pgno, (depth, _, _) in pages.items() if depth > 1), 4)
    for pgno in chosen:
        where = tmp_path / str(pgno)
        path = copy_of(pristine, where)
        zero_page(path, pgno)
        report = salvage(path, where / "new")
        assert_a_prefix_was_saved(pristine, where / "new", report, pages[pgno][1])


def test_a_damaged_data_file_holding_another_history_of_this_ledger_is_refused(pristine: Pristine,
                                                                                 tmp_path: Path) -> None:
    """A copy of the ledger that went on elsewhere, its data file copied back and then damaged:
    the same ledger id, but the record at the anchor's durable LSN is not the one the anchor saw
    made durable there. The rescue reads that record around the damage and refuses the file."""
    path, elsewhere = copy_of(pristine, tmp_path / "here"), copy_of(pristine, tmp_path / "elsewhere")
    with Ledger.open(path) as ledger:
        ledger.transfer("here", source="bank", destination="a00", amount=5)
    with Ledger.open(elsewhere) as ledger:
        for n in range(3):
            ledger.transfer(f"there-{n}", source="bank", destination="a01", amount=7)
    shutil.copyfile(elsewhere / "data.mdb", path / "data.mdb")
    (path / "tally.seal").unlink(missing_ok=True)
    leaves = sorted((first, pgno) for pgno, (depth, first, _) in records_pages(path).items() if depth == 3)
    zero_page(path, leaves[len(leaves) // 2][1])

    with pytest.raises(JournalCorrupted, match="holds another history"):
        salvage(path, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_damaged_overflow_run_loses_the_leaf_that_names_it_and_the_copy_stops_there(pristine: Pristine,
                                                                                       tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    walked = _mapped(path)
    assert walked.overflows, "the fixture's checkpoints should lie on overflow runs"
    leaf, run = walked.overflows[-1]
    first, last = walked.noted[leaf][2:]
    zero_page(path, run)

    report = salvage(path, tmp_path / "new")

    assert_a_prefix_was_saved(pristine, tmp_path / "new", report, first)
    assert f"overflow run at page {run}" in report["problem"]
    assert lsns_of(row for row in report["lost"] if row["why"] == _tools_salvage.IN_A_DAMAGED_PAGE) == list(
        range(first, last + 1))


def test_a_meta_page_whose_transaction_id_is_damaged_is_not_taken_for_the_newest(pristine: Pristine,
                                                                                 tmp_path: Path) -> None:
    """A high byte of the older meta page's transaction id flipped: it reads as the newer by
    its id, but the anchor names the transaction it saw flushed last, the other one's."""
    path = copy_of(pristine, tmp_path)
    with Ledger.open(path) as ledger:
        ledger.transfer("last", source="bank", destination="a00", amount=5)
    older = min(read_metas_of(path), key=lambda meta: meta.txnid)
    flip_txnid_top_byte(path, older)

    report = salvage(path, tmp_path / "new")

    assert report["lost"] == [] and report["first_corrupt_lsn"] is None, report["lost"][:3]
    assert "not two consecutive ones" in report["damaged_pages"][0]
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.get_transfer("last") is not None


def test_a_lost_record_at_the_anchors_durable_lsn_says_the_history_is_unchecked(pristine: Pristine,
                                                                                tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    leaf, (_, first, _) = max(records_pages(path).items(), key=lambda page: page[1][1])  # the durable LSN's
    zero_page(path, leaf)

    report = salvage(path, tmp_path / "new")

    assert report["history_unchecked"] is not None and f"LSN {pristine.last_lsn}" in report["history_unchecked"]
    assert_a_prefix_was_saved(pristine, tmp_path / "new", report, first)


def test_a_page_the_device_cannot_read_is_gone_around_as_damage(pristine: Pristine, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = copy_of(pristine, tmp_path)
    pages = records_pages(path)
    leaf = sorted((first, pgno) for pgno, (depth, first, _) in pages.items() if depth == 3)[100][1]
    real, damaged = os.pread, os.stat(path / "data.mdb")

    def pread(fd: int, count: int, offset: int) -> bytes:
        found = os.fstat(fd)
        if offset <= leaf * PAGE < offset + count and (found.st_dev, found.st_ino) == (damaged.st_dev, damaged.st_ino):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, count, offset)

    monkeypatch.setattr(os, "pread", pread)
    report = salvage(path, tmp_path / "new")
    monkeypatch.undo()

    assert "I/O error" in report["problem"]
    assert_a_prefix_was_saved(pristine, tmp_path / "new", report, pages[leaf][1])


def test_the_normal_salvage_refuses_another_ledgers_data_file_with_a_record_missing(pristine: Pristine,
                                                                                   tmp_path: Path) -> None:
    """Opened (no page damaged), a data file with a gap in its records: the ledger id is checked
    before the gap is named, so none of another ledger's records is copied."""
    path = copy_of(pristine, tmp_path)
    other = tmp_path / "other"
    with Ledger.open(other) as ledger:
        ledger.create_account("x", currency="USD")
    shutil.copyfile(other / "tally.anchor", path / "tally.anchor")
    with lmdb.open(str(path), max_dbs=8, subdir=True) as env:
        with env.begin(write=True, db=env.open_db(b"records", create=False)) as txn:
            assert txn.delete((100).to_bytes(8, "big"))

    with pytest.raises(JournalCorrupted, match="belongs to ledger"):
        salvage(path, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_meta_page_whose_last_page_number_is_damaged_is_named_and_the_other_one_read(pristine: Pristine,
                                                                                       tmp_path: Path) -> None:
    """Its top byte flipped, the snapshot's last page lies far past any map: LMDB refused the
    file as one whose map another process grew (an operating error, naming no damage)."""
    path = copy_of(pristine, tmp_path)
    with Ledger.open(path) as ledger:  # the last commit: in the newest snapshot only
        ledger.transfer("last", source="bank", destination="a00", amount=5)
    newest = newest_meta(path)
    older_entries, newest_entries = (snapshot[1] for snapshot in sorted(snapshots(path)))
    assert older_entries < newest_entries, "the last commit should be the one that wrote the transfer 'last'"
    with open(path / "data.mdb", "r+b") as data:  # mm_last_pg's top byte
        data.seek(newest.number * PAGE + 16 + 24 + 2 * 48 + 7)
        data.write(b"\x40")

    with pytest.raises(JournalCorrupted, match=f"meta page {newest.number} .*last page"):
        Ledger.open(path)
    report = salvage(path, tmp_path / "new")

    assert f"meta page {newest.number}" in report["damaged_pages"][0]
    assert report["first_corrupt_lsn"] == older_entries + 1
    assert_a_prefix_was_saved(pristine, tmp_path / "new", report, older_entries + 1)


def test_without_an_anchor_a_damaged_meta_page_says_the_last_commits_may_be_lost(pristine: Pristine,
                                                                                 tmp_path: Path) -> None:
    """Nothing says how far the ledger reached: the snapshot read may not be the newest, and the
    report must not say every record was read."""
    path = copy_of(pristine, tmp_path)
    (path / "tally.anchor").unlink()
    newest = newest_meta(path)
    zero_page(path, newest.number)

    report = salvage(path, tmp_path / "new")

    assert report["verdict"].endswith("its last commits may be lost")
    assert report["anchor_problem"] is not None and report["first_corrupt_lsn"] is None


def test_without_an_anchor_a_salvage_that_lost_records_says_the_anchor_is_missing(pristine: Pristine,
                                                                                  tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    (path / "tally.anchor").unlink()
    first, pgno = sorted((first, pgno) for pgno, (depth, first, _) in records_pages(path).items() if depth == 3)[50]
    zero_page(path, pgno)

    report = salvage(path, tmp_path / "new")

    assert report["first_corrupt_lsn"] == first
    assert report["anchor_problem"] is not None and "anchor is missing" in report["anchor_problem"]
    assert ".salvaging-" not in report["anchor_problem"]


def test_a_damaged_records_count_is_not_taken_for_records_lost_in_a_page(pristine: Pristine, tmp_path: Path) -> None:
    """A bit of the records database's entry count flipped (in the catalog), and a leaf in the
    middle zeroed: the records past the last one read are no page's that was found damaged, so
    the count past them is said for what it is, not listed as lost in a damaged page."""
    path = copy_of(pristine, tmp_path)
    pages = records_pages(path)
    first, last, pgno = sorted((first, last, pgno) for pgno, (depth, first, last) in pages.items() if depth == 3)[60]
    newest = newest_meta(path)
    with open(path / "data.mdb", "r+b") as data:
        catalog = bytearray(data.read()[newest.main.root * PAGE: (newest.main.root + 1) * PAGE])
        at = catalog.index(RECORDS_DB) + len(RECORDS_DB) + 32  # its MDB_db record's md_entries
        catalog[at + 3] ^= 0x01  # 2**24 more
        data.seek(newest.main.root * PAGE)
        data.write(catalog)
    zero_page(path, pgno)

    report = salvage(path, tmp_path / "new")

    assert_a_prefix_was_saved(pristine, tmp_path / "new", report, first)
    in_page = [row for row in report["lost"] if row["why"] == _tools_salvage.IN_A_DAMAGED_PAGE]
    assert lsns_of(in_page) == list(range(first, last + 1))
    tail = report["lost"][-1]
    assert tail["why"] == _tools_salvage.COUNTED_NOT_FOUND and tail["lsn"] == pristine.last_lsn + 1


def test_without_an_anchor_a_damaged_transaction_id_does_not_pass_the_older_snapshot_for_the_newest(
        pristine: Pristine, tmp_path: Path) -> None:
    """The older meta page's id made the larger by a flipped bit, and no anchor to say which was
    flushed last: both snapshots are read and the one reaching further kept, and the verdict
    does not claim the ledger's end is known."""
    path = copy_of(pristine, tmp_path)
    with Ledger.open(path) as ledger:
        ledger.transfer("last", source="bank", destination="a00", amount=5)
    (path / "tally.anchor").unlink()
    older = min(read_metas_of(path), key=lambda meta: meta.txnid)
    flip_txnid_top_byte(path, older)

    report = salvage(path, tmp_path / "new")

    assert report["lost"] == [] and report["verdict"].endswith("its last commits may be lost")
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.get_transfer("last") is not None


def test_an_anchor_a_commit_behind_does_not_keep_the_newest_snapshot_from_being_read(pristine: Pristine,
                                                                                      tmp_path: Path) -> None:
    """A writer killed after a commit's flush, before its anchor moved: the anchor names the
    snapshot before. The newest is whole, and read (a page only its indexes use is damaged)."""
    path = copy_of(pristine, tmp_path)
    behind = (path / "tally.anchor").read_bytes()
    with Ledger.open(path) as ledger:
        ledger.transfer("last", source="bank", destination="a00", amount=5)
    (path / "tally.anchor").write_bytes(behind)
    leaf = max(pgno for pgno, (name, depth, _, _) in tree_pages(path).items() if name == b"transfers" and depth == 2)
    zero_page(path, leaf)

    report = salvage(path, tmp_path / "new")

    assert report["lost"] == [] and report["first_corrupt_lsn"] is None
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.get_transfer("last") is not None


def test_a_damaged_meta_database_is_stood_in_for_by_the_anchor_and_nothing_is_lost(pristine: Pristine,
                                                                                  tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    with Ledger.open(path) as ledger:
        ledger.transfer("last", source="bank", destination="a00", amount=5)
    meta_leaf = next(pgno for pgno, (name, _, _, _) in tree_pages(path).items() if name == b"meta")
    zero_page(path, meta_leaf)

    report = salvage(path, tmp_path / "new")

    assert report["lost"] == [] and report["first_corrupt_lsn"] is None
    assert f"page {meta_leaf} of the meta database" in report["problem"]
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.get_transfer("last") is not None


@pytest.mark.parametrize("whose", ["another ledger's", "this ledger's, its durable record lost too"])
def test_a_damaged_meta_database_is_not_stood_in_for_when_nothing_shows_the_file_is_the_anchors(
        pristine: Pristine, tmp_path: Path, whose: str) -> None:
    """The anchor stands in for a damaged meta database (the ledger's id) only once the record at
    its durable LSN is read with its digest: another ledger's file with fewer records (or this
    ledger's, that record lost as well) is refused, and nothing is written."""
    path = copy_of(pristine, tmp_path)
    if whose == "another ledger's":
        other = tmp_path / "other"
        with Ledger.open(other) as ledger:
            ledger.create_account("bank", currency="USD", overdraft_limit=None)
            ledger.create_account("x", currency="USD")
            ledger.transfer("t", source="bank", destination="x", amount=7)
        shutil.copyfile(other / "data.mdb", path / "data.mdb")
    meta_roots = meta_database_roots(path)
    if whose != "another ledger's":
        zero_page(path, max(records_pages(path).items(), key=lambda page: page[1][1])[0])  # the durable LSN's leaf
    for root in meta_roots:
        zero_page(path, root)
    damaged = file_digest(path)
    assert _tools_audit.verify(str(path))["salvage_reads_around"] is False  # (no salvage advised)

    with pytest.raises(JournalCorrupted, match=f"nothing else in it shows it is this ledger's: the record at LSN "
                                               f"{pristine.last_lsn}, which the anchor saw durable, was not read"):
        salvage(path, tmp_path / "new")
    assert file_digest(path) == damaged and not (tmp_path / "new").exists()


def test_every_meta_database_damaged_is_stood_in_for_once_the_record_at_the_durable_lsn_carries_the_digest(
        pristine: Pristine, tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    for root in meta_database_roots(path):
        zero_page(path, root)
    assert _tools_audit.verify(str(path))["salvage_reads_around"] is True

    report = salvage(path, tmp_path / "new")

    assert report["lost"] == [] and report["first_corrupt_lsn"] is None and report["history_unchecked"] is None
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.state_hash() == pristine.state_hash


def test_the_anchors_record_in_the_older_snapshot_vouches_for_the_file_when_the_newests_copy_is_damaged(
        pristine: Pristine, tmp_path: Path) -> None:
    """Every meta database damaged, the anchor a commit behind (a power loss leaves it so: it is
    not flushed), its record's leaf damaged in the newest snapshot and whole in the one before:
    whose file it is is decided once for the file, so verify advises the salvage, and the
    salvage reads the snapshot before (it refused at the newest, where verify had said yes)."""
    path = copy_of(pristine, tmp_path)
    with Ledger.open(path) as ledger:  # a commit that rewrites the last leaf
        ledger.transfer("last", source="bank", destination="a00", amount=5)
    older, newest = sorted(read_metas_of(path), key=lambda meta: meta.txnid)

    durable = min(entries for _, entries, _ in snapshots(path))  # the older's last record: in both
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        digest = journal.head_at(durable).digest
    finally:
        journal.close()
    anchor = read_anchor(str(path))
    assert anchor is not None
    os.unlink(path / "tally.anchor")
    create_anchor(str(path), anchor.ledger_id, anchor.format_version, durable, digest)
    damaged_leaf = leaf_holding(path, newest, durable)
    assert damaged_leaf != leaf_holding(path, older, durable)
    for root in meta_database_roots(path):
        zero_page(path, root)
    zero_page(path, damaged_leaf)
    assert _tools_audit.verify(str(path))["salvage_reads_around"] is True

    report = salvage(path, tmp_path / "new")

    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.get_transfer("last") is None and copy.outcome(f"t-{TRANSFERS - 1}") is not None
    assert report["first_corrupt_lsn"] is not None and report["first_corrupt_lsn"] > durable


@pytest.mark.parametrize("damage", ["the older snapshot's meta database and the newest's leaf of the durable LSN",
                                    "a leaf both snapshots share, far from the durable LSN",
                                    "the older snapshot's meta database, the newest's durable record and an index page",
                                    "the older snapshot's meta database and the newest's durable record"])
def test_a_copy_that_went_on_elsewhere_is_refused_whichever_snapshot_shows_its_other_history(
        tmp_path: Path, damage: str) -> None:
    """This ledger's data file replaced by a copy of it that went on elsewhere (its id, another
    record at the anchor's durable LSN): a snapshot that shows the other history refuses the
    whole file, though the one read first lacks that record (it was salvaged as this ledger's,
    the other history and all); and verify does not advise the salvage."""
    def make(path: Path, first: int, count: int, prefix: str) -> None:
        with Ledger.open(path, checkpoint_interval=10**6) as ledger:
            if not first:
                ledger.create_account("bank", currency="USD", overdraft_limit=None)
                ledger.create_account("x", currency="USD")
            for n in range(first, first + count):
                ledger.transfer(f"{prefix}{n}", source="bank", destination="x", amount=1 + n, metadata=NOTE)

    ours, fork = tmp_path / "ours", tmp_path / "fork"
    make(ours, 0, 60, "t")
    shutil.copytree(ours, fork)
    make(ours, 60, 60, "t")
    make(fork, 60, 61, "f")  # its last commit rewrites the leaf of the LSN our anchor saw durable
    path = tmp_path / "ledger"
    shutil.copytree(ours, path)
    shutil.copyfile(fork / "data.mdb", path / "data.mdb")
    anchor = read_anchor(str(path))
    assert anchor is not None
    older, newest = sorted(read_metas_of(path), key=lambda meta: meta.txnid)
    if damage.startswith("the older"):
        durable_leaf = leaf_holding(path, newest, anchor.durable_lsn)
        assert durable_leaf != leaf_holding(path, older, anchor.durable_lsn)
        if damage.endswith("record"):  # the file opens, its open's check of that record fails: the older shows it
            flip_a_value_byte(path, durable_leaf, anchor.durable_lsn)
        elif damage.endswith("index page"):  # the newest reads whole but for a byte of that record: the older is not read
            older_pages = _mapped_at(path, older).noted
            zero_page(path, next(pgno for pgno, (name, *_) in _mapped_at(path, newest).noted.items()
                                 if name in {index.encode() for index in INDEX_NAMES} and pgno not in older_pages))
            flip_a_value_byte(path, durable_leaf, anchor.durable_lsn)
        else:
            zero_page(path, durable_leaf)
        zero_page(path, meta_database_root(path, older))
    else:
        shared = leaf_holding(path, newest, 40)
        assert shared == leaf_holding(path, older, 40) != leaf_holding(path, newest, anchor.durable_lsn)
        zero_page(path, shared)
    damaged = file_digest(path)
    assert _tools_audit.verify(str(path)).get("salvage_reads_around") is (None if damage.endswith("record") else False)

    with pytest.raises(JournalCorrupted, match=f"the record at LSN {anchor.durable_lsn} is not the one"):
        salvage(path, tmp_path / "new")
    assert file_digest(path) == damaged and not (tmp_path / "new").exists()


def test_a_file_that_opens_with_the_record_at_the_durable_lsn_damaged_says_the_history_is_unchecked(
        pristine: Pristine, tmp_path: Path) -> None:
    """The open could not hold that record to the anchor's digest, nor can any snapshot (it is
    the newest commit's): the copy is made, and the report says nothing vouches for it."""
    path = copy_of(pristine, tmp_path)
    with Ledger.open(path) as ledger:
        ledger.transfer("last", source="bank", destination="a00", amount=5)
    anchor = read_anchor(str(path))
    assert anchor is not None
    flip_a_value_byte(path, leaf_holding(path, newest_meta(path), anchor.durable_lsn), anchor.durable_lsn)

    report = salvage(path, tmp_path / "new")

    assert report["first_corrupt_lsn"] == anchor.durable_lsn
    assert report["history_unchecked"] is not None and f"LSN {anchor.durable_lsn}" in report["history_unchecked"]


def flip_a_value_byte(path: Path, leaf: int, lsn: int) -> None:
    """A bit of the value of the record at `lsn` in the records leaf `leaf` flipped: it fails its checksum."""
    with open(path / "data.mdb", "r+b") as data:
        data.seek(leaf * PAGE)
        page = bytearray(data.read(PAGE))
        at = page.index(lsn_key(lsn))
        assert int.from_bytes(page[at - 2 : at], "little") == 8  # its node's key size: the key itself
        page[at + 8 + 30] ^= 0x01
        data.seek(leaf * PAGE)
        data.write(page)


def test_another_ledgers_unchained_record_at_the_anchors_durable_lsn_is_no_proof_of_whose_file_it_is(
        tmp_path: Path) -> None:
    """Both meta databases damaged: the record at the anchor's durable LSN must carry the
    anchor's digest, and an unchained one (formats 1-3) is held to an empty chain there, as
    the open holds it; another ledger's is refused, where it was taken as this ledger's."""
    def make(path: Path, transfers: int) -> None:
        with Ledger.open(path) as ledger:
            ledger.create_account("bank", currency="USD", overdraft_limit=None)
            ledger.create_account("x", currency="USD")
            for n in range(transfers):
                ledger.transfer(f"t{n}", source="bank", destination="x", amount=1 + n)

    make(tmp_path / "ours", 10)
    make(tmp_path / "other", 30)
    with lmdb.open(str(tmp_path / "other"), max_dbs=16, subdir=True) as env:  # as formats 1-3 held records
        records_db = env.open_db(RECORDS_DB, create=False)
        with env.begin(write=True, db=records_db) as txn:
            for key, value in list(txn.cursor()):
                lsn = int.from_bytes(key, "big")
                txn.put(key, frame_unchained(lsn, unframe_chained(lsn, bytes(value))[1]))
    path = tmp_path / "ours"
    shutil.copyfile(tmp_path / "other" / "data.mdb", path / "data.mdb")
    for root in meta_database_roots(path):
        zero_page(path, root)
    damaged = file_digest(path)

    with pytest.raises(JournalCorrupted, match=f"in {re.escape(str(path / 'data.mdb'))}: .*another history"):
        salvage(path, tmp_path / "new")  # (the file named, as the rescue refuses it: not the scratch copy's)
    assert file_digest(path) == damaged and not (tmp_path / "new").exists()


def test_a_skipped_last_subtree_with_nothing_to_say_how_many_it_held_says_the_end_is_unknown(
        pristine: Pristine, tmp_path: Path) -> None:
    """No anchor, the records count damaged low, the last leaf zeroed: nothing says how far the
    records reached, and the verdict must not say every record was read."""
    path = copy_of(pristine, tmp_path)
    (path / "tally.anchor").unlink()
    leaf = max(records_pages(path).items(), key=lambda page: page[1][1])[0]
    set_records_count(path, 10)
    zero_page(path, leaf)

    report = salvage(path, tmp_path / "new")

    assert report["first_corrupt_lsn"] is None
    assert report["verdict"].endswith("its last commits may be lost"), report["verdict"]


def test_recover_does_not_advise_a_salvage_when_no_snapshots_records_root_reads(pristine: Pristine,
                                                                                  tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    for _, _, root in snapshots(path):
        zero_page(path, root)

    assert _tools_audit.recover(str(path), dry_run=True)["salvage_reads_around"] is False
    with pytest.raises(JournalCorrupted, match="nothing in it can be read"):
        salvage(path, tmp_path / "new")


def test_a_damaged_key_that_makes_the_last_lsn_huge_lists_what_was_lost_without_walking_every_lsn(
        pristine: Pristine, tmp_path: Path) -> None:
    """A bit of the last record's key flipped high: the page still reads (its keys ascend), and the
    journal's last LSN is some 2**61. The lost list is made of the records there are, and of one
    row for the LSNs none holds: it walked every LSN up to that last one (a salvage that never ended)."""
    path = copy_of(pristine, tmp_path)
    leaf = max(records_pages(path).items(), key=lambda page: page[1][1])[0]
    with open(path / "data.mdb", "r+b") as data:
        data.seek(leaf * PAGE)
        page = bytearray(data.read(PAGE))
        last = pristine.last_lsn.to_bytes(8, "big")
        at = page.rindex(last)
        page[at] ^= 0x20
        data.seek(leaf * PAGE)
        data.write(page)

    report = salvage(path, tmp_path / "new")

    huge = int.from_bytes(bytes([last[0] ^ 0x20]) + last[1:], "big")
    assert report["first_corrupt_lsn"] == pristine.last_lsn
    assert {"lsn": pristine.last_lsn, "through_lsn": huge - 1, "transfer": None,
            "why": _tools_salvage.MISSING} in report["lost"]


def _flip_in_page(path: Path, pgno: int, marker: bytes, at: int, mask: int) -> None:
    """Flip `mask` in the byte `at` past the start of `marker` in page `pgno` (found there once)."""
    with open(path / "data.mdb", "r+b") as data:
        data.seek(pgno * PAGE)
        page = bytearray(data.read(PAGE))
        assert page.count(marker) == 1, (pgno, marker)
        page[page.index(marker) + at] ^= mask
        data.seek(pgno * PAGE)
        data.write(page)


@pytest.mark.parametrize("damage", ["the main database's key of the meta database", "the meta database's format key",
                                    "the meta database's ledger id key"])
def test_damage_in_the_newest_snapshots_catalog_or_identity_reads_the_snapshot_before_it(
        pristine: Pristine, tmp_path: Path, damage: str) -> None:
    """A bit flipped in the newest snapshot's main database (the meta database's name) or its
    meta database (the format key, the ledger id's key) is damage, not a format or another
    ledger's file: `tally verify` advises the salvage (`salvage_reads_around`), which reads the
    snapshot before it (the anchor's ledger), and copies
    every commit but the last (bench_faults' 9 "refused" leaf flips of seed 1)."""
    path = copy_of(pristine, tmp_path)
    main_root = newest_meta(path).main.root
    if damage.startswith("the main"):
        _flip_in_page(path, main_root, META_DB + bytes(1), len(META_DB) - 1, 0x80)  # b"meta" -> b"met\xe1"
    else:
        with open(path / "data.mdb", "rb") as data:
            data.seek(main_root * PAGE)
            catalog = data.read(PAGE)
        record = catalog[catalog.index(META_DB) + len(META_DB):]  # (the meta database's MDB_db record follows)
        meta_root = Database.parse(record[:48]).root
        if damage.endswith("format key"):
            _flip_in_page(path, meta_root, FORMAT_KEY, 0, 0x01)
        else:
            _flip_in_page(path, meta_root, LEDGER_ID_KEY, len(LEDGER_ID_KEY) - 1, 0x80)  # "ledger_id": "ledger_i\xe4"
    damaged = file_digest(path)
    assert _tools_audit.verify(str(path))["salvage_reads_around"] is True

    report = salvage(path, tmp_path / "new")

    assert file_digest(path) == damaged
    assert _tools_audit.verify(str(tmp_path / "new"))["verdict"] == "whole"
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        held = [all(copy.get_transfer(tid) is not None for tid in ids) for _, ids in sorted(pristine.transfers.items())]
    kept = held.index(False) if False in held else len(held)
    assert not any(held[kept:]) and kept > len(held) // 2, (kept, len(held))  # a prefix
    assert report["verdict"].startswith("salvaged"), report  # (the last commit may have held no transfer)


def test_a_ledger_id_damaged_or_another_ledgers_is_refused_and_nothing_is_written(pristine: Pristine,
                                                                                   tmp_path: Path) -> None:
    """A bit of the newest snapshot's ledger id flipped reads as another ledger's file: one bit
    cannot be told from another ledger's id, so the salvage refuses it (never reading the
    snapshot before it as this ledger's) and writes nothing."""
    path = copy_of(pristine, tmp_path)
    main_root = newest_meta(path).main.root
    with open(path / "data.mdb", "rb") as data:
        data.seek(main_root * PAGE)
        catalog = data.read(PAGE)
    meta_root = Database.parse(catalog[catalog.index(META_DB) + len(META_DB):][:48]).root
    _flip_in_page(path, meta_root, LEDGER_ID_KEY, len(LEDGER_ID_KEY) + 3, 0x04)
    damaged = file_digest(path)
    with pytest.raises(JournalCorrupted, match="belongs to ledger"):
        salvage(path, tmp_path / "new")
    assert file_digest(path) == damaged and not (tmp_path / "new").exists()
