"""Storage faults: a damaged ledger is found and named, never served, never written over.

One test (or a few) per case of the issue "Storage faults", each of which failed before:
an emptied or missing data file, a damaged meta page, read-only commands that wrote, damaged
index pages, signals from a short file or a full disk, a meta page that rolls back the last
commit, `tally verify` on a ledger whose map grows, `close()` with calls in flight, and the
smaller ones (a fork, a full disk's message and reads after it, inspect --transfer, stress
amounts). `tests/test_storage_faults.py` runs the sweep of `bench/bench_faults.py` on a sample.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest
from coordinator import INDEX_NAMES
from engine import (
    JournalCorrupted,
    Ledger,
    LedgerClosed,
    LedgerError,
    LedgerLocked,
    LedgerUnavailable,
    TransferRequest,
)
from engine import _tools_audit
from journal import ANCHOR_FILE, FORMAT_VERSION, Journal, JournalCorruptedError, JournalNotFoundError
from coordinator import CHECK_FILE
import journal._commits as journal_commits
from journal import _errors, _store
from journal._errors import JournalLockedError
from journal._seal import SEAL_FILE
from support import LEFT_ASIDE, leave_aside, wait_until

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 60.0
WAIT_S = 30.0
PAGE_BYTES = 4096
READ_ONLY_COMMANDS = (["verify"], ["recover", "--dry-run"], ["inspect"], ["inspect", "--transfer", "t-3"],
                      ["balance", "alice"], ["history", "alice"])


def tally(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT, env=env)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(path: Path, transfers: int = 40, **options: object) -> str:
    """A small ledger with transfers and a refusal; returns its state hash."""
    with Ledger.open(path, **options) as ledger:  # type: ignore[arg-type]
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.create_account("bob", currency="USD")
        ledger.transfer_many([TransferRequest(f"t-{n}", "bank", ("alice", "bob")[n % 2], 10 + n)
                              for n in range(transfers)])
        with pytest.raises(LedgerError):
            ledger.transfer("too-much", source="alice", destination="bob", amount=10**9)
        return ledger.state_hash()


def meta_txnid(path: Path, number: int) -> int:
    with open(path / "data.mdb", "rb") as file:
        file.seek(number * PAGE_BYTES + 144)
        return int(struct.unpack("<Q", file.read(8))[0])


def newer_meta(path: Path) -> int:
    return 0 if meta_txnid(path, 0) > meta_txnid(path, 1) else 1


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path / "data.mdb", "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ mask]))


def assert_refused_unchanged(path: Path, where: str) -> JournalCorrupted:
    """Opening raises `JournalCorrupted` naming `where`; the data file is as it was; verify
    says NOT WHOLE (exit 1) and recover --dry-run too, and neither writes."""
    data = path / "data.mdb"
    before = digest(data) if data.exists() else None
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path)
    assert where in str(caught.value) and caught.value.where is not None, caught.value
    for command in (["verify"], ["recover", "--dry-run"], ["recover"]):
        done = tally(command[0], path, *command[1:], "--json")
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert json.loads(done.stdout)["verdict"] == "NOT WHOLE"
    assert (digest(data) if data.exists() else None) == before
    return caught.value


# --- 1. an emptied or missing data file is never opened as a new ledger ---------------------------


def test_an_emptied_data_file_is_reported_and_never_opened_as_a_new_empty_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    build(path)
    (path / "data.mdb").write_bytes(b"")
    error = assert_refused_unchanged(path, "data.mdb")
    assert "empty" in str(error)
    assert (path / "data.mdb").stat().st_size == 0


def test_a_missing_data_file_is_reported_while_the_anchor_says_a_ledger_was_there(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    build(path)
    (path / "data.mdb").unlink()
    (path / "lock.mdb").unlink()
    error = assert_refused_unchanged(path, "data.mdb")
    assert "missing" in str(error) and not (path / "data.mdb").exists()


def test_a_ledger_that_lost_its_anchor_is_refused_until_recover_audits_it_and_writes_a_new_one(tmp_path: Path) -> None:
    """Without its anchor, nothing tells whether `data.mdb` is the newest the ledger had (a
    backup restored alone, say): opening refuses, and `tally recover` is the decision."""
    path = tmp_path / "ledger"
    state = build(path)
    (path / ANCHOR_FILE).unlink()
    before = digest(path / "data.mdb")
    with pytest.raises(JournalCorrupted, match="recover") as caught:
        Ledger.open(path)
    assert caught.value.where is not None and caught.value.where.endswith(ANCHOR_FILE)
    verified = tally("verify", path, "--json")
    assert verified.returncode == 1 and json.loads(verified.stdout)["verdict"] == "NOT WHOLE"
    dry = tally("recover", path, "--dry-run", "--json")
    assert dry.returncode == 1 and json.loads(dry.stdout)["would_write_anchor_at"] > 0, dry.stdout
    assert not (path / ANCHOR_FILE).exists() and digest(path / "data.mdb") == before
    done = tally("recover", path, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["anchor_written_at"] > 0, (done.stdout, done.stderr)
    with Ledger.open(path) as ledger:
        assert ledger.state_hash() == state
        ledger.transfer("after", source="bank", destination="alice", amount=1)
    assert tally("verify", path).returncode == 0


def test_recover_writing_an_anchor_on_a_full_disk_says_no_space_left_at_the_ledger_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger"
    build(path)
    (path / ANCHOR_FILE).unlink()
    before = sorted(os.listdir(path))
    real = os.fsync

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(ANCHOR_FILE + ".new"):
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LedgerUnavailable, match=f"no space left.*{path}|{path}.*no space left"):
        _tools_audit.recover(str(path), dry_run=False)
    assert sorted(os.listdir(path)) == before


@pytest.mark.parametrize("what", LEFT_ASIDE)
def test_recover_that_finds_no_file_of_its_own_where_it_writes_the_anchor_aside_names_it_and_writes_nothing(
        tmp_path: Path, what: str) -> None:
    """The anchor is written aside (`tally.anchor.new`) and renamed: a FIFO left there made
    `tally recover` wait for a reader that never comes, a link had it write through it, over a
    file elsewhere, and a hard link had it truncate that file. Each is now refused, named, and
    left as it is."""
    path = tmp_path / "ledger"
    build(path)
    (path / ANCHOR_FILE).unlink()
    aside, elsewhere = path / (ANCHOR_FILE + ".new"), tmp_path / "elsewhere"
    left_as_it_was = leave_aside(aside, elsewhere, what)
    before = _contents(path)
    with pytest.raises(LedgerUnavailable, match=str(aside)):
        _tools_audit.recover(str(path), dry_run=False)
    assert _contents(path) == before and not (path / ANCHOR_FILE).exists()
    assert left_as_it_was()


def test_an_emptied_data_file_without_an_anchor_is_still_never_created_over(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    build(path)
    (path / ANCHOR_FILE).unlink()
    (path / "data.mdb").write_bytes(b"")
    assert_refused_unchanged(path, "data.mdb")


def test_a_ledger_whose_creation_died_before_its_anchor_is_whole_and_gets_one_with_its_first_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger"
    Ledger.open(path).close()  # a data file with no record yet
    (path / ANCHOR_FILE).unlink()
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
    assert (path / ANCHOR_FILE).exists()
    assert tally("verify", path).returncode == 0


def test_a_lock_file_without_a_data_file_is_a_ledger_that_lost_its_data_not_a_new_directory(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    build(path)
    (path / ANCHOR_FILE).unlink()
    (path / "data.mdb").unlink()
    with pytest.raises(JournalCorrupted, match="lock.mdb"):
        Ledger.open(path)
    assert not (path / "data.mdb").exists()


def test_a_seal_without_a_data_file_or_an_anchor_is_a_ledger_that_lost_them_not_a_new_directory(tmp_path: Path) -> None:
    """A seal is left only by the close of a ledger: with the data file, its anchor and LMDB's
    lock file all gone, it is still the sign that a ledger was there, and nothing is made."""
    path = tmp_path / "ledger"
    build(path)
    seal = (path / SEAL_FILE).read_bytes()
    for name in (ANCHOR_FILE, "data.mdb", "lock.mdb"):
        (path / name).unlink()
    for readonly in (False, True):
        with pytest.raises(JournalCorrupted, match="tally.seal") as caught:
            Ledger.open(path, readonly=readonly)
        assert caught.value.where == str(path / "data.mdb")
    assert sorted(os.listdir(path)) == ["tally.lock", SEAL_FILE] and (path / SEAL_FILE).read_bytes() == seal


def test_a_creation_that_died_before_its_data_file_was_whole_leaves_nothing_in_the_way(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    (path / ".tally-new").mkdir(parents=True)
    (path / ".tally-new" / "data.mdb").write_bytes(b"half made")
    build(path)
    assert not (path / ".tally-new").exists()


# --- 2. a damaged meta page is damage, never "not a ledger", and nothing is written ----------------


@pytest.mark.parametrize("field", ["main root", "magic", "transaction id", "last page"])
def test_a_flipped_byte_in_the_newer_meta_page_is_reported_and_nothing_is_written(tmp_path: Path, field: str) -> None:
    path = tmp_path / "ledger"
    build(path)
    offset = {"main root": 128, "magic": 16, "transaction id": 151, "last page": 137}[field]
    flip_byte(path, newer_meta(path) * PAGE_BYTES + offset, 0x40)
    assert_refused_unchanged(path, "data.mdb")
    done = tally("verify", path)
    assert "not a Tally ledger" not in done.stdout + done.stderr


# --- 3. read-only commands never write -------------------------------------------------------------


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("damage", ["none", "emptied", "a meta page", "a record"])
def test_read_only_commands_leave_the_data_file_as_it_was(
    tmp_path: Path, command: list[str], damage: str, flip_record_byte: Callable[[Path, int], None]
) -> None:
    path = tmp_path / "ledger"
    build(path)
    if damage == "emptied":
        (path / "data.mdb").write_bytes(b"")
    elif damage == "a meta page":
        flip_byte(path, newer_meta(path) * PAGE_BYTES + 128, 0x40)
    elif damage == "a record":
        journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
        last = journal.last_lsn
        journal.close()
        flip_record_byte(path, last)
    before = {name: digest(path / name) for name in ("data.mdb", ANCHOR_FILE)}

    done = tally(command[0], path, *command[1:])

    assert "Traceback" not in done.stderr, done.stderr
    # (the damaged record is the last: every open reads it, the one the anchor names, to check its digest)
    assert done.returncode == (0 if damage == "none" else 1), (done.stdout, done.stderr)
    assert {name: digest(path / name) for name in before} == before


# --- 4. damaged index pages are found as the ledger opens, and no retry commits twice --------------


def _index_leaf(path: Path, name: bytes) -> int:
    """The page number of a leaf of index `name` (walking the file as LMDB laid it out)."""
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        layout = journal._store.layout  # the journal's own check found the trees
        assert layout.trees[name].leaf_pages >= 1
    finally:
        journal.close()
    data = (path / "data.mdb").read_bytes()
    for pgno in range(2, len(data) // PAGE_BYTES):
        _, _, flags, lower, _ = struct.unpack_from("<QHHHH", data, pgno * PAGE_BYTES)
        if flags == 0x02 and lower > 16:
            first = struct.unpack_from("<H", data, pgno * PAGE_BYTES + 16)[0]
            ksize = struct.unpack_from("<H", data, pgno * PAGE_BYTES + first + 6)[0]
            key = data[pgno * PAGE_BYTES + first + 8 : pgno * PAGE_BYTES + first + 8 + ksize]
            if name == b"transfers" and key.startswith(b"t-"):
                return pgno
    raise AssertionError(f"no leaf of {name!r}")


@pytest.mark.parametrize("where", ["the leaf header", "a key"])
def test_a_damaged_transfers_index_leaf_is_refused_at_open_so_a_retry_never_commits_twice(
    tmp_path: Path, where: str
) -> None:
    path = tmp_path / "ledger"
    build(path, transfers=300)
    pgno = _index_leaf(path, b"transfers")
    if where == "the leaf header":
        flip_byte(path, pgno * PAGE_BYTES + 12, 0x08)  # mp_lower: the page seems to hold fewer keys
    else:
        first = struct.unpack_from("<H", (path / "data.mdb").read_bytes(), pgno * PAGE_BYTES + 16)[0]
        flip_byte(path, pgno * PAGE_BYTES + first + 8 + 2, 0x01)  # "t-12" becomes "t-02"-like: still in order
    error = assert_refused_unchanged(path, "transfers")
    assert error.where is not None


# --- 5. no signal, ever ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["8 KiB", "half", "one page short"])
def test_a_truncated_data_file_is_reported_not_a_sigbus(tmp_path: Path, size: str) -> None:
    path = tmp_path / "ledger"
    build(path, transfers=300)
    full = (path / "data.mdb").stat().st_size
    os.truncate(path / "data.mdb", {"8 KiB": 2 * PAGE_BYTES, "half": full // 2 // PAGE_BYTES * PAGE_BYTES,
                                    "one page short": full - PAGE_BYTES}[size])
    script = ("import sys\nfrom engine import Ledger, JournalCorrupted\ntry:\n    Ledger.open(sys.argv[1])\n"
              "except JournalCorrupted as error:\n    print(error)\n    sys.exit(7)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 7, (done.returncode, done.stderr)  # not -7 (SIGBUS)
    assert "truncated" in done.stdout
    assert_refused_unchanged(path, "truncated")


def test_a_flipped_node_pointer_in_the_last_page_is_reported_not_a_sigbus(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    build(path, transfers=300)
    data = (path / "data.mdb").read_bytes()
    for pgno in reversed(range(2, len(data) // PAGE_BYTES)):  # the leaf nearest the end of the file
        flags = struct.unpack_from("<H", data, pgno * PAGE_BYTES + 10)[0]
        if flags == 0x02:
            break
    flip_byte(path, pgno * PAGE_BYTES + 17, 0x80)  # the first node pointer, past the page's end
    done = tally("verify", path)
    assert done.returncode == 1 and "NOT WHOLE" in done.stdout, (done.returncode, done.stderr)
    assert_refused_unchanged(path, f"page {pgno}")


FULL_DISK = """
import os, sys
from engine import Ledger, LedgerUnavailable
try:
    Ledger.open(sys.argv[1])
