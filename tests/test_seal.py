"""The seal a clean close leaves (`journal._seal`): the next open of exactly those bytes takes
the layout from it instead of walking every page; anything else walks, as before."""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lmdb
import pytest

import journal._check
from engine import JournalCorrupted, Ledger
from engine._tools_audit import verify
from journal._seal import SEAL_FILE
from support import LEFT_ASIDE, leave_aside


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count the full page walks opening makes."""
    counted: list[int] = []
    real = journal._check.walk

    def walk(*args: object, **kwargs: object) -> object:
        counted.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(journal._check, "walk", walk)
    yield counted


def build(path: Path) -> str:
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        for k in range(20):
            ledger.transfer(f"t{k}", source="bank", destination="alice", amount=1 + k)
        return ledger.state_hash()


def build_long(path: Path) -> Path:
    """A ledger long enough that its first records' leaf is never rewritten; its data file."""
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        for k in range(3000):
            ledger.transfer(f"xfer-{k:05d}", source="bank", destination="alice", amount=1)
    return path / "data.mdb"


def damage_an_old_leaf(data: Path) -> None:
    """A stray write: flip the page number in the header of every page holding `xfer-00010`
    (its record's leaf and its index entries' leaves, old ones, never rewritten, and any stale
    copy of one in a free page), which the page walk checks."""
    content = data.read_bytes()
    headers = {match.start() // 4096 * 4096 for match in re.finditer(b"xfer-00010", content)}
    with open(data, "r+b") as handle:
        for header in sorted(headers):
            number = struct.unpack_from("<Q", content, header)[0]
            handle.seek(header)
            handle.write(struct.pack("<Q", number ^ 0x100))


def test_a_clean_close_seals_the_file_and_the_next_open_needs_no_walk(ledger_path: Path, walks: list[int]) -> None:
    state_hash = build(ledger_path)
    assert (ledger_path / SEAL_FILE).exists()
    walks.clear()
    with Ledger.open(ledger_path) as reopened:
        assert walks == []
        assert reopened.state_hash() == state_hash
        reopened.transfer("after", source="bank", destination="alice", amount=1)
    walks.clear()
    with Ledger.open(ledger_path) as again:  # sealed again at that close
        assert walks == []
        assert again.balance("alice").posted == sum(range(1, 21)) + 1


def test_a_file_committed_to_since_its_seal_is_walked(
    ledger_path: Path, walks: list[int], raw_lmdb: Callable[[Path], AbstractContextManager[lmdb.Environment]]
) -> None:
    state_hash = build(ledger_path)
    with raw_lmdb(ledger_path) as env:  # a commit that changes nothing Tally reads: a new snapshot all the same
        with env.begin(write=True) as txn:
            txn.put(b"seal-test", b"x")
            txn.delete(b"seal-test")
    walks.clear()
    with Ledger.open(ledger_path) as reopened:
        assert walks == [1]
        assert reopened.state_hash() == state_hash


def test_a_damaged_seal_is_ignored_and_the_file_walked(ledger_path: Path, walks: list[int]) -> None:
    state_hash = build(ledger_path)
    seal = ledger_path / SEAL_FILE
    damaged = bytearray(seal.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    seal.write_bytes(bytes(damaged))
    walks.clear()
    with Ledger.open(ledger_path) as reopened:
        assert walks == [1]
        assert reopened.state_hash() == state_hash


@pytest.mark.parametrize("what", ["a FIFO", "endless bytes"])
def test_a_seal_that_is_no_file_is_ignored_and_the_file_walked(
    ledger_path: Path, walks: list[int], what: str
) -> None:
    """A FIFO (whose open would wait for a writer) or a link to /dev/zero (whose read would
    never end) where the seal should be: the open reads no seal, walks, and its close seals."""
    state_hash = build(ledger_path)
    seal = ledger_path / SEAL_FILE
    seal.unlink()
    if what == "a FIFO":
        os.mkfifo(seal)
    else:
        seal.symlink_to("/dev/zero")
    walks.clear()
    with Ledger.open(ledger_path) as reopened:
        assert walks == [1]
        assert reopened.state_hash() == state_hash
    assert seal.is_file() and not seal.is_symlink()  # the close's own


@pytest.mark.parametrize("what", LEFT_ASIDE)
def test_a_close_that_finds_no_file_of_its_own_where_it_writes_the_seal_aside_names_it_and_goes_on(
    ledger_path: Path, walks: list[int], what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The seal is written aside (`tally.seal.new`) and renamed: a FIFO left there made every
    clean close wait for a reader that never comes, a link had the close write through it,
    over a file elsewhere, and a hard link had it truncate that file. Each is now left as it
    is, named in the warning, and the ledger closes unsealed (the next open walks)."""
    state_hash = build(ledger_path)
    aside = ledger_path / (SEAL_FILE + ".new")
    elsewhere = ledger_path.parent / "elsewhere"
    left_as_it_was = leave_aside(aside, elsewhere, what)
    with Ledger.open(ledger_path) as reopened:  # a commit: the close seals anew
        reopened.transfer("after", source="bank", destination="alice", amount=1)
        state_hash = reopened.state_hash()
    assert str(aside) in caplog.text and "was not written" in caplog.text
    assert not (ledger_path / SEAL_FILE).exists()
    assert left_as_it_was()
    walks.clear()
    with Ledger.open(ledger_path) as reopened:
        assert walks == [1]
        assert reopened.state_hash() == state_hash


def test_a_seal_that_cannot_be_written_leaves_no_file_aside(
    ledger_path: Path, walks: list[int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk as the close writes the seal: the ledger closes unsealed, as before, and the
    empty `tally.seal.new` it made is taken away (it was left, and a directory that lost its
    data file but kept it is called a ledger that lost its data)."""
    state_hash = build(ledger_path)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(SEAL_FILE + ".new"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", full)
        with Ledger.open(ledger_path) as reopened:  # a commit: the close seals anew
            reopened.transfer("after", source="bank", destination="alice", amount=1)
            state_hash = reopened.state_hash()
    assert "was not written" in caplog.text and "No space left" in caplog.text
    assert not (ledger_path / SEAL_FILE).exists() and not (ledger_path / (SEAL_FILE + ".new")).exists()
    walks.clear()
    with Ledger.open(ledger_path) as reopened:
        assert walks == [1]
        assert reopened.state_hash() == state_hash


def test_a_byte_changed_since_the_seal_without_a_commit_means_the_walk(ledger_path: Path, walks: list[int]) -> None:
    """Damage, not a commit: the snapshot is the sealed one, but a sum differs, so opening
    walks every page (which reports the damage if the byte is in a live page: the storage
    fault tests show that; a stale copy of a page in a free one holds nothing LMDB reads)."""
    build(ledger_path)
    data = ledger_path / "data.mdb"
    content = bytearray(data.read_bytes())
    content[content.index(b"t19") + 2] ^= 0x01
    data.write_bytes(bytes(content))
    walks.clear()
    try:
        reopened = Ledger.open(ledger_path)
    except JournalCorrupted:
        assert walks == [1]
        return
    assert walks == [1]  # the open's (the close walks again, to seal)
    reopened.close()


def test_the_audit_walks_a_sealed_file_all_the_same(ledger_path: Path, walks: list[int]) -> None:
    build(ledger_path)
    walks.clear()
    assert verify(str(ledger_path))["verdict"] == "whole"
    assert walks


def test_a_ledger_whose_journal_failed_is_not_sealed(ledger_path: Path) -> None:
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger._journal.refuse_writes("a stand-in for a bug met halfway")
    assert not (ledger_path / SEAL_FILE).exists()


def test_damage_that_lands_while_the_ledger_is_open_is_never_sealed(ledger_path: Path, walks: list[int]) -> None:
    """A page LMDB does not rewrite is damaged while the ledger is open (a stray write): the
    clean close walks before it seals, finds it, and leaves no seal, so the next open walks
    and reports it."""
    data = build_long(ledger_path)
    ledger = Ledger.open(ledger_path)  # sealed: no walk
    try:
        damage_an_old_leaf(data)
        ledger.transfer("after", source="bank", destination="alice", amount=1)
    finally:
        ledger.close()
    assert not (ledger_path / SEAL_FILE).exists()
    walks.clear()
    with pytest.raises(JournalCorrupted, match="page"):
        Ledger.open(ledger_path)
    assert walks == [1]


def test_a_close_after_an_open_that_committed_nothing_keeps_the_seal_and_walks_nothing(
    ledger_path: Path, walks: list[int]
) -> None:
    state_hash = build(ledger_path)
    sealed = (ledger_path / SEAL_FILE).read_bytes()
    walks.clear()
    with Ledger.open(ledger_path) as reopened:  # reads only
        assert reopened.state_hash() == state_hash
    assert walks == [] and (ledger_path / SEAL_FILE).read_bytes() == sealed
    with Ledger.open(ledger_path) as again:
        assert walks == [] and again.state_hash() == state_hash


def test_damage_that_lands_while_a_ledger_is_open_and_unwritten_is_never_sealed(
    ledger_path: Path, walks: list[int]
) -> None:
    """Nothing committed, but a stray write while open: the close's sums fail, so it walks
    (as before the seal was kept), finds the damage and leaves no seal."""
    data = build_long(ledger_path)
    ledger = Ledger.open(ledger_path)  # sealed: no walk
    try:
        damage_an_old_leaf(data)
    finally:
        ledger.close()
    assert walks and not (ledger_path / SEAL_FILE).exists()
    walks.clear()
    with pytest.raises(JournalCorrupted, match="page"):
        Ledger.open(ledger_path)
    assert walks == [1]


def test_a_byte_changed_while_the_close_walks_is_not_sealed(
    ledger_path: Path, walks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close sums the file before it walks: a stray write that lands on a page the walk
    has passed fails the sums, so the next open walks and reports it."""
    data = build_long(ledger_path)
    real = journal._check._walk_snapshot

    def walk_then_stray_write(*args: Any) -> Any:
        layout = real(*args)
        damage_an_old_leaf(data)
        return layout

    with Ledger.open(ledger_path) as ledger:
        ledger.transfer("after", source="bank", destination="alice", amount=1)
        monkeypatch.setattr(journal._check, "_walk_snapshot", walk_then_stray_write)  # the close's walk
    monkeypatch.setattr(journal._check, "_walk_snapshot", real)
    assert (ledger_path / SEAL_FILE).exists()  # written, but for the bytes summed before the walk
    walks.clear()
    with pytest.raises(JournalCorrupted, match="page"):
        Ledger.open(ledger_path)
    assert walks == [1]


@pytest.mark.parametrize("size_mib, end_mib", [(0, 0), (0, 3), (1, 1), (5, 5), (5, 8), (6, 6), (6, 5)])
@pytest.mark.parametrize("tail", [0, 7])
def test_the_file_is_summed_chunk_by_chunk_up_to_its_first_short_read(
    tmp_path: Path, size_mib: int, end_mib: int, tail: int
) -> None:
    """Its two halves summed on two threads give the sums of one pass: one CRC-32 a MiB up
    to `end`, the last chunk read short ending them (a file shorter than its snapshot)."""
    from journal._seal import CHUNK_BYTES, file_sums

    data = os.urandom(size_mib * CHUNK_BYTES + tail)
    end = end_mib * CHUNK_BYTES + tail
    expected = b""
    for offset in range(0, end, CHUNK_BYTES):
        chunk = data[offset:min(offset + CHUNK_BYTES, end)]
        expected += struct.pack("<I", zlib.crc32(chunk))
        if len(chunk) < min(CHUNK_BYTES, end - offset):
            break
    (tmp_path / "file").write_bytes(data)
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    try:
        assert file_sums(fd, end) == expected
    finally:
        os.close(fd)
