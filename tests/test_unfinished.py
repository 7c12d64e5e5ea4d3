"""A power loss during a commit's one flush: the next open takes back the snapshot before it.

Each commit is flushed once, its data pages and meta page together (`journal._store`), so the
machine stopping during that flush may leave the new meta page on disk and some of the
commit's pages not. No SIGKILL can make that state (the page cache keeps every write of a
killed process), so these tests make it from two copies of one ledger's files: taken just
before a transfer's commit and just after, the commit's meta page kept and its other pages
put back as they were before it, as if they never reached the disk."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from engine import JournalCorrupted, Ledger

from coordinator import INDEX_NAMES
from journal._check import walk_meta
from journal._errors import JournalCorruptedError
from journal._meta import Meta, read_metas
from journal._marks import SHAPE_FIELDS, mark_shape, marked_databases
from journal._names import COMMIT_MARK_KEY, META_DB

PAGE = 4096


def _files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("data.mdb", "tally.anchor")}


def _nodes(data: bytes, page: int) -> bytes:
    """The bytes of a page's nodes, from its `upper` offset (LMDB's page header: page number,
    pad, flags, `lower`, `upper`) to its end: not its free middle, which is no node's and may
    hold stale bytes (this ledger's own; before `journal._store` opened LMDB with `meminit`,
    of other ledgers the process had, their commit marks among them, which failed this test
    now and then)."""
    body = data[page * PAGE:(page + 1) * PAGE]
    return body[int.from_bytes(body[14:16], "little"):]


def _newer_meta(data: bytes) -> Meta:
    """The newer meta page of a data file's bytes."""
    with tempfile.NamedTemporaryFile() as handle:
        handle.write(data[: 2 * PAGE])
        handle.flush()
        fd = os.open(handle.name, os.O_RDONLY)
        try:
            meta0, meta1 = read_metas(fd, handle.name)
        finally:
            os.close(fd)
    return meta1 if meta1.txnid > meta0.txnid else meta0


