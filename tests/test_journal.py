"""The journal layer alone: ordered, checksummed, durable records and their index entries."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
from journal import (
    FORMAT_VERSION,
    LOCK_FILE,
    Completion,
    Journal,
    JournalClosedError,
    JournalCorruptedError,
    JournalLockedError,
    JournalNotFoundError,
    lsn_key,
)
from journal._limits import READ_CHUNK_RECORDS
from journal._commits import put_all
from journal._format import frame_index_value, index_seed, unframe_index_value, unframe_index_values

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10.0
INDEX = "things"


@pytest.fixture
def journal(ledger_path: Path) -> Iterator[Journal]:
    opened = Journal.open(ledger_path, index_names=(INDEX,))
    try:
        yield opened
    finally:
        opened.close()


def append_all(journal: Journal, payloads: list[bytes]) -> list[int]:
    lsns = [journal.append(payload, [(INDEX, payload, lsn_key(n))]) for n, payload in enumerate(payloads)]
    journal.wait_durable(lsns[-1], WAIT_S)
    return lsns


# --- appending -------------------------------------------------------------------


def test_append_returns_gapless_increasing_lsns_from_one(journal: Journal) -> None:
    lsns = [journal.append(f"record {n}".encode()) for n in range(50)]
    assert lsns == list(range(1, 51))
    assert journal.last_lsn == 50


def test_wait_durable_returns_once_every_record_up_to_the_lsn_is_readable(journal: Journal) -> None:
    lsns = [journal.append(f"record {n}".encode()) for n in range(20)]
    journal.wait_durable(lsns[-1], WAIT_S)
    assert journal.durable_lsn == 20
    assert [journal.read(lsn) for lsn in lsns] == [f"record {n}".encode() for n in range(20)]
    assert journal.stats()["records_written"] == 20


def test_wait_durable_for_an_already_durable_lsn_returns_at_once(journal: Journal) -> None:
    append_all(journal, [b"one"])
    journal.wait_durable(1, 0.0)
    journal.wait_durable(0, 0.0)


def test_append_releases_its_completion_once_the_record_is_durable(journal: Journal) -> None:
    completion = Completion(value="mine")
    lsn = journal.append(b"payload", completion=completion)
    assert completion.wait(WAIT_S)
    assert completion.error is None
    assert completion.value == "mine"
    assert journal.durable_lsn >= lsn
    assert journal.read(lsn) == b"payload"


def test_read_of_an_lsn_never_written_is_none(journal: Journal) -> None:
    append_all(journal, [b"one"])
    assert journal.read(2) is None


def test_index_entries_are_written_with_their_record(journal: Journal) -> None:
    append_all(journal, [b"a", b"b", b"c"])
    assert journal.index_get(INDEX, b"b") == lsn_key(1)
    assert journal.index_get(INDEX, b"zzz") is None
    assert journal.index_range(INDEX, b"a", b"c") == [(b"a", lsn_key(0)), (b"b", lsn_key(1))]
    assert journal.index_range(INDEX, b"a", b"\xff", limit=1) == [(b"a", lsn_key(0))]


def test_index_keys_resume_after_a_key_present_or_not(journal: Journal) -> None:
    append_all(journal, [b"a", b"b", b"c"])
    with journal.snapshot() as txn:
        assert list(journal.index_keys(INDEX, txn)) == [b"a", b"b", b"c"]
        assert list(journal.index_keys(INDEX, txn, after=b"a")) == [b"b", b"c"]
        assert list(journal.index_keys(INDEX, txn, after=b"bb")) == [b"c"]  # between two keys
        assert list(journal.index_keys(INDEX, txn, after=b"c")) == []
        assert list(journal.index_keys(INDEX, txn, after=b"")) == [b"a", b"b", b"c"]


# --- reopening -------------------------------------------------------------------


def test_records_and_index_entries_survive_close_and_reopen(ledger_path: Path) -> None:
    payloads = [f"record {n}".encode() for n in range(30)]
    first = Journal.open(ledger_path, index_names=(INDEX,))
    append_all(first, payloads)
    first.close()

    second = Journal.open(ledger_path, index_names=(INDEX,))
    try:
        assert second.last_lsn == 30
        assert second.durable_lsn == 30
        assert list(second.scan()) == list(enumerate(payloads, start=1))
        assert second.index_get(INDEX, b"record 7") == lsn_key(7)
        assert second.append(b"next") == 31
    finally:
        second.close()


def test_close_writes_what_was_appended_before_it(ledger_path: Path) -> None:
    first = Journal.open(ledger_path)
    for n in range(100):
        first.append(f"record {n}".encode())
    first.close()

    second = Journal.open(ledger_path)
    try:
        assert [lsn for lsn, _ in second.scan()] == list(range(1, 101))
    finally:
        second.close()


def test_scan_after_an_lsn_yields_only_the_later_records(journal: Journal) -> None:
    append_all(journal, [b"a", b"b", b"c", b"d"])
    assert list(journal.scan(2)) == [(3, b"c"), (4, b"d")]
    assert list(journal.scan(4)) == []


# --- verification ----------------------------------------------------------------


def write_and_close(path: Path, count: int) -> None:
    journal = Journal.open(path)
    try:
        append_all_plain(journal, count)
    finally:
        journal.close()


def append_all_plain(journal: Journal, count: int) -> None:
    for n in range(count):
        journal.append(f"record {n}".encode())
    journal.wait_durable(count, WAIT_S)


def test_reads_in_chunks_call_between_after_every_chunk_on_the_reading_thread_only(journal: Journal) -> None:
    """`reading_in_chunks`: after every `READ_CHUNK_RECORDS` records or index entries read, on
    the thread that asked (a scan, reads one by one and index ranges both ways count alike),
    and never once it is left or on another thread."""
    records = 3 * READ_CHUNK_RECORDS + 5
    append_all(journal, [b"%06d" % n for n in range(records)])
    scanned: list[int] = []
    calls: list[int] = []

    def read_everything_four_ways() -> None:
        scanned.extend(lsn for lsn, _payload in journal.scan(0))
        for lsn in range(1, records + 1):
            assert journal.read(lsn) is not None
        assert len(journal.index_range(INDEX, b"", b"\xff")) == records
        assert len(journal.index_range_reverse(INDEX, b"", b"\xff")) == records

    with journal.reading_in_chunks(lambda: calls.append(len(scanned))):
        read_everything_four_ways()
        other = threading.Thread(target=read_everything_four_ways)
        other.start()
        other.join(WAIT_S)
    read_everything_four_ways()
    assert len(scanned) == 3 * records
    assert calls[:3] == [READ_CHUNK_RECORDS - 1, 2 * READ_CHUNK_RECORDS - 1, 3 * READ_CHUNK_RECORDS - 1]  # mid-scan
    assert len(calls) == 4 * records // READ_CHUNK_RECORDS


def test_a_flipped_byte_makes_scan_raise_corrupted_naming_the_lsn(ledger_path: Path, flip_record_byte) -> None:
    write_and_close(ledger_path, 5)
    flip_record_byte(ledger_path, 3)

    journal = Journal.open(ledger_path)
    try:
        scanned: list[int] = []
        with pytest.raises(JournalCorruptedError) as caught:
            for lsn, _ in journal.scan():
                scanned.append(lsn)
        assert caught.value.lsn == 3
        assert "at LSN 3" in str(caught.value)
        assert "checksum" in str(caught.value)
        assert scanned == [1, 2]
    finally:
        journal.close()


def test_a_flipped_byte_makes_read_raise_corrupted_naming_the_lsn(ledger_path: Path, flip_record_byte) -> None:
    write_and_close(ledger_path, 6)  # not in the last two records, whose link an open checks
    flip_record_byte(ledger_path, 4)

    journal = Journal.open(ledger_path)
    try:
        assert journal.read(3) == b"record 2"
        with pytest.raises(JournalCorruptedError) as caught:
            journal.read(4)
        assert caught.value.lsn == 4
        assert "at LSN 4" in str(caught.value)
    finally:
        journal.close()


def test_a_record_copied_under_another_lsn_fails_its_checksum(ledger_path: Path, raw_lmdb) -> None:
    write_and_close(ledger_path, 4)  # LSN 2 not in the last two records, whose link an open checks
    with raw_lmdb(ledger_path) as env:
        records = env.open_db(b"records", create=False)
        with env.begin(write=True, db=records) as txn:
            txn.put(lsn_key(2), txn.get(lsn_key(1)))

    journal = Journal.open(ledger_path)
    try:
        with pytest.raises(JournalCorruptedError) as caught:
            journal.read(2)
        assert caught.value.lsn == 2
    finally:
        journal.close()


def test_a_deleted_record_in_the_middle_is_reported_at_open_naming_the_missing_lsn(
    ledger_path: Path, raw_lmdb
) -> None:
    write_and_close(ledger_path, 5)
    with raw_lmdb(ledger_path) as env:
        records = env.open_db(b"records", create=False)
        with env.begin(write=True, db=records) as txn:
            assert txn.delete(lsn_key(3))

    with pytest.raises(JournalCorruptedError) as caught:
        Journal.open(ledger_path)
    assert caught.value.lsn == 3
    assert "LSN 3 is missing" in str(caught.value)


def set_format_version(raw_lmdb, path: Path, version: bytes) -> None:
    with raw_lmdb(path) as env:
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True, db=meta) as txn:
            txn.put(b"format_version", version)


def test_an_unknown_format_version_refuses_to_open(ledger_path: Path, raw_lmdb) -> None:
    write_and_close(ledger_path, 1)
    set_format_version(raw_lmdb, ledger_path, b"99")

    with pytest.raises(JournalCorruptedError) as caught:
        Journal.open(ledger_path)
    assert caught.value.lsn is None
    assert "format version 99" in str(caught.value)


def test_a_refused_open_closes_what_it_opened_so_the_repaired_directory_opens(ledger_path: Path, raw_lmdb) -> None:
    write_and_close(ledger_path, 1)
    set_format_version(raw_lmdb, ledger_path, b"99")
    with pytest.raises(JournalCorruptedError) as caught:
        Journal.open(ledger_path)
    assert caught.value.lsn is None

    set_format_version(raw_lmdb, ledger_path, str(FORMAT_VERSION).encode())  # the operator's repair
    journal = Journal.open(ledger_path)
    try:
        assert list(journal.scan()) == [(1, b"record 0")]
    finally:
        journal.close()


# --- exclusivity and paths -------------------------------------------------------


def test_opening_an_open_directory_again_in_this_process_is_locked(journal: Journal, ledger_path: Path) -> None:
    with pytest.raises(JournalLockedError):
        Journal.open(ledger_path)
    assert journal.append(b"still mine") == 1


def test_opening_an_open_directory_from_another_process_is_locked(journal: Journal, ledger_path: Path) -> None:
    script = "import sys\nfrom journal import Journal\nJournal.open(sys.argv[1])\n"
    child = subprocess.run(
        [sys.executable, "-c", script, str(ledger_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.returncode != 0
    assert "JournalLockedError" in child.stderr
    assert "is open in another live process" in child.stderr


def test_a_closed_journal_releases_its_directory(ledger_path: Path) -> None:
    Journal.open(ledger_path).close()
    again = Journal.open(ledger_path)
    again.close()
    assert (ledger_path / LOCK_FILE).exists()


def test_a_path_that_is_a_file_is_not_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "plain-file"
    path.write_bytes(b"not a journal")
    with pytest.raises(JournalNotFoundError):
        Journal.open(path)
    assert path.read_bytes() == b"not a journal"


def test_a_missing_path_is_not_created_when_creation_is_not_asked_for(ledger_path: Path) -> None:
    with pytest.raises(JournalNotFoundError):
        Journal.open(ledger_path, create=False)
    assert not ledger_path.exists()


# --- growth ----------------------------------------------------------------------


def test_the_map_grows_past_its_initial_size_and_keeps_every_record(ledger_path: Path) -> None:
    record_bytes = 64 * 1024
    count = 80  # 5 MiB of payload into a 1 MiB map
    payloads = [bytes([n]) * record_bytes for n in range(count)]
    journal = Journal.open(ledger_path, map_size_bytes=1 << 20)
    try:
        lsns = [journal.append(payload) for payload in payloads]
        journal.wait_durable(lsns[-1], WAIT_S * 3)
        assert journal.failure is None
        assert journal.durable_lsn == count
        assert [journal.read(lsn) for lsn in lsns] == payloads
    finally:
        journal.close()
    assert (ledger_path / "data.mdb").stat().st_size > 5 * (1 << 20)

    reopened = Journal.open(ledger_path, map_size_bytes=1 << 20)
    try:
        assert list(reopened.scan()) == list(enumerate(payloads, start=1))
    finally:
        reopened.close()


def test_a_full_map_waits_for_a_long_reader_says_so_and_then_grows(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A grow waits for every reader to close. A long one (`state_hash` reads every entry in
    one snapshot) must delay the writer, and be logged, never fail the journal for good."""
    import journal._store

    monkeypatch.setattr(journal._store, "GROW_WAIT_S_MAX", 0.05)
    caplog.set_level("WARNING", logger="tally.journal")
    opened = Journal.open(ledger_path, map_size_bytes=1 << 20)
    try:
        payloads = [bytes([n]) * 64 * 1024 for n in range(40)]  # 2.5 MiB into 1 MiB
        with opened.snapshot():  # a reader still open when the map fills
            lsns = [opened.append(payload) for payload in payloads]
            deadline = time.monotonic() + WAIT_S
            while "waits for 1 reader(s)" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "the journal map is full" in caplog.text
        opened.wait_durable(lsns[-1], WAIT_S)
        assert opened.failure is None
        assert [opened.read(lsn) for lsn in lsns] == payloads
    finally:
        opened.close()


