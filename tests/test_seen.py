"""One flush a commit, and what it asks of everyone else: a read-only reader makes a commit it
sees durable before it reads from it (`journal._seen`), a writable open flushes the last
writer's commit before it builds on it, and a flush that fails says the outcome is unknown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
from engine import Ledger, LedgerUnavailable

import journal._seen as seen_module
import journal._store as store_module
import journal._unfinished as unfinished_module
from journal import JournalError
from journal._anchor import TXNID_MASK, AnchorState, read_anchor
from journal._meta import read_metas
from journal._seen import Seen
from journal._store import Store

# A writer whose commits are never flushed, and whose anchor never says they were: what a
# reader in another process sees between a commit and its flush, held still.
UNFLUSHED_WRITER = """
import sys
from journal._anchor import Anchor
from journal._store import Store
Store.flush = lambda self, txnid=0: None
Anchor.advance = lambda self, *args, **kwargs: None
from engine import Ledger
ledger = Ledger.open(sys.argv[1])
ledger.transfer("late", source="bank", destination="alice", amount=7)
print("committed", flush=True)
sys.stdin.read()
"""


def _killed_after_its_commit(path: Path) -> None:
    """A writer of `path` killed between its commit of transfer "late" and that commit's flush."""
    writer = subprocess.Popen([sys.executable, "-c", UNFLUSHED_WRITER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "committed\n"
    finally:
        writer.kill()
        writer.wait(timeout=30)


def _data_flushes(monkeypatch: pytest.MonkeyPatch, data_file: Path) -> list[int]:
    """Every `os.fdatasync` of `data_file` from now on, by this process (the inode's number each)."""
    inode = data_file.stat().st_ino
    calls: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if os.fstat(fd).st_ino == inode:
            calls.append(inode)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


def _ledger(path: Path) -> None:
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")


def test_a_reader_flushes_a_commit_its_writer_has_not_before_reading_it(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l"
    _ledger(path)
    writer = subprocess.Popen([sys.executable, "-c", UNFLUSHED_WRITER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "committed\n"
        flushes = _data_flushes(monkeypatch, path / "data.mdb")
        with Ledger.open(path, readonly=True) as reader:
            assert reader.balance("alice").posted == 7  # the commit no one flushed is read...
            assert len(flushes) == 1  # ...once this reader flushed it
            assert reader.get_transfer("late") is not None
            assert len(flushes) == 1  # (the same snapshot: made sure of once)
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=30)
    assert writer.returncode == 0


def test_a_reader_does_not_flush_what_the_anchor_names_as_flushed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l"
    _ledger(path)
    with Ledger.open(path) as ledger:
        ledger.transfer("t", source="bank", destination="alice", amount=5)
    flushes = _data_flushes(monkeypatch, path / "data.mdb")
    with Ledger.open(path, readonly=True) as reader:
        assert reader.balance("alice").posted == 5
    assert flushes == []


@pytest.mark.parametrize(("anchor_txnid", "seen_txnid", "flushed"), [
    (10, 10, True), (11, 10, True), (9, 10, False), (0, 10, False),
    (3, 2**32 + 2, True), (2**32 - 1, 2**32 + 1, False),  # (the anchor keeps the low 32 bits)
])
def test_what_the_anchor_says_is_flushed_is_read_within_half_the_range_of_its_32_bits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anchor_txnid: int, seen_txnid: int, flushed: bool) -> None:
    path = tmp_path / "l"
    _ledger(path)
    ledger_id = b"i" * 16
    monkeypatch.setattr(seen_module, "read_anchor",
                        lambda _directory: AnchorState(ledger_id, 1, 3, 1, b"", anchor_txnid))
    flushes = _data_flushes(monkeypatch, path / "data.mdb")
    seen = Seen(str(path), str(path / "data.mdb"), None)
    try:
        seen.durable(seen_txnid, ledger_id)
        assert flushes == ([] if flushed else [flushes and flushes[0]])
        seen.durable(seen_txnid, b"another ledger id")  # made sure of already: nothing more
        assert len(flushes) == (0 if flushed else 1)
        seen.durable(seen_txnid + 1, b"another ledger id")  # another ledger's anchor says nothing
        assert len(flushes) == (1 if flushed else 2)
    finally:
        seen.close()


def test_a_writable_open_flushes_the_last_writers_commit_before_its_own(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l"
    _ledger(path)
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        last = max(meta.txnid for meta in read_metas(fd, str(path / "data.mdb")))
    finally:
        os.close(fd)
    at: list[int] = []
    real = Store._flush_opened

    def flush(store: Store) -> None:
        at.append(store.env.info()["last_txnid"])
        real(store)

    monkeypatch.setattr(Store, "_flush_opened", flush)
    Ledger.open(path).close()
    assert at and at[0] == last


class _FailingFlush:
    """An LMDB environment whose flush fails, as a disk's I/O error would make it."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env

    def sync(self, force: bool = False) -> None:
        raise lmdb.Error("Input/output error")

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)


def _fail_next_flush(ledger: Ledger) -> None:
    store = ledger._journal._store
    store.env = _FailingFlush(store.env)


def test_a_commit_whose_flush_failed_is_taken_back_at_once_and_never_served(tmp_path: Path) -> None:
    path = tmp_path / "l"
    _ledger(path)
    ledger = Ledger.open(path)
    try:
        ledger.transfer("first", source="bank", destination="alice", amount=1)
        _fail_next_flush(ledger)
        with pytest.raises(LedgerUnavailable) as failed:
            ledger.transfer("t", source="bank", destination="alice", amount=5)
        assert "taken back" in str(failed.value) and "nothing in it was applied" in str(failed.value)
        assert ledger.get_transfer("t") is None
        assert ledger.balance("alice").posted == 1
        with pytest.raises(LedgerUnavailable):  # a retry is not answered from the commit taken back
            ledger.transfer("t", source="bank", destination="alice", amount=5)
        assert ledger.transfer("first", source="bank", destination="alice", amount=1).amount == 1  # (durable: answered)
    finally:
        ledger._journal._store.env = ledger._journal._store.env._env
        ledger.close()
    with Ledger.open(path, readonly=True) as reader:
        assert reader.get_transfer("t") is None and reader.balance("alice").posted == 1
    with Ledger.open(path) as reopened:
        assert reopened.get_transfer("t") is None
        reopened.transfer("t", source="bank", destination="alice", amount=5)
        assert reopened.balance("alice").posted == 6


def test_a_failed_flush_not_taken_back_says_the_outcome_is_unknown_and_serves_nothing_of_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l"
    _ledger(path)

    def cannot(_data_file: str, _txnid: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(unfinished_module, "take_back_unflushed", cannot)
    ledger = Ledger.open(path)
    try:
        _fail_next_flush(ledger)
        with pytest.raises(LedgerUnavailable) as failed:
            ledger.transfer("t", source="bank", destination="alice", amount=5)
        assert "outcome" in str(failed.value) and "unknown" in str(failed.value)
        assert ledger.get_transfer("t") is None
        assert ledger.balance("alice").posted == 0  # (the commit is in LMDB: not counted, not durable)
        with pytest.raises(LedgerUnavailable):  # nor answered as done
            ledger.transfer("t", source="bank", destination="alice", amount=5)
    finally:
        ledger._journal._store.env = ledger._journal._store.env._env
        ledger.close()
    with Ledger.open(path) as reopened:  # (the page cache kept it, here: a retry learns it, applied once)
        assert reopened.transfer("t", source="bank", destination="alice", amount=5).amount == 5
        assert reopened.balance("alice").posted == 5


def test_a_readers_failed_flush_fails_it_for_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l"
    _ledger(path)
    monkeypatch.setattr(seen_module, "read_anchor", lambda _directory: None)
    calls: list[int] = []

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")

    seen = Seen(str(path), str(path / "data.mdb"), None)
    try:
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        with pytest.raises(JournalError, match="failed"):
            seen.durable(7, None)
        with pytest.raises(JournalError, match="failed"):  # the kernel would not report it again: never asked
            seen.durable(8, None)
        assert len(calls) == 1
    finally:
        seen.close()


def test_a_writable_open_after_a_writer_killed_before_its_flush_anchors_that_commit(tmp_path: Path) -> None:
    path = tmp_path / "l"
    _ledger(path)
    before = read_anchor(str(path))
    _killed_after_its_commit(path)
    assert read_anchor(str(path)) == before  # (the killed writer's anchor never learnt of its commit)
    with Ledger.open(path) as ledger:
        anchor = read_anchor(str(path))
        assert anchor is not None and before is not None
        assert anchor.txnid == ledger._journal._store.env.info()["last_txnid"] & TXNID_MASK != before.txnid
        assert anchor.durable_lsn == ledger.get_transfer("late").lsn > before.durable_lsn


# A read-only process that keeps the ledger open, reading on each line it is sent.
HELD_READER = """
import sys
from engine import Ledger
with Ledger.open(sys.argv[1], readonly=True) as reader:
    print("ready", flush=True)
    for _line in sys.stdin:
        print(reader.balance("alice").posted, reader.get_transfer("t") is not None, flush=True)
"""


def test_a_commit_taken_back_beside_a_reader_in_another_process_leaves_the_ledger_open_to_all(tmp_path: Path) -> None:
    """LMDB rebuilds its reader table from the data file only when no other process has the
    ledger open: the writer sets it back itself, so the reader reads on and a new open works."""
    path = tmp_path / "l"
    _ledger(path)
    reader = subprocess.Popen([sys.executable, "-c", HELD_READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdin is not None and reader.stdout is not None

    def read() -> str:
        assert reader.stdin is not None and reader.stdout is not None
        reader.stdin.write("\n")
        reader.stdin.flush()
        return reader.stdout.readline().strip()

    try:
        assert reader.stdout.readline() == "ready\n"
        ledger = Ledger.open(path)
        try:
            ledger.transfer("first", source="bank", destination="alice", amount=1)
            assert read() == "1 False"
            _fail_next_flush(ledger)
            with pytest.raises(LedgerUnavailable, match="taken back"):
                ledger.transfer("t", source="bank", destination="alice", amount=5)
            assert read() == "1 False"
        finally:
            ledger._journal._store.env = ledger._journal._store.env._env
            ledger.close()
        with Ledger.open(path) as reopened:  # (beside the reader: LMDB's table is not rebuilt)
            assert reopened.get_transfer("t") is None
            reopened.transfer("u", source="bank", destination="alice", amount=2)
            assert read() == "3 False"
        with Ledger.open(path) as again:
            assert again.balance("alice").posted == 3
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
    assert reader.returncode == 0


def test_a_failed_flush_at_open_refuses_the_open_and_takes_nothing_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the last commit is on disk cannot be told then (a power loss may have left the
    anchor behind a commit that was flushed, acknowledged and read): nothing is taken back."""
    path = tmp_path / "l"
    _ledger(path)
    _killed_after_its_commit(path)
    data = (path / "data.mdb").read_bytes()
    real_open = store_module._lmdb_open
    monkeypatch.setattr(store_module, "_lmdb_open", lambda *args, **kwargs: _FailingFlush(real_open(*args, **kwargs)))
    with pytest.raises(LedgerUnavailable, match="restart the machine"):
        Ledger.open(path)
    assert (path / "data.mdb").read_bytes() == data
    monkeypatch.setattr(store_module, "_lmdb_open", real_open)
    with Ledger.open(path) as ledger:  # (this test's disk did not fail: the commit is on it)
        assert ledger.get_transfer("late") is not None and ledger.balance("alice").posted == 7


def _posix_locks(path: Path) -> list[str]:
    """This process's POSIX record locks on the file at `path` (`/proc/locks`), each without
    its ordinal in the machine's list (which moves as other processes take or drop locks)."""
    inode = path.stat().st_ino
    return sorted(line.split(":", 1)[1].strip() for line in Path("/proc/locks").read_text().splitlines()
                  if " POSIX " in line and f" {os.getpid()} " in line and f":{inode} " in line)


def test_a_take_back_keeps_lmdbs_locks_on_its_lock_file(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it."""
    path = tmp_path / "l"
    _ledger(path)
    ledger = Ledger.open(path)
    try:
        held = _posix_locks(path / "lock.mdb")
        assert held
        _fail_next_flush(ledger)
        with pytest.raises(LedgerUnavailable, match="taken back"):
            ledger.transfer("t", source="bank", destination="alice", amount=5)
        assert _posix_locks(path / "lock.mdb") == held
    finally:
        ledger._journal._store.env = ledger._journal._store.env._env
        ledger.close()


def test_a_reader_makes_sure_again_of_a_snapshot_whose_id_a_take_back_left_to_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l"
    _ledger(path)
    monkeypatch.setattr(seen_module, "read_anchor", lambda _directory: None)
    flushes = _data_flushes(monkeypatch, path / "data.mdb")
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        txnid = max(meta.txnid for meta in read_metas(fd, str(path / "data.mdb")))
    finally:
        os.close(fd)
    seen = Seen(str(path), str(path / "data.mdb"), None)
    try:
        seen.durable(txnid, None)
        seen.durable(txnid, None)
        assert len(flushes) == 1
        with open(path / "data.mdb", "r+b") as data:  # another commit of the same id: another meta page
            data.seek((txnid & 1) * 4096 + 100)
            data.write(b"\x01")
        seen.durable(txnid, None)
        assert len(flushes) == 2
    finally:
        seen.close()