except LedgerUnavailable as error:
    print(error)
    sys.exit(7)
"""


def test_creating_a_ledger_on_a_full_disk_is_ledger_unavailable_saying_so_not_a_sigbus(tmp_path: Path) -> None:
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs to mount a small tmpfs (root with CAP_SYS_ADMIN): the unit test below covers the rest")
    try:
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, bytes(512)):  # to the last block
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
        done = subprocess.run([sys.executable, "-c", FULL_DISK, str(mount / "ledger")], capture_output=True,
                              text=True, timeout=CLI_TIMEOUT_S, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert done.returncode == 7, (done.returncode, done.stderr)  # not -7 (SIGBUS)
        assert "no space left" in done.stdout
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_lock_file_that_cannot_be_allocated_is_no_space_left_before_lmdb_maps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(LedgerUnavailable, match="no space left"):
        Ledger.open(tmp_path / "ledger")


def test_a_copy_without_its_lock_file_on_a_full_disk_is_no_space_left_and_is_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup restored as `data.mdb` and its anchor, read on a full disk: LMDB's reader table
    cannot be made (read without it, a writer that starts meanwhile could reuse the pages of
    the reader's snapshot), and the empty `lock.mdb` made on the way is taken away again."""
    path = tmp_path / "ledger"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
    (path / "lock.mdb").unlink()
    before = sorted(os.listdir(path))

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(LedgerUnavailable, match="no space left"):
        Ledger.open(path, readonly=True)
    assert sorted(os.listdir(path)) == before
    monkeypatch.undo()
    with Ledger.open(path, readonly=True) as reading:
        assert [account.id for account in reading.accounts()] == ["bank"]