# --- closing ---------------------------------------------------------------------


def test_close_is_idempotent(ledger_path: Path) -> None:
    journal = Journal.open(ledger_path)
    journal.close()
    journal.close()


def test_append_after_close_raises_closed(ledger_path: Path) -> None:
    journal = Journal.open(ledger_path)
    journal.close()
    with pytest.raises(JournalClosedError):
        journal.append(b"late")


def test_reads_after_close_raise_closed(ledger_path: Path) -> None:
    journal = Journal.open(ledger_path)
    append_all_plain(journal, 1)
    journal.close()
    with pytest.raises(JournalClosedError):
        journal.read(1)
    with pytest.raises(JournalClosedError):
        list(journal.scan())


# --- completions -----------------------------------------------------------------


def test_a_completion_resolves_only_once_and_the_first_outcome_stands() -> None:
    completion = Completion()
    assert completion.resolve()
    assert completion.done
    assert not completion.resolve(RuntimeError("too late"))  # a failure path racing the writer
    assert completion.error is None
    assert completion.wait(0) and completion.wait(0)  # released once, still released


def test_a_completion_releases_every_waiter() -> None:
    completion = Completion()
    waiters = 8
    started = threading.Barrier(waiters + 1)
    results: list[bool] = []
    lock = threading.Lock()

    def wait() -> None:
        started.wait(WAIT_S)
        resolved = completion.wait(WAIT_S)
        with lock:
            results.append(resolved)

    threads = [threading.Thread(target=wait) for _ in range(waiters)]
    for thread in threads:
        thread.start()
    started.wait(WAIT_S)
    completion.resolve()
    for thread in threads:
        thread.join(WAIT_S)
    assert results == [True] * waiters
    assert completion.wait(0.0)


