"""A salvage of a data file whose pages keep it from opening (`journal._rescue`): its records are
read page by page around the damage, and everything before the first record lost is copied.

Each test damages a real ledger's data file where a disk would (a page zeroed, a byte of a
branch flipped, a meta page gone) and holds the salvage to what the ledger held before the
damage: NEW verifies whole, holds exactly the transfers committed before the first LSN lost (the
same ids, amounts and balances), the report lists every record lost, and the damaged ledger is
left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from coordinator import INDEX_NAMES, Checkpointed, Committed, records
from engine import JournalCorrupted, Ledger, TransferRequest
from engine import _cli, _tools_audit, _tools_copy
from journal import Journal, rescue
from journal._meta import Database, Meta, committed_meta, read_metas
from journal._names import RECORDS_DB
from journal._pages import PageWalk, Tree

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

    def page(self, name: bytes, pgno: int, depth: int, low: bytes | None, high: bytes | None, found: Tree,
             integer_keys: bool) -> None:
        before, previous = found.entries, found.last_key
        super().page(name, pgno, depth, low, high, found, integer_keys)
        start = int.from_bytes(previous, "big") + 1 if previous is not None and name == RECORDS_DB else 1
        self.noted[pgno] = (name, depth, start, start + found.entries - before - 1)


def tree_pages(path: Path) -> dict[int, tuple[bytes, int, int, int]]:
    """Each page of each named tree of the ledger at `path`: (tree, depth, first LSN, last LSN
    under it: of a page of the records)."""
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        meta = committed_meta(*read_metas(fd, data_file), data_file)
        walk = _Mapped(fd, meta, data_file)
        catalog: dict[bytes, bytes] = {}
        walk.visit = lambda _name, keys, values: catalog.update(zip(keys, values, strict=True))
        walk.catalog = True
        walk.tree(b"", meta.main)
        walk.catalog = False
        walk.visit = None
        for name, record in catalog.items():
            walk.tree(name, Database.parse(record))
        return walk.noted
    finally:
        os.close(fd)


def records_pages(path: Path) -> dict[int, tuple[int, int, int]]:
    """Each page of the records tree of the ledger at `path`: (depth, first LSN, last LSN under it)."""
    return {pgno: (depth, first, last) for pgno, (name, depth, first, last) in tree_pages(path).items()
            if name == RECORDS_DB}


def zero_page(path: Path, pgno: int) -> None:
    with open(path / "data.mdb", "r+b") as data:
        data.seek(pgno * PAGE)
        data.write(bytes(PAGE))


def file_digest(path: Path) -> str:
    return hashlib.sha256((path / "data.mdb").read_bytes()).hexdigest()


def salvage(path: Path, into: Path) -> dict:
    return _tools_copy.salvage(str(path), str(into))


def assert_a_prefix_was_saved(pristine: Pristine, into: Path, report: dict, first_lost: int) -> None:
    """NEW verifies whole and holds exactly the transfers the ledger committed before LSN
    `first_lost`; the report lists every commit from there on as lost, by its transfer ids."""
    assert report["first_corrupt_lsn"] == first_lost and report["whole"] is False
    assert report["verdict"] == "salvaged: everything before the first corrupt record was copied"
    assert _tools_audit.verify(str(into))["verdict"] == "whole"
    kept = [tid for lsn, ids in sorted(pristine.transfers.items()) if lsn < first_lost for tid in ids]
    gone = {tid for lsn, ids in pristine.transfers.items() if lsn >= first_lost for tid in ids}
    with Ledger.open(into, readonly=True) as copy:
        for tid in kept:
            made = copy.get_transfer(tid)
            assert made is not None and made.amount == 100 + int(tid[2:]) % 7, tid
        assert all(copy.get_transfer(tid) is None for tid in sorted(gone)[:200])
        assert sum(copy.balance(f"a{n:02d}").posted for n in range(ACCOUNTS)) == sum(
            100 + int(tid[2:]) % 7 for tid in kept)
    listed = {row["transfer"] for row in report["lost"] if row["transfer"] is not None}
    lost_lsns = [row["lsn"] for row in report["lost"]]
    assert lost_lsns == sorted(set(lost_lsns)) and lost_lsns[0] == first_lost
    read = {tid for row in report["lost"] if row["why"] == "commit after the corruption" for tid in [row["transfer"]]}
    assert read <= gone and listed <= gone


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
    gone = [row["lsn"] for row in report["lost"] if row["why"].startswith("in a damaged page of the records")]
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
    gone = [row["lsn"] for row in report["lost"] if row["why"].startswith("in a damaged page")]
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
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        newest = committed_meta(*read_metas(fd, data_file), data_file)
    finally:
        os.close(fd)
    zero_page(path, newest.number)

    report = salvage(path, tmp_path / "new")

    assert report["first_corrupt_lsn"] <= last_lsn and report["whole"] is False
    assert f"meta page {newest.number}" in report["problem"]
    lost = {row["lsn"]: row["why"] for row in report["lost"]}
    assert last_lsn in lost and lost[last_lsn].startswith("written after the snapshot read")
    with Ledger.open(tmp_path / "new", readonly=True) as copy:
        assert copy.get_transfer("last") is None and copy.get_transfer(f"t-{TRANSFERS - 1}") is not None
    assert _tools_audit.verify(str(tmp_path / "new"))["verdict"] == "whole"


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


def test_a_ledger_whose_records_root_is_damaged_has_nothing_to_salvage(pristine: Pristine, tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path)
    root = next(pgno for pgno, (depth, _, _) in records_pages(path).items() if depth == 1)
    zero_page(path, root)

    with pytest.raises(JournalCorrupted, match="nothing to salvage"):
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
    rescued = rescue(str(pristine.path), str(tmp_path / "scratch"), INDEX_NAMES)

    assert rescued.records == pristine.last_lsn and rescued.through_lsn == pristine.last_lsn
    assert rescued.first_missing_lsn is None and not rescued.records_faults and not rescued.snapshot_faults
    original, copy = (Journal.open_readonly(where, index_names=INDEX_NAMES)
                      for where in (pristine.path, tmp_path / "scratch"))
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