MAP_CANNOT_GROW = """
import resource, sys, logging
logging.disable(logging.CRITICAL)
from engine import Account, Ledger, LedgerUnavailable
ledger = Ledger.open(sys.argv[1], map_size_bytes=1 << 16, timeout_s=10)
ledger.create_account("bank", currency="USD", overdraft_limit=None)
ledger.create_account("a", currency="USD")
ledger.transfer("first", source="bank", destination="a", amount=1)
ledger.create_accounts([Account(f"pre{i}", "USD", 0, 0, {"k": "v" * 200}) for i in range(12000)])  # grown
size = ledger._journal._store.env.info()["map_size"]
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + size - (1 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))  # no room
try:
    for i in range(100000):
        ledger.transfer(f"t{i}", source="bank", destination="a", amount=1, metadata={"k": "x" * 250})
except LedgerUnavailable as error:
    print("refused:", "cannot grow" in str(error))
print("first:", ledger.get_transfer("first").amount)
print("entries:", [entry.transfer_id for entry in ledger.entries("a", limit=2)])
"""


FILE_SIZE_LIMIT = """
import os, resource, sys, logging
logging.disable(logging.CRITICAL)
from engine import Ledger, LedgerUnavailable
ledger = Ledger.open(sys.argv[1], timeout_s=10)
ledger.create_account("bank", currency="USD", overdraft_limit=None)
ledger.create_account("a", currency="USD")
size = os.path.getsize(os.path.join(sys.argv[1], "data.mdb"))
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
acknowledged = 0
try:
    for i in range(100000):
        ledger.transfer(f"t{i}", source="bank", destination="a", amount=1, metadata={"k": "x" * 250})
        acknowledged += 1
except LedgerUnavailable as error:
    print("refused:", error)
print("acknowledged:", acknowledged)
ledger.close()
"""


def test_a_write_past_the_file_size_limit_is_unavailable_saying_so_and_loses_nothing_acknowledged(
    tmp_path: Path
) -> None:
    """LMDB reports the short write at the limit (`ulimit -f`) as an I/O error, which read as a
    failing disk: it says which limit, and every transfer acknowledged before it is there."""
    path = tmp_path / "ledger"
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(path)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and "file size limit" in lines[0] and "ulimit -f" in lines[0], (done.stdout, done.stderr)
    acknowledged = int(lines[1].split()[-1])
    assert acknowledged > 0
    with Ledger.open(path) as ledger:
        assert ledger.balance("a").posted == acknowledged
        assert ledger.get_transfer(f"t{acknowledged - 1}") is not None and ledger.get_transfer(f"t{acknowledged}") is None