def test_a_completion_wakes_a_waiter_already_asleep_on_it() -> None:
    completion = Completion()  # no lock yet: the first waiter makes it
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(completion.wait(WAIT_S)))
    waiter.start()
    deadline = time.monotonic() + WAIT_S
    while not completion._waiting and time.monotonic() < deadline:  # until it sleeps on the lock
        time.sleep(0.001)
    assert completion._waiting == 1
    completion.resolve()
    waiter.join(WAIT_S)
    assert woke == [True]


def test_a_completion_wait_that_times_out_returns_false() -> None:
    completion = Completion()
    assert completion.wait(0.0) is False
    assert completion.wait(0.01) is False
    assert not completion.done


def test_a_completion_carries_the_error_without_raising_it() -> None:
    completion = Completion(value=7)
    failure = RuntimeError("disk on fire")
    completion.resolve(failure)
    assert completion.wait(0.0) is True
    assert completion.error is failure
    assert completion.value == 7


# --- relayed completions -----------------------------------------------------------


def test_a_relay_releases_every_waiter_one_after_another(journal: Journal) -> None:
    from journal import Completion

    completions = [Completion(relayed=True) for _ in range(16)]
    woken: list[int] = []
    started = threading.Barrier(len(completions) + 1)

    def waiter(n: int) -> None:
        started.wait(10)
        if completions[n].wait(10):
            woken.append(n)

    threads = [threading.Thread(target=waiter, args=(n,)) for n in range(len(completions))]
    for thread in threads:
        thread.start()
    started.wait(10)
    lsn = 0
    for completion in completions:
        lsn = journal.append(b"x", (), completion)
    journal.wait_durable(lsn, 10)
    for thread in threads:
        thread.join(10)
    assert sorted(woken) == list(range(len(completions)))
    assert all(completion.done for completion in completions)