def _before_and_after(tmp_path: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """A ledger's files just before the commit of transfer "last" and just after it (`_steps`)."""
    steps = _steps(tmp_path)
    return steps[-2], steps[-1]


def _torn(before: bytes, after: bytes, pages_lost: str) -> bytes:
    """`after`'s bytes with its newer meta page, and the pages its commit wrote put back as
    `before` held them (`pages_lost`: "all" of them, or only the "first"); a page past the
    end of `before` is lost with the file's growth."""
    slot = _newer_meta(after).number
    changed = [page for page in range(2, len(after) // PAGE)
               if after[page * PAGE:(page + 1) * PAGE] != before[page * PAGE:(page + 1) * PAGE]]
    assert changed, "the commit wrote no page"
    lost = changed if pages_lost == "all" else changed[:1]
    torn = bytearray(after)
    for page in lost:
        torn[page * PAGE:(page + 1) * PAGE] = before[page * PAGE:(page + 1) * PAGE].ljust(PAGE, b"\0")
    torn[slot * PAGE:(slot + 1) * PAGE] = after[slot * PAGE:(slot + 1) * PAGE]
    if len(after) > len(before) and pages_lost == "all":
        del torn[len(before):]
    return bytes(torn)


def _ledger_with(tmp_path: Path, data: bytes, anchor: bytes) -> Path:
    path = tmp_path / "torn"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    (path / "data.mdb").write_bytes(data)
    (path / "tally.anchor").write_bytes(anchor)
    return path


@pytest.mark.parametrize("pages_lost", ["all", "first"])
def test_a_commit_cut_off_in_its_flush_is_taken_back_and_the_ledger_goes_on(
        tmp_path: Path, pages_lost: str, caplog: pytest.LogCaptureFixture) -> None:
    before, after = _before_and_after(tmp_path)
    txnid = _newer_meta(after["data.mdb"]).txnid
    path = _ledger_with(tmp_path, _torn(before["data.mdb"], after["data.mdb"], pages_lost), before["tally.anchor"])
    with caplog.at_level(logging.WARNING, logger="tally.journal"):
        ledger = Ledger.open(path)
    try:
        assert f"the last commit (LMDB transaction {txnid}) was cut off while it was being flushed" in caplog.text
        assert ledger.balance("alice").posted == 500  # as before the commit: "last" never happened
        assert ledger.get_transfer("last") is None
        made = ledger.transfer("last", source="alice", destination="bank", amount=40)  # its id was never used
        assert made.amount == 40 and ledger.balance("alice").posted == 460
    finally:
        ledger.close()
    with Ledger.open(path) as again:
        assert again.balance("alice").posted == 460
        taken = again.get_transfer("last")
        assert taken is not None and taken.amount == 40


def test_a_cut_off_commit_the_anchor_saw_durable_is_damage_and_is_not_written(tmp_path: Path) -> None:
    """The anchor is written once a commit's flush returned: an anchor that names the commit
    says it was acknowledged, so its missing pages are damage, reported, the file untouched."""
    before, after = _before_and_after(tmp_path)
    torn = _torn(before["data.mdb"], after["data.mdb"], "first")
    path = _ledger_with(tmp_path, torn, after["tally.anchor"])
    with pytest.raises(JournalCorrupted) as raised:
        Ledger.open(path)
    assert "cut off" not in str(raised.value)
    assert (path / "data.mdb").read_bytes() == torn


def test_a_read_only_open_of_a_cut_off_commit_says_so_and_writes_nothing(tmp_path: Path) -> None:
    before, after = _before_and_after(tmp_path)
    torn = _torn(before["data.mdb"], after["data.mdb"], "first")
    path = _ledger_with(tmp_path, torn, before["tally.anchor"])
    with pytest.raises(JournalCorrupted, match="opening the ledger for writing takes that snapshot back"):
        Ledger.open(path, readonly=True)
    assert (path / "data.mdb").read_bytes() == torn


@pytest.mark.parametrize("pages_lost", ["all", "first"])
def test_damage_in_a_page_both_snapshots_hold_is_not_taken_back(tmp_path: Path, pages_lost: str) -> None:
    """Only the cut-off commit's own pages may be missing: a page the snapshot before holds
    (its catalog, which the commit copied, never wrote over), damaged too, is damage, and
    nothing is written."""
    before, after = _before_and_after(tmp_path)
    torn = bytearray(_torn(before["data.mdb"], after["data.mdb"], pages_lost))
    catalog = _newer_meta(before["data.mdb"]).main.root
    torn[(catalog + 1) * PAGE - 20] ^= 0xFF  # in its nodes, packed at the page's end
    path = _ledger_with(tmp_path, bytes(torn), before["tally.anchor"])
    with pytest.raises(JournalCorrupted) as raised:
        Ledger.open(path)
    assert "cut off" not in str(raised.value)
    assert (path / "data.mdb").read_bytes() == bytes(torn)


def test_a_cut_off_commit_whose_tear_fails_an_index_entry_is_said_so_by_the_audits_and_never_salvaged(
        tmp_path: Path) -> None:
    """An audit's and a salvage's opens go on past an index entry that fails its checksum (the
    indexes are made anew from the records), but not when the entry is the tear of a last
    commit cut off in its flush: that commit was never acknowledged, a writer's open takes it
    back, and a salvage must not copy it into a new ledger as if it had been."""
    from engine import _tools_audit, _tools_salvage

    before, after = _before_and_after(tmp_path)
    node = len(b"last").to_bytes(2, "little") + b"last"  # the transfers index's key of "last", as LMDB lays it
    assert after["data.mdb"].count(node) == 1 and before["data.mdb"].count(node) == 0
    torn = after["data.mdb"].replace(node, len(b"last").to_bytes(2, "little") + b"lasu")
    path = _ledger_with(tmp_path, torn, before["tally.anchor"])
    said = "opening the ledger for writing takes that snapshot back"
    for report in (_tools_audit.verify(str(path)), _tools_audit.recover(str(path), dry_run=True)):
        assert report["verdict"] == "NOT WHOLE" and said in report["problem"], report["problem"]
        assert report["index_damaged"] is False
    with pytest.raises(JournalCorrupted, match=said):
        _tools_salvage.salvage(str(path), str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists() or not os.listdir(tmp_path / "copy")
    assert (path / "data.mdb").read_bytes() == torn
    with Ledger.open(path) as ledger:  # a writer takes the commit back
        assert ledger.get_transfer("last") is None


def test_an_audits_open_that_fails_looking_for_a_cut_off_commit_closes_what_it_opened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept index damage sends an audit's open to look for a commit cut off, with the data file
    open: an error there (a file that cannot be read) leaves nothing open behind it."""
    import journal._store as store_module
    from journal import Journal, JournalError

    before, after = _before_and_after(tmp_path)
    node = len(b"last").to_bytes(2, "little") + b"last"
    path = _ledger_with(tmp_path, after["data.mdb"].replace(node, len(b"last").to_bytes(2, "little") + b"lasu"),
                        after["tally.anchor"])  # (the anchor saw it durable: damage, not a commit cut off)

    def unreadable(*_args: Any) -> None:
        raise JournalError("too many open files (a test's)")

    monkeypatch.setattr(store_module, "unfinished", unreadable)
    with pytest.raises(JournalError, match="a test's"):
        Journal.open_readonly(path, index_names=INDEX_NAMES, index_damage_kept=True)
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [name for name in held if name.startswith(str(path))], held


def _steps(tmp_path: Path) -> list[dict[str, bytes]]:
    """A ledger's files (data and anchor) before each of its last transfers and after the
    last, "last" (the ledger open and idle each time)."""
    path = tmp_path / "steps"
    ledger = Ledger.open(path)
    try:
        # The claims' warm-up reads in a transaction of its own: held across a commit, it keeps
        # the pages that commit frees from being reused, and the layout the tests rely on moves.
        assert ledger._coordinator.claims.wait_warm(30)
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        steps = []
        for n in range(5):
            steps.append(_files(path))
            ledger.transfer(f"t{n}", source="bank", destination="alice", amount=100)
        steps.append(_files(path))
        ledger.transfer("last", source="alice", destination="bank", amount=30)
        steps.append(_files(path))
    finally:
        ledger.close()
    return steps


@pytest.mark.parametrize("anchor_from", ["the commit before", "three commits before"])
def test_a_cut_off_commit_whose_mark_reached_the_disk_over_an_older_tree_is_taken_back(
        tmp_path: Path, anchor_from: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush wrote the cut-off commit's meta page and the leaf of its meta database (its
    commit mark), and none of its other pages. LMDB reuses pages in a cycle of three commits
    here, so those pages still hold, whole, the tree of the commit three before, and the walk
    from the new meta page reaches that tree's catalog, that tree's records and indexes, and
    the new commit's mark. The mark alone would pass it, opening the tree three commits back
    under the newest meta page: two acknowledged commits gone, silently when the anchor (never
    fsynced) lags as a power loss leaves it. The mark also binds the shape of every database
    its commit made, so this is the cut-off commit it is, and the snapshot before is taken
    back, every acknowledged transfer in it. The free list that meta page reaches is that older
    tree's too, older than the meta page, which the walk now refuses first
    (`journal._pages._check_free_list_age`); the mark is held to finding it without that
    check as well, each a check the other does not rely on."""
    steps = _steps(tmp_path)
    before, after = steps[-2], steps[-1]
    new, old = after["data.mdb"], before["data.mdb"]
    meta = _newer_meta(new)
    changed = [page for page in range(2, len(new) // PAGE)
               if new[page * PAGE:(page + 1) * PAGE] != old[page * PAGE:(page + 1) * PAGE]]
    mark = COMMIT_MARK_KEY + b"%d " % meta.txnid  # (a leaf node's key, its value right after: this commit's mark)
    marked = [page for page in changed if mark in _nodes(new, page)]
    assert len(marked) == 1 and len(changed) > 1
    torn = bytearray(new)
    for page in changed:
        if page not in marked:
            torn[page * PAGE:(page + 1) * PAGE] = old[page * PAGE:(page + 1) * PAGE].ljust(PAGE, b"\0")
    anchor = before["tally.anchor"] if anchor_from == "the commit before" else steps[-4]["tally.anchor"]
    for free_list_age_checked in (False, True):
        path = _ledger_with(tmp_path, bytes(torn), anchor)
        with monkeypatch.context() as patched:
            if not free_list_age_checked:
                patched.setattr("journal._pages._check_free_list_age", lambda *_: None)
                walked = walk_meta(meta, str(path / "data.mdb"), INDEX_NAMES)  # the state this test is about:
                assert walked.commit_mark == meta.txnid  # whole by the other checks, the new commit's mark,
                assert walked.layout.trees[b"records"].entries < walk_meta(  # over an older tree (fewer records)
                    _newer_meta(old), str(path / "data.mdb"), INDEX_NAMES).layout.trees[b"records"].entries
            else:
                with pytest.raises(JournalCorruptedError) as raised:
                    walk_meta(meta, str(path / "data.mdb"), INDEX_NAMES)
                assert "the free list is older than the meta page" in str(raised.value)
            with Ledger.open(path) as ledger:
                assert ledger.balance("alice").posted == 500  # t0..t4, every acknowledged transfer
                assert all(ledger.get_transfer(f"t{n}") is not None for n in range(5))
                assert ledger.get_transfer("last") is None


def test_a_commit_mark_is_its_transaction_id_then_each_marked_databases_shape_in_decimal(
    tmp_path: Path, raw_lmdb: Any
) -> None:
    """The mark the last commit wrote names that commit's transaction and the shape LMDB keeps
    of each database but the meta one (`SHAPE_FIELDS`, in `marked_databases` order), written
    as decimal numbers apart by one space: what a reopen compares with the pages it walks."""
    ledger = Ledger.open(str(tmp_path / "ledger"))
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    for n in range(12):  # numbers of two digits and more
        ledger.transfer(f"t{n}", source="bank", destination="a", amount=5)
    ledger.close()
    with raw_lmdb(tmp_path / "ledger") as env:
        with env.begin() as txn:
            names = [bytes(key) for key, _ in txn.cursor()]
            dbs = {name: env.open_db(name, txn=txn, create=False) for name in names}
            mark = txn.get(COMMIT_MARK_KEY, db=dbs[META_DB])
            shapes = [txn.stat(dbs[name]) for name in marked_databases(names)]
            expected = " ".join(str(number) for number in [txn.id()] + [
                shape[field] for shape in shapes for field in SHAPE_FIELDS])
    assert len(shapes) >= 5 and int(mark.split()[0]) >= 10 and mark == expected.encode()
    assert mark_shape(mark) == tuple(int(part) for part in expected.split()[1:])