def test_only_an_io_error_near_the_file_size_limit_is_called_the_limit(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (ENOSPC) or a bug met while the data file is near a file size limit is what
    it is; only LMDB's short write (EIO) or EFBIG there is the limit."""
    path = tmp_path / "ledger"
    build(path)
    size = (path / "data.mdb").stat().st_size
    monkeypatch.setattr(_errors.resource, "getrlimit", lambda which: (size + 1000, _errors.resource.RLIM_INFINITY))
    directory = str(path)
    assert "file size limit" in str(_errors.space_error(directory, lmdb.Error("mdb_txn_commit: Input/output error")))
    assert "file size limit" in str(_errors.space_error(directory, OSError(errno.EFBIG, "File too large")))
    assert "no space left" in str(_errors.space_error(directory, OSError(errno.ENOSPC, "No space left on device")))
    assert "file size limit" not in str(_errors.space_error(directory, AssertionError("a bug")))


def test_a_map_that_cannot_grow_fails_the_writes_and_the_reads_go_on(tmp_path: Path) -> None:
    """LMDB unmaps the data file before mapping it larger: a map that then fails (an
    address-space limit) left the environment unusable, reads too, until the ledger was
    reopened. The grow is tried on address space alone first."""
    done = subprocess.run([sys.executable, "-c", MAP_CANNOT_GROW, str(tmp_path / "ledger")], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["refused: True", "first: 1", "entries: ['first', 't0']"], done.stdout
    assert tally("verify", tmp_path / "ledger").returncode == 0


def test_a_ledger_whose_directory_is_removed_while_open_acknowledges_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its commits would land in files no path reaches, gone when the process ends. (A commit
    looks every `DATA_FILE_LOOK_S`; here every commit does.)"""
    monkeypatch.setattr(journal_commits, "DATA_FILE_LOOK_S", 0.0)
    path = tmp_path / "ledger"
    ledger = Ledger.open(path)
    try:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        shutil.rmtree(path)
        with pytest.raises(LedgerUnavailable, match="removed or moved away"):
            ledger.transfer("t", source="bank", destination="alice", amount=5)
        with pytest.raises(LedgerUnavailable):  # nothing of it was written anywhere: a retry is not answered
            ledger.transfer("t", source="bank", destination="alice", amount=5)
        with pytest.raises(LedgerUnavailable):
            ledger.create_account("bob", currency="USD")
        assert ledger.balance("alice").posted == 0 and ledger.outcome("t") is None
    finally:
        ledger.close()


@pytest.mark.parametrize("copied", ["an older copy of it", "another ledger's"])
def test_a_data_file_copied_over_in_place_while_open_is_neither_written_to_nor_read(tmp_path: Path,
                                                                                      copied: str) -> None:
    """`cp backup/data.mdb ledger/` under a live ledger keeps the file (its inode), so the look
    for a file moved away cannot see it: the writer finds its records no longer end where it
    left them, and acknowledges nothing into that file; the reads, which would serve it, are
    refused too, and reopening reports it."""
    path, source = tmp_path / "ledger", tmp_path / "source"
    build(path)
    if copied == "another ledger's":
        build(source)
    else:
        shutil.copytree(path, source)
    with Ledger.open(path) as ledger:
        ledger.transfer_many([TransferRequest(f"more-{n}", "bank", "alice", 1) for n in range(30)])
        assert ledger.balance("alice").posted > 0
        with open(path / "data.mdb", "r+b") as data:  # written over in place, its size kept (no SIGBUS)
            data.write((source / "data.mdb").read_bytes())
        with pytest.raises(LedgerUnavailable, match="no longer ends with LSN"):
            ledger.transfer("after", source="bank", destination="alice", amount=5)
        with pytest.raises(JournalCorrupted, match="overwritten while the ledger was open"):
            ledger.balance("alice")
        with pytest.raises(JournalCorrupted):
            ledger.get_transfer("more-0")
    with pytest.raises(JournalCorrupted):
        Ledger.open(path)


def test_a_map_grow_reserves_the_address_space_it_adds_and_a_refusal_leaves_the_reads_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LMDB unmaps the old map before it maps the larger one: the grow asks for the difference.
    Refused, it fails the writes only (LMDB never got to unmap anything)."""
    asked: list[int] = []

    def no_room(fileno: int, length: int, **kwargs: object) -> None:
        asked.append(length)
        raise OSError(12, "Cannot allocate memory")

    with Ledger.open(tmp_path / "ledger", map_size_bytes=1 << 16) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer("first", source="bank", destination="alice", amount=1)
        size = ledger._journal._store.env.info()["map_size"]
        monkeypatch.setattr(_store.mmap, "mmap", no_room)
        with pytest.raises(LedgerUnavailable, match="cannot grow"):
            for n in range(10_000):
                ledger.create_account(f"filler-{n}", currency="USD", metadata={"k": "v" * 200})
        monkeypatch.undo()
        assert asked == [size]  # doubling `size` needs `size` more
        assert ledger.get_transfer("first").amount == 1
        assert [entry.transfer_id for entry in ledger.entries("alice")] == ["first"]


def test_a_ledger_opened_by_a_relative_path_keeps_working_after_the_host_changes_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ledger = Ledger.open("books")
    try:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        assert ledger.transfer("t", source="bank", destination="alice", amount=5).status == "posted"
    finally:
        ledger.close()
    assert sorted(os.listdir(tmp_path / "elsewhere")) == []
    assert (tmp_path / "books" / SEAL_FILE).exists()
    with Ledger.open(tmp_path / "books") as reopened:
        assert reopened.balance("alice").posted == 5


def test_a_second_open_of_a_ledger_opened_by_a_relative_path_is_refused_before_lmdb_after_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before LMDB opens it again (which would drop this process's locks on its reader
    table), however the two paths are written."""
    monkeypatch.chdir(tmp_path)
    with Ledger.open("books") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        monkeypatch.chdir("/")
        with pytest.raises(LedgerLocked, match="open in this process already"):
            Ledger.open(tmp_path / "books", readonly=True)


@pytest.mark.parametrize("writes_after", [True, False])
def test_a_ledger_moved_away_while_open_leaves_the_one_now_at_its_path_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, writes_after: bool
) -> None:
    """Closing it sealed by path: the seal of another ledger made at the old path was removed
    and rewritten (and a clean ledger was logged as damaged). A write after the move fails
    the journal, so its close seals nothing anyway; without one, the close itself must look."""
    monkeypatch.setattr(journal_commits, "DATA_FILE_LOOK_S", 0.0)
    path, moved = tmp_path / "ledger", tmp_path / "moved"
    first = Ledger.open(path)
    try:
        first.create_account("bank", currency="USD", overdraft_limit=None)
        os.rename(path, moved)
        with Ledger.open(path) as other:
            other.create_account("other", currency="USD")
        sealed = (path / SEAL_FILE).read_bytes()
        if writes_after:
            with pytest.raises(LedgerUnavailable, match="removed or moved away"):
                first.create_account("alice", currency="USD")
    finally:
        with caplog.at_level(logging.WARNING, logger="tally.journal"):
            first.close()
    assert (path / SEAL_FILE).read_bytes() == sealed
    assert "damage" not in caplog.text
    if not writes_after:
        assert "no longer the data file this ledger opened" in caplog.text
    with Ledger.open(path) as other:
        assert [account.id for account in other.accounts()] == ["other"]
    assert tally("verify", moved).returncode == 0 and tally("verify", path).returncode == 0


# --- 6. a meta page that rolls back the last commit ------------------------------------------------


def test_a_newer_meta_page_whose_transaction_id_fell_behind_is_a_missing_commit_not_a_whole_ledger(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger"
    build(path)
    with Ledger.open(path) as ledger:
        acknowledged = ledger.transfer("acknowledged", source="bank", destination="alice", amount=5)
    newer = newer_meta(path)
    with open(path / "data.mdb", "r+b") as file:  # LMDB now prefers the older meta: the commit before
        file.seek(newer * PAGE_BYTES + 144)
        file.write(struct.pack("<Q", meta_txnid(path, newer) - 2))
    error = assert_refused_unchanged(path, "data.mdb")
    assert error.lsn == acknowledged.lsn and "missing" in str(error)
    for view in (["balance", "alice"], ["history", "alice"], ["inspect", "--transfer", "acknowledged"]):
        done = tally(view[0], path, *view[1:])  # never the snapshot before it, as if it were whole
        assert done.returncode == 1 and "missing" in done.stdout + done.stderr, (view, done.stdout, done.stderr)


# --- 7. verify while another process grows the map ---------------------------------------------------


GROWER = """
import sys
from engine import Ledger, TransferRequest
with Ledger.open(sys.argv[1], map_size_bytes=1 << 20) as ledger:
    for n in range(30):
        ledger.transfer_many([TransferRequest(f"g{n}-{k}", "bank", "alice", 1) for k in range(400)])
"""


def test_a_reader_opened_before_another_process_grew_the_map_takes_the_new_size(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    build(path, map_size_bytes=1 << 20)
    reader = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        done = subprocess.run([sys.executable, "-c", GROWER, str(path)], capture_output=True, text=True,
                              timeout=CLI_TIMEOUT_S, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert done.returncode == 0, done.stderr
        with reader.snapshot() as txn:  # LMDB: MDB_MAP_RESIZED, until the reader adopts the size
            assert reader.records_count(txn) > 12_000
    finally:
        reader.close()
    verified = tally("verify", path, "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["verdict"] == "whole", verified.stderr


# --- 8. close() while calls are in flight ------------------------------------------------------------


def test_close_while_calls_are_in_flight_ends_each_with_a_ledger_error_and_logs_no_actor_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Closed under load, again and again, with a timeout far shorter than the calls under way
    take: each call ends with its outcome or a `LedgerError`, no actor logs an error, and the
    books reopen whole."""
    caplog.set_level(logging.ERROR)
    names = [f"a{n}" for n in range(20)]
    for cycle in range(8):
        path = tmp_path / f"ledger-{cycle}"
        with Ledger.open(path) as made:  # (its accounts with the usual timeout: the short one is for the load)
            made.create_account("bank", currency="USD", overdraft_limit=None)
            for name in names:
                made.create_account(name, currency="USD")
        ledger = Ledger.open(path, timeout_s=0.05)
        raised: list[BaseException] = []
        calls = threading.Semaphore(0)

        def work(thread: int, ledger: Ledger = ledger, raised: list[BaseException] = raised,
                 calls: threading.Semaphore = calls) -> None:
            for k in range(100_000):
                try:
                    if thread % 3 == 0:
                        ledger.transfer_many([TransferRequest(f"m{thread}-{k}-{j}", "bank", names[j % 20], 1)
                                              for j in range(200)])
                    elif thread % 3 == 1:
                        ledger.transfer(f"t{thread}-{k}", source="bank", destination=names[k % 20], amount=1)
                    else:
                        ledger.balance(names[k % 20])
                except LedgerClosed:
                    return
                except LedgerError:
                    pass
                except BaseException as error:  # what the test is for: anything else escaping a call
                    raised.append(error)
                    return
                calls.release()

        threads = [threading.Thread(target=work, args=(n,)) for n in range(24)]
        for thread in threads:
            thread.start()
        for _ in range(40 + 60 * cycle):  # close once the clients are this far in
            assert calls.acquire(timeout=WAIT_S)
        ledger.close()
        for thread in threads:
            thread.join(WAIT_S)
        assert not any(thread.is_alive() for thread in threads)
        assert raised == [], cycle
        assert [record.getMessage() for record in caplog.records] == [], cycle
        with Ledger.open(path) as reopened:
            balances = {account.id: reopened.balance(account.id) for account in reopened.accounts()}
            assert sum(balance.posted for balance in balances.values()) == 0
            assert all(balance.pending == 0 for balance in balances.values())


# --- 9. the smaller ones -------------------------------------------------------------------------------


SECOND_WRITER = """
import sys
from engine import Ledger, LedgerLocked
try:
    with Ledger.open(sys.argv[1]) as ledger:
        ledger.transfer("second", source="bank", destination="alice", amount=1)
except LedgerLocked as refused:
    print("locked:", refused)
else:
    print("written")
"""


def test_a_ledger_whose_lock_file_is_removed_while_open_is_still_refused_to_a_second_writer(tmp_path: Path) -> None:
    """A clean-up of stale lock files removes `tally.lock` under a live holder, whose flock then
    holds a file no path reaches: the next opener must still find the ledger held (the
    directory's own flock), not make a new lock file and write beside the live one."""
    path = tmp_path / "ledger"
    build(path)
    with Ledger.open(path) as ledger:
        (path / "tally.lock").unlink()
        done = subprocess.run([sys.executable, "-c", SECOND_WRITER, str(path)], capture_output=True, text=True,
                              timeout=CLI_TIMEOUT_S, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert done.stdout.startswith("locked:") and "lock file was removed" in done.stdout, (done.stdout, done.stderr)
        refused = tally("recover", path)
        assert refused.returncode == 2 and "live process" in refused.stderr, refused
        ledger.transfer("first", source="bank", destination="alice", amount=1)
    with Ledger.open(path) as again:
        assert again.get_transfer("first") is not None and again.get_transfer("second") is None


def test_an_opener_racing_a_close_is_not_told_the_lock_file_was_removed(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A close lets go of the directory's flock before the lock file's: an open between the two
    is refused at the lock file, as while the ledger was open, not told its lock file was gone."""
    from journal import _directory
    path = tmp_path / "ledger"
    build(path)
    held = _directory.lock_directory(str(path))
    assert held is not None
    refusals: list[str] = []
    close = os.close

    armed = [True]

    def close_then_open(fd: int) -> None:
        close(fd)
        if armed.pop() if armed else False:  # after the first close only
            try:
                _directory.lock_directory(str(path)).release()  # type: ignore[union-attr]
                refusals.append("opened")
            except JournalLockedError as refused:
                refusals.append(str(refused))

    monkeypatch.setattr(_directory.os, "close", close_then_open)
    held.release()
    monkeypatch.undo()
    assert len(refusals) == 1 and "live process" in refusals[0] and "removed" not in refusals[0], refusals
    _directory.lock_directory(str(path)).release()  # type: ignore[union-attr]


def test_a_forked_child_is_refused_at_once_and_does_not_keep_the_lock(tmp_path: Path) -> None:
    """The child's calls on its parent's ledger are `LedgerClosed` at once; it opens another
    ledger, but not that one, even once its parent closed it (LMDB's files stay held by the
    environment it inherited): `LedgerLocked` says so, naming spawn."""
    path = tmp_path / "ledger"
    script = """
import os, sys
from engine import Ledger, LedgerClosed, LedgerLocked
ledger = Ledger.open(sys.argv[1], timeout_s=3600)  # a child that waited instead of refusing: the run's own bound ends it
ledger.create_account("a", currency="USD")
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        ledger.balance("a")
        os._exit(1)
    except LedgerClosed as error:
        if "fork" not in str(error):
            os._exit(2)
    os.write(ready_w, b"x")
    os.read(go_r, 1)  # the parent closed its ledger
    try:
        Ledger.open(sys.argv[1]).close()
        os._exit(3)
    except LedgerLocked as error:
        if "spawn" not in str(error):
            os._exit(4)
    with Ledger.open(sys.argv[2]) as other:
        other.create_account("b", currency="USD")
    os._exit(0)
os.read(ready_r, 1)
ledger.close()
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
with Ledger.open(sys.argv[1]) as again:
    print(len(again.accounts()))
"""
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "other")], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.stdout.split() == ["0", "1"], (done.stdout, done.stderr)


def test_inspect_of_a_transfer_reads_its_record_through_the_index_not_a_scan(
    tmp_path: Path, flip_record_byte: Callable[[Path, int], None]
) -> None:
    path = tmp_path / "ledger"
    build(path)
    with Ledger.open(path) as ledger:
        early = ledger.get_transfer("t-2")
        late = ledger.get_transfer("t-30")
    assert early is not None and late is not None
    flip_record_byte(path, early.lsn)  # a scan from LSN 1 would stop here, before t-30's record

    done = tally("inspect", path, "--transfer", "t-30", "--json")

    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["records"]
    assert [(row["lsn"], row["transfer"], row["amount"]) for row in rows] == [(late.lsn, "t-30", late.amount)]


def test_stress_with_the_largest_amounts_funds_what_a_balance_can_hold_and_ends_ok(tmp_path: Path) -> None:
    done = tally("stress", "--path", tmp_path / "ledger", "--accounts", "8", "--clients", "2", "--transfers", "200",
                 "--amount-max", "2000000000000000000", "--json")
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr)
    assert json.loads(done.stdout)["verdict"] == "ok"


def test_a_copy_of_a_ledger_is_refused_with_another_ledgers_data_file(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    build(first)
    build(second)
    shutil.copy(second / "data.mdb", first / "data.mdb")
    error = assert_refused_unchanged(first, "belongs to ledger")
    assert isinstance(error.__cause__, JournalCorruptedError)


# --- what the review of the first version found ------------------------------------------------------


def test_a_damaged_format_version_is_damage_when_the_anchor_says_otherwise_not_a_newer_format(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    build(path)
    data = bytearray((path / "data.mdb").read_bytes())
    key = b"format_version"
    at = data.find(key)
    while at != -1:  # every copy of the meta database's entry, live and stale: the version -> "6"
        value_at = at + len(key)
        if data[value_at : value_at + 1] == str(FORMAT_VERSION).encode():
            data[value_at] = ord("6")
        at = data.find(key, at + 1)
    (path / "data.mdb").write_bytes(bytes(data))
    error = assert_refused_unchanged(path, "data.mdb")
    assert "anchor" in str(error)
    for view in (["balance", "alice"], ["history", "alice"]):
        done = tally(view[0], path, *view[1:])
        assert done.returncode == 1 and "Traceback" not in done.stderr, (view, done.stderr)


def test_an_anchor_that_is_a_directory_is_damage_not_an_os_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    build(path)
    (path / ANCHOR_FILE).unlink()
    (path / ANCHOR_FILE).mkdir()
    with pytest.raises(JournalCorrupted, match="anchor"):
        Ledger.open(path)


def test_the_data_file_of_a_copy_that_went_on_elsewhere_is_refused_where_the_histories_part(tmp_path: Path) -> None:
    """A backup restored elsewhere and written to, its `data.mdb` copied back: same ledger id,
    at least as many records, all well formed, but another history. The anchor kept the
    start of the chain's digest at its LSN: the record there is not that one. Nothing is
    written; the operator who means to keep that history removes the anchor and recovers."""
    path, elsewhere = tmp_path / "ledger", tmp_path / "elsewhere"
    build(path)
    shutil.copytree(path, elsewhere)
    with Ledger.open(path) as ledger:
        ledger.transfer("here", source="bank", destination="alice", amount=5)
        noted = ledger.head()
    with Ledger.open(elsewhere) as ledger:
        for k in range(3):
            ledger.transfer(f"there-{k}", source="bank", destination="alice", amount=7)
    shutil.copyfile(elsewhere / "data.mdb", path / "data.mdb")
    (path / SEAL_FILE).unlink(missing_ok=True)
    before = {name: digest(path / name) for name in ("data.mdb", ANCHOR_FILE)}
    for readonly in (False, True):
        with pytest.raises(JournalCorrupted, match=f"the record at LSN {noted.lsn} is not the one this directory's "
                                                   "anchor saw") as caught:
            Ledger.open(path, readonly=readonly)
        assert caught.value.where == str(path / "data.mdb")
    verified = tally("verify", path, "--json")
    assert verified.returncode == 1 and json.loads(verified.stdout)["checks"][CHECK_FILE] is False
    recovered = tally("recover", path)  # nothing in place mends it, and a salvage would mix two histories
    assert recovered.returncode == 1 and "--salvage" not in recovered.stdout and "backup" in recovered.stdout
    salvaged = tally("recover", path, "--salvage", "--into", tmp_path / "mixed")
    assert salvaged.returncode == 1 and "nothing to salvage" in salvaged.stderr, salvaged.stderr
    assert {name: digest(path / name) for name in before} == before
    (path / ANCHOR_FILE).unlink()
    assert tally("recover", path).returncode == 0
    with Ledger.open(path) as kept:
        assert kept.get_transfer("there-2") is not None and kept.get_transfer("here") is None


def test_an_anchor_written_before_it_kept_a_digest_checks_its_lsn_alone_until_the_next_commit(tmp_path: Path) -> None:
    """Anchors of earlier releases hold zeros where the digest now is: they open as before,
    and the next commit writes the digest in."""
    from journal._anchor import AnchorState, create_anchor, read_anchor

    path = tmp_path / "ledger"
    build(path)
    kept = read_anchor(str(path))
    assert kept is not None and len(kept.digest) == 12
    old = create_anchor(str(path), kept.ledger_id, kept.format_version, kept.durable_lsn)
    assert read_anchor(str(path)) == AnchorState(kept.ledger_id, kept.format_version, kept.durable_lsn, 1, b"")
    assert old.digest == b""
    with Ledger.open(path) as ledger:
        ledger.transfer("after", source="bank", destination="alice", amount=1)
        head = ledger.head()
    again = read_anchor(str(path))
    assert again is not None and again.durable_lsn == head.lsn and again.digest.hex() == head.digest[:24]


@pytest.mark.parametrize("readonly", [False, True])
def test_an_anchor_that_is_a_fifo_is_damage_not_a_hang(tmp_path: Path, readonly: bool) -> None:
    """Opening a FIFO waits for a writer that never comes: the anchor is opened without
    waiting, and anything but a regular file there is damage, named."""
    path = tmp_path / "ledger"
    build(path)
    (path / ANCHOR_FILE).unlink()
    os.mkfifo(path / ANCHOR_FILE)
    with pytest.raises(JournalCorrupted, match="the anchor is not a regular file") as caught:
        Ledger.open(path, readonly=readonly)
    assert caught.value.where == str(path / ANCHOR_FILE)


def _contents(path: Path) -> dict[str, bytes]:
    """The bytes of each regular file of a ledger directory but LMDB's lock file (its table of
    readers, which every opener writes)."""
    return {item.name: item.read_bytes() for item in path.iterdir() if item.is_file() and item.name != "lock.mdb"}


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("kind", ["fifo", "directory", "a link to a FIFO"])
def test_an_lmdb_lock_file_that_is_no_regular_file_is_damage_named_and_the_ledger_untouched(
        tmp_path: Path, kind: str, readonly: bool) -> None:
    """LMDB would answer "Illegal seek" or "Is a directory", naming no file: it is looked at
    before it is opened, as the data file is, and named; nothing of the ledger is written."""
    path = tmp_path / "ledger"
    state_hash = build(path)
    lock_file = path / "lock.mdb"
    lock_file.unlink()
    if kind == "fifo":
        os.mkfifo(lock_file)
    elif kind == "directory":
        lock_file.mkdir()
    else:
        os.mkfifo(tmp_path / "elsewhere")
        lock_file.symlink_to(tmp_path / "elsewhere")
    before = _contents(path)
    with pytest.raises(JournalCorrupted, match="LMDB's lock file is not a regular file") as caught:
        Ledger.open(path, readonly=readonly)
    assert caught.value.where == str(lock_file)
    assert _contents(path) == before
    assert lock_file.is_symlink() if kind == "a link to a FIFO" else lock_file.is_dir() if kind == "directory" \
        else lock_file.is_fifo()
    shutil.rmtree(lock_file) if kind == "directory" else lock_file.unlink()  # as the error says to
    with Ledger.open(path) as ledger:
        assert ledger.state_hash() == state_hash


def test_opening_a_ledger_looks_at_its_lmdb_lock_file_once_by_path_and_once_by_descriptor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock file is looked at by its path before it is opened (a device there is never
    opened) and by the descriptor once open (it may have been replaced meanwhile); its size and
    its identity (`Journal.files`) come from that look. It was looked at four times."""
    path = tmp_path / "ledger"
    build(path)
    lock_file = str(path / "lock.mdb")
    ours = tuple(str(ROOT / package) for package in ("journal", "engine", "coordinator"))
    looks: list[str] = []
    real_stat, real_fstat = os.stat, os.fstat

    def by_us() -> bool:  # (py-lmdb looks at the files itself too: not ours to count)
        return sys._getframe(2).f_code.co_filename.startswith(ours)

    def stat(file: object, *args: object, **kwargs: object) -> os.stat_result:
        if by_us() and os.fspath(file) == lock_file:  # type: ignore[call-overload]
            looks.append("stat")
        return real_stat(file, *args, **kwargs)  # type: ignore[arg-type]

    def fstat(fd: int) -> os.stat_result:
        if by_us() and os.readlink(f"/proc/self/fd/{fd}") == lock_file:
            looks.append("fstat")
        return real_fstat(fd)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "fstat", fstat)
    ledger = Ledger.open(path)
    monkeypatch.undo()
    try:
        assert looks == ["stat", "fstat"]
        found = os.stat(lock_file)
        assert (found.st_dev, found.st_ino) in ledger._journal.files
    finally:
        ledger.close()


def test_an_lmdb_lock_file_a_reader_may_not_write_is_refused_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LMDB refuses a reader a lock file it may not write, naming only the directory; the
    refusal names the file (the test plays the permission: it may run as root)."""
    path = tmp_path / "ledger"
    build(path)
    lock_file = str(path / "lock.mdb")
    real = os.open

    def refusing(file: str, flags: int, *args: object, **kwargs: object) -> int:
        if os.fspath(file) == lock_file:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), lock_file)
        return real(file, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing)
    with pytest.raises(LedgerUnavailable, match="lock.mdb"):
        Ledger.open(path, readonly=True)


def _outcome_of_opening(open_it: Callable[[], None], fifo: Path, what: str) -> list[BaseException | None]:
    """`[what open_it() raised]` (`[None]`: it returned), run on a thread of its own: one
    blocked opening the FIFO at `fifo` (a hang) is let go by a writer end, and the test fails
    saying the open of a ledger whose `what` is a FIFO hung."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            open_it()
            outcome.append(None)
        except BaseException as error:  # noqa: B036 (handed to the test's thread)
            outcome.append(error)

    opener = threading.Thread(target=run, daemon=True)
    opener.start()
    opener.join(timeout=10)
    if opener.is_alive():  # blocked in open(2): a writer end lets it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        opener.join(timeout=10)
        pytest.fail(f"opening a ledger whose {what} is a FIFO hung")
    return outcome


@pytest.mark.parametrize("read_only_file_system", [False, True])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_directory_lock_file_that_is_no_regular_file_is_damage_named_not_a_hang(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, read_only_file_system: bool) -> None:
    """A writer opened a FIFO there and locked it; a directory was `NotALedger`; and a reader
    that locks (`tally recover --dry-run`, `tally verify`) on a read-only file system opened
    a FIFO for reading, waiting for a writer that never comes. Each is damage, named, found
    before it is opened; nothing of the ledger is written."""
    path = tmp_path / "ledger"
    state_hash = build(path)
    lock_file = path / "tally.lock"
    lock_file.unlink()
    os.mkfifo(lock_file) if kind == "fifo" else lock_file.mkdir()
    before = _contents(path)
    if read_only_file_system:  # (the test plays it: the rest of the open reads as on any other)
        real = os.open

        def read_only(file: str, flags: int, *args: object, **kwargs: object) -> int:
            if os.fspath(file) == str(lock_file) and flags & (os.O_RDWR | os.O_WRONLY):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(lock_file))
            return real(file, flags, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", read_only)

    def open_it() -> None:
        if read_only_file_system:
            Journal.open_readonly(path, index_names=INDEX_NAMES, lock=True).close()
        else:
            Ledger.open(path).close()

    outcome = _outcome_of_opening(open_it, lock_file, "lock file")
    monkeypatch.undo()
    assert len(outcome) == 1 and isinstance(outcome[0], (JournalCorrupted, JournalCorruptedError)), outcome
    assert "lock file is not a regular file" in str(outcome[0]) and outcome[0].where == str(lock_file)
    assert _contents(path) == before
    shutil.rmtree(lock_file) if kind == "directory" else lock_file.unlink()  # as the error says to
    with Ledger.open(path) as ledger:
        assert ledger.state_hash() == state_hash


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_data_file_that_is_no_regular_file_is_damage_named_not_a_hang(tmp_path: Path, kind: str,
                                                                         readonly: bool) -> None:
    """Opening a FIFO waits for a writer that never comes: the data file is looked at before it
    is opened, as the anchor is, and anything but a regular file in its place is damage, named
    (not a system condition: the directory holds a ledger whose data file is gone)."""
    path = tmp_path / "ledger"
    build(path)
    data_file = path / "data.mdb"
    data_file.unlink()
    if kind == "fifo":
        os.mkfifo(data_file)
    else:
        data_file.mkdir()
    outcome = _outcome_of_opening(lambda: Ledger.open(path, readonly=readonly).close(), data_file, "data file")
    assert len(outcome) == 1 and isinstance(outcome[0], JournalCorrupted), outcome
    assert "not a regular file" in str(outcome[0]) and outcome[0].where == str(data_file)


def test_an_anchor_that_is_a_device_is_damage_and_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening some devices acts on them (a tape rewinds): one in the anchor's place is damage,
    named, found without opening it."""
    path = tmp_path / "ledger"
    build(path)
    (path / ANCHOR_FILE).unlink()
    (path / ANCHOR_FILE).symlink_to("/dev/null")
    opened: list[str] = []
    real = os.open

    def recording(file: str, *args: object, **kwargs: object) -> int:
        opened.append(os.fspath(file))
        return real(file, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", recording)
    with pytest.raises(JournalCorrupted, match="the anchor is not a regular file") as caught:
        Ledger.open(path)
    assert caught.value.where == str(path / ANCHOR_FILE)
    assert str(path / ANCHOR_FILE) not in opened


def test_opening_takes_the_size_of_a_map_another_process_grew_while_it_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live writer elsewhere can grow the map while a read-only open checks the file (the
    check's snapshot keeps it from reusing pages). LMDB then answers MDB_MAP_RESIZED; the open
    takes the new size and checks again, instead of failing."""
    import journal._check

    path = tmp_path / "ledger"
    state = build(path)
    real = journal._check._walk_snapshot
    resized: list[bool] = []

    def grown_meanwhile(*args: object) -> object:
        if not resized:
            resized.append(True)
            raise lmdb.MapResizedError("mdb_txn_begin: MDB_MAP_RESIZED (the test's)")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(journal._check, "_walk_snapshot", grown_meanwhile)
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    journal.close()
    assert resized == [True]
    monkeypatch.undo()
    with Ledger.open(path) as ledger:
        assert ledger.state_hash() == state


@pytest.mark.parametrize("torn", [1, 2], ids=["before mapping", "the checked snapshot's"])
def test_meta_pages_read_while_a_live_writer_rewrites_one_are_read_again_before_damage_is_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: int
) -> None:
    """Opening reads the meta pages twice (before LMDB maps the file, and for the snapshot it
    checks); either read can race a live writer's and see a page half written."""
    import journal._check

    path = tmp_path / "ledger"
    build(path)
    real = journal._check.read_metas
    reads: list[int] = []

    def torn_once(fd: int, data_file: str) -> object:
        reads.append(fd)
        if len(reads) == torn:  # what a read racing the page's write can see
            raise JournalCorruptedError("the meta pages hold transaction ids 40308 and 40313", where="data.mdb")
        return real(fd, data_file)

    monkeypatch.setattr(journal._check, "read_metas", torn_once)
    Journal.open_readonly(path, index_names=INDEX_NAMES).close()
    assert len(reads) == 3


def test_an_overflow_run_longer_than_its_value_is_what_lmdb_leaves_and_passes_the_check(tmp_path: Path) -> None:
    """LMDB rewrites a smaller large value in place, in the run the larger one had."""
    from journal._meta import committed_meta, read_metas
    from journal._pages import walk

    path = tmp_path / "raw"
    env = lmdb.open(str(path), map_size=1 << 24, max_dbs=4)
    db = env.open_db(b"records")
    with env.begin(write=True) as txn:
        txn.put(b"k" * 8, b"x" * 18_000, db=db)
        txn.put(b"k" * 8, b"y" * 5_000, db=db)
    env.close()
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        layout = walk(fd, committed_meta(*read_metas(fd, data_file), data_file), data_file)
    finally:
        os.close(fd)
    assert layout.trees[b"records"].overflow_pages == 5


def test_a_ledger_on_a_read_only_file_system_is_unavailable_for_writing_and_readable_by_the_tools(
    tmp_path: Path,
) -> None:
    """The README: a system condition is `LedgerUnavailable` saying which; the read-only
    commands still read the ledger."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs to mount a tmpfs (root with CAP_SYS_ADMIN): the unit test below covers the error")
    try:
        path = mount / "ledger"
        state = build(path)
        assert subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True).returncode == 0
        with pytest.raises(LedgerUnavailable, match="read-only file system"):
            Ledger.open(path)
        done = tally("verify", path, "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["state_hash"] == state, done.stderr
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_directory_that_cannot_be_locked_for_a_system_reason_is_unavailable_saying_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    real_open = os.open

    def read_only(path: str, flags: int, *args: object) -> int:
        if str(path).endswith("tally.lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(LedgerUnavailable, match="read-only file system"):
        Ledger.open(tmp_path / "ledger")


def test_salvage_refuses_a_data_file_that_belongs_to_another_ledger(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    build(first)
    build(second, transfers=7)
    shutil.copy(second / "data.mdb", first / "data.mdb")
    done = tally("recover", first, "--salvage", "--into", tmp_path / "new")
    assert done.returncode == 1 and "belongs to ledger" in done.stderr, (done.stdout, done.stderr)
    assert not (tmp_path / "new").exists()


def test_a_file_truncated_through_a_checkpoints_overflow_run_is_reported_not_a_sigbus(tmp_path: Path) -> None:
    """The checkpoint record of many accounts lies on an overflow run; when the file ends in
    one and loses its last page, LMDB would map the run past the file's end."""
    path = tmp_path / "ledger"
    with Ledger.open(path, checkpoint_interval=50) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for n in range(300):
            ledger.create_account(f"acct-{n:03d}-" + "x" * 40, currency="USD")
        for n in range(120):
            ledger.transfer(f"t{n}", source="bank", destination=f"acct-{n:03d}-" + "x" * 40, amount=5)
        for n in range(80):  # the next checkpoints outgrow every run freed before
            ledger.create_account(f"late-{n:03d}-" + "y" * 80, currency="USD")
        with ledger._sequencer.lock:  # and the last one, of every account (it builds on none), ends the file in one
            ledger._sequencer.rows.last = None
            ledger._sequencer.checkpoint()
    data = (path / "data.mdb").read_bytes()
    last = len(data) // PAGE_BYTES - 1
    while struct.unpack_from("<H", data, last * PAGE_BYTES + 10)[0] not in (0x01, 0x02, 0x04):
        last -= 1  # the last page with a header: an overflow run's head, or a tree page
    assert struct.unpack_from("<H", data, last * PAGE_BYTES + 10)[0] == 0x04, "the file should end in an overflow run"
    os.truncate(path / "data.mdb", len(data) - PAGE_BYTES)
    script = ("import sys\nfrom engine import Ledger, JournalCorrupted\ntry:\n    Ledger.open(sys.argv[1])\n"
              "except JournalCorrupted as error:\n    print(error)\n    sys.exit(7)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 7 and "truncated" in done.stdout, (done.returncode, done.stdout, done.stderr)
    for view in (["balance", "bank"], ["verify"]):
        shown = tally(view[0], path, *view[1:])
        assert shown.returncode == 1, (view, shown.returncode, shown.stderr)


def test_a_reader_table_full_of_dead_processes_slots_is_cleared_and_one_full_of_live_ones_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger"
    build(path)
    with Ledger.open(path) as ledger:
        env = ledger._journal._store.env
        real_begin, cleared = env.begin, []

        class Full:
            """The environment, its reader table full until `reader_check` (or for good)."""

            def __init__(self, for_good: bool) -> None:
                self.for_good = for_good

            def begin(self, **options: object) -> object:
                if self.for_good or not cleared:
                    raise lmdb.ReadersFullError("mdb_txn_begin: MDB_READERS_FULL (the test's)")
                return real_begin(**options)

            def reader_check(self) -> int:
                cleared.append(True)
                return 600

            def __getattr__(self, name: str) -> object:
                return getattr(env, name)

        ledger._journal._store.env = Full(for_good=False)  # type: ignore[assignment]
        assert ledger.get_transfer("t-1") is not None and cleared == [True]
        ledger._journal._store.env = Full(for_good=True)  # type: ignore[assignment]
        with pytest.raises(LedgerUnavailable, match="readers is full"):
            ledger.get_transfer("t-1")
        ledger._journal._store.env = env


_DYING_READER = """
import os, sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=True, max_dbs=64)
txn = env.begin() if sys.argv[2] != "keep" else None  # a read snapshot, held until the process is killed
if sys.argv[2] == "read, its lock lost":  # a descriptor of lock.mdb closed: LMDB's lock on it is gone
    os.close(os.open(os.path.join(sys.argv[1], "lock.mdb"), os.O_RDONLY))
print("reading", flush=True)
sys.stdin.read()
"""


def _lmdb_process(path: Path, what: str) -> subprocess.Popen[str]:
    """A process with the ledger's LMDB environment open (`what`: "read", holding a snapshot;
    "keep", only keeping its reader table alive), once it says so."""
    process = subprocess.Popen([sys.executable, "-c", _DYING_READER, str(path), what], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "reading\n"
    return process


@pytest.mark.parametrize("cleared_by", ["the writer, as it commits", "the next open"])
def test_the_reader_slot_of_a_process_killed_while_reading_is_cleared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cleared_by: str) -> None:
    """A reader killed mid-read (a `tally verify`, a read-only ledger's process) leaves its LMDB
    slot, which pins its snapshot: every page written since stays in the data file, which grows
    without bound while any process keeps the ledger open (LMDB clears a dead slot only when its
    table is full). The writer clears them as it commits (every `READER_CHECK_S`), and an open
    first thing."""
    path = tmp_path / "l"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
    keeper = _lmdb_process(path, "keep")  # the table outlives the ledger's close, as beside a follower
    try:
        ledger = Ledger.open(path)
        try:
            reader = _lmdb_process(path, "read")
            reader.kill()
            reader.wait(30)
            assert f"{reader.pid} " in ledger._journal._store.env.readers()  # left behind
            if cleared_by == "the writer, as it commits":
                monkeypatch.setattr(journal_commits, "READER_CHECK_S", 0.0)
                monkeypatch.setattr(journal_commits, "DATA_FILE_LOOK_S", 0.0)
                ledger._journal._writer._readers_checked_at = 0.0  # type: ignore[union-attr]
                ledger.transfer("t", source="bank", destination="a", amount=1)
                assert f"{reader.pid} " not in ledger._journal._store.env.readers()
        finally:
            ledger.close()
        if cleared_by == "the next open":
            with Ledger.open(path) as ledger:
                assert f"{reader.pid} " not in ledger._journal._store.env.readers()
    finally:
        keeper.kill()
        keeper.wait(30)


@pytest.mark.parametrize("reader_is", ["killed, not yet reaped", "live, its lock on lock.mdb lost"])
def test_a_writer_clears_the_slot_of_a_reader_that_is_gone_and_only_that(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader_is: str) -> None:
    """A zombie (killed, its parent not yet waiting for it) exists to `kill(pid, 0)` but has lost
    its LMDB lock as a dead process has: its slot is cleared. LMDB's own check would also clear
    the slot of a live process that lost its lock (it closed a descriptor of `lock.mdb`), whose
    snapshot would then be written over under it: that one is left alone."""
    path = tmp_path / "l"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        gone = reader_is == "killed, not yet reaped"
        reader = _lmdb_process(path, "read" if gone else "read, its lock lost")
        try:
            if gone:
                reader.kill()
                assert wait_until(lambda: _proc_state(reader.pid) == "Z")
            monkeypatch.setattr(journal_commits, "READER_CHECK_S", 0.0)
            monkeypatch.setattr(journal_commits, "DATA_FILE_LOOK_S", 0.0)
            ledger._journal._writer._readers_checked_at = 0.0  # type: ignore[union-attr]
            ledger._journal._writer._look_at = 0.0  # type: ignore[union-attr]  # (where the check once ran)
            for n in range(3):
                ledger.transfer(f"t{n}", source="bank", destination="a", amount=1)
            assert (f"{reader.pid} " in ledger._journal._store.env.readers()) is not gone
        finally:
            reader.kill()
            reader.wait(30)


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rpartition(b")")[2].split()[0].decode()


def test_a_directory_made_between_two_looks_is_not_called_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader opening a ledger while another process makes it: the path that was not a
    directory at the first look and is one at the next is no file (it said so, a probe found)."""
    from journal import _directory

    looks = iter([False, True])
    monkeypatch.setattr(_directory.os.path, "isdir", lambda path: next(looks))
    monkeypatch.setattr(_directory.os.path, "exists", lambda path: True)
    with pytest.raises(JournalNotFoundError) as raised:
        _directory.prepare_directory(str(tmp_path / "being-made"), create=False)
    assert "is a file" not in str(raised.value)


def test_a_forked_child_opens_a_ledger_made_anew_where_its_parents_was(tmp_path: Path) -> None:
    """What a forked child cannot open is its parent's ledger's files (py-lmdb knows them by
    device and inode), not the path: a ledger made anew there opens."""
    script = """
import os, shutil, sys
from engine import Ledger
ledger = Ledger.open(sys.argv[1])
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(go_r, 1)
    with Ledger.open(sys.argv[1]) as anew:
        os._exit(0 if [account.id for account in anew.accounts()] == ["new"] else 1)
ledger.close()
shutil.rmtree(sys.argv[1])
with Ledger.open(sys.argv[1]) as anew:
    anew.create_account("new", currency="USD")
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ledger")], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.stdout.split() == ["0"], (done.stdout, done.stderr)


_TWO_LEDGERS = """
import sys
from engine import Ledger, TransferRequest
first, second, marker = sys.argv[1:4]
ledger = Ledger.open(first)
ledger.create_account("bank", currency="USD", overdraft_limit=None)
for n in range(200):
    ledger.create_account(f"{marker}-{n}", currency="USD")
ledger.transfer_many([TransferRequest(f"{marker}-t{n}", "bank", f"{marker}-{n}", 5) for n in range(200)])
ledger.close()
ledger = Ledger.open(second)
ledger.create_account("bank", currency="USD", overdraft_limit=None)
for n in range(50):
    ledger.create_account(f"b-{n}", currency="USD")
    ledger.transfer(f"bt{n}", source="bank", destination=f"b-{n}", amount=3)
ledger.close()
"""


def test_a_data_file_holds_no_bytes_of_another_ledger_the_process_had_open(tmp_path: Path) -> None:
    """LMDB writes whole pages, and the part of a page no node uses holds whatever its buffer
    held: with `meminit`, zeros or this ledger's own earlier bytes. Before, a process that
    closed one ledger and then wrote another wrote the first one's ids into the second's data
    file (hundreds of them, in a new interpreter, every run)."""
    marker = "ZQXJ-first-ledger-only"
    first, second = tmp_path / "first", tmp_path / "second"
    done = subprocess.run([sys.executable, "-c", _TWO_LEDGERS, str(first), str(second), marker], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert marker.encode() in (first / "data.mdb").read_bytes()  # (what there was to leak)
    assert marker.encode() not in (second / "data.mdb").read_bytes()