def test_a_relay_passes_over_completions_nobody_waits_on_or_whose_waiter_gave_up() -> None:
    from journal._completion import Completion, relay

    unwatched, abandoned, watched = (Completion(relayed=True) for _ in range(3))
    assert not abandoned.wait(0.01)  # its waiter timed out before the records were durable
    outcome: list[bool] = []
    waiting = threading.Thread(target=lambda: outcome.append(watched.wait(10)))
    waiting.start()  # blocked before the relay or not: either way it must be released
    relay([unwatched, abandoned, watched])
    waiting.join(10)
    assert outcome == [True]
    assert unwatched.wait(0) and abandoned.wait(0) and watched.wait(0)  # and stay released


def test_writing_records_out_of_key_order_fails_instead_of_skipping_one(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path), max_dbs=1, sync=False)
    try:
        db = env.open_db(b"records")
        with env.begin(write=True) as txn:
            put_all(txn, db, [[lsn_key(1), b"one"], [lsn_key(3), b"three"]], append=True)
        with env.begin(write=True) as txn, pytest.raises(lmdb.Error, match="wrote 1 of 2"):
            put_all(txn, db, [[lsn_key(4), b"four", lsn_key(2), b"two"]], append=True)
    finally:
        env.close()


def test_a_lone_caller_commits_its_own_record_and_a_crowd_is_left_to_the_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine import Ledger
    from journal._writer import Writer

    committers: list[str] = []
    real = Writer._commit

    def commit(self: Writer, batch: list[object]) -> None:
        committers.append(threading.current_thread().name)
        real(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(Writer, "_commit", commit)
    with Ledger.open(tmp_path / "ledger") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        committers.clear()
        for k in range(5):
            ledger.transfer(f"t{k}", source="bank", destination="alice", amount=1)
        assert committers == ["MainThread"] * 5  # no hand-off to the writer thread and back
        committers.clear()
        ledger.create_account("bob", currency="USD")  # not a transfer: the writer thread's
        assert committers == ["tally-journal-writer"]
        assert ledger.balance("alice").posted == 5


def test_a_pause_lets_go_of_the_interpreter_once_a_read_has_held_it_for_the_switch_interval(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`Pause`, called between two chunks: it sleeps `READ_PAUSE_S` only once the switch
    interval has passed since the read's first chunk or its last sleep, and counts from the end
    of that sleep."""
    from journal import _chunks

    hold, READ_PAUSE_S = 0.5, 0.125  # (sums of binary fractions: exact)
    monkeypatch.setattr(_chunks.sys, "getswitchinterval", lambda: hold)
    monkeypatch.setattr(_chunks, "READ_PAUSE_S", READ_PAUSE_S)

    now = [100.0]
    slept: list[float] = []

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return now[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds

    monkeypatch.setattr(_chunks, "time", Clock)
    between = _chunks.Pause()
    between()
    now[0] += hold / 2
    between()
    assert slept == []
    now[0] += hold / 2
    between()
    assert slept == [READ_PAUSE_S]
    now[0] += hold - READ_PAUSE_S / 2
    between()
    assert slept == [READ_PAUSE_S]  # counted from the end of the sleep
    now[0] += READ_PAUSE_S
    between()
    assert slept == [READ_PAUSE_S, READ_PAUSE_S]


@pytest.mark.parametrize("entries", [1, 3])
def test_a_leaf_of_index_entries_whose_checksums_are_stored_byte_reversed_fails_as_each_entry_does(
        entries: int) -> None:
    """An open checks a leaf of index entries at once (`unframe_index_values`); it must refuse
    every entry `unframe_index_value` refuses: here, each entry's checksum with its four bytes
    in the other order (what a checksum stored little-endian would read as)."""
    seed = index_seed("transfers")
    keys = [f"key-{n}".encode() for n in range(entries)]
    stored = [frame_index_value(seed, key, b"value %d" % n) for n, key in enumerate(keys)]
    assert unframe_index_values(seed, "transfers", keys, stored) == [b"value %d" % n for n in range(entries)]
    reversed_sums = [value[:-4] + value[-4:][::-1] for value in stored]
    for key, value in zip(keys, reversed_sums, strict=True):
        with pytest.raises(JournalCorruptedError):
            unframe_index_value(seed, "transfers", key, value)
    with pytest.raises(JournalCorruptedError, match="fails its checksum"):
        unframe_index_values(seed, "transfers", keys, reversed_sums)
