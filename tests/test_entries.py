"""The entry index and the unindexed entries: checkpoints write the index in bulk, and every
reader (the API, the state hash, the audit, the operator tools) sees the same entries
whichever side of a checkpoint they are on."""

from __future__ import annotations

import gc
import random
import threading
from pathlib import Path

import pytest

import coordinator._checkpoints as checkpoints_module
from coordinator import INDEX_NAMES, _sequencer, audit
from coordinator._entries import (
    Row,
    UnindexedEntries,
    indexed_through,
    newest_checkpoint_lsn,
    unindexed_entries,
    with_unindexed,
)
from coordinator._records import (
    CHECKPOINTS_INDEX,
    ENTRIES_INDEX,
    INDEXED_TO_KEY,
    encode_entry_value,
    entry_key,
    is_entry_key,
    lsn_value,
)
import journal._commits as journal_commits
import journal._writer as journal_writer
from engine import Entry, InsufficientFunds, JournalCorrupted, Ledger, LedgerUnavailable, Transfer, TransferRequest
from engine._tools_read import balance, history
from journal import Journal, JournalTimeoutError
from journal._format import frame_index_value, index_seed

ACCOUNTS = ("alice", "bob", "carol", "dave")

from tests.serve_support import run_tally
from tests.support import audit_of


def row(account: str, seq: int, lsn: int) -> Row:
    return entry_key(account, seq), encode_entry_value(f"t-{lsn}", 1, seq, lsn, None)


def facts(entries: list[Entry]) -> list[tuple[int, str, int, int]]:
    """What an entry says, without its LSN (checkpoint records take LSNs too)."""
    return [(entry.seq, entry.transfer_id, entry.amount, entry.balance) for entry in entries]


def build(path: Path, checkpoint_interval: int, transfers: int = 60, seed: int = 5) -> dict[str, list[Entry]]:
    """A ledger of a few accounts and `transfers` transfers, single and batched; its entries."""
    rng = random.Random(seed)
    with Ledger.open(path, checkpoint_interval=checkpoint_interval) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in ACCOUNTS:
            ledger.create_account(name, currency="USD")
        for n in range(transfers):
            source, destination = rng.sample(("bank", *ACCOUNTS), 2)
            if n % 3:
                [outcome] = ledger.transfer_many([TransferRequest(f"t{n}", source, destination, rng.randint(1, 50))])
                assert isinstance(outcome, (Transfer, InsufficientFunds)), outcome
            else:
                try:
                    ledger.transfer(f"t{n}", source=source, destination=destination, amount=rng.randint(1, 50))
                except InsufficientFunds:  # refusals are part of the history too (nothing else is)
                    pass
        return {account: ledger.entries(account) for account in ("bank", *ACCOUNTS)}


def indexed_count(path: Path) -> tuple[int, int]:
    """(entries in the index, LSN of the newest checkpoint whose entries it holds), read from the journal alone."""
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        with journal.snapshot() as txn:
            entries = sum(1 for key in journal.index_keys(ENTRIES_INDEX, txn) if is_entry_key(key))
            return entries, indexed_through(journal, txn)
    finally:
        journal.close()


def checkpoint_now(path: Path) -> int:
    """Open the ledger, journal a checkpoint (it indexes every entry), close; its LSN."""
    with Ledger.open(path) as ledger, ledger._sequencer.lock:
        return ledger._sequencer.checkpoint()


def delete_key(raw_lmdb: object, path: Path, index: str, key: bytes) -> None:
    """Damage a closed ledger: delete `key` from `index`."""
    with raw_lmdb(path) as env:  # type: ignore[operator]
        with env.begin(write=True) as txn:
            assert txn.delete(key, db=env.open_db(index.encode(), txn=txn, create=False))


@pytest.mark.parametrize("checkpoint_interval", [1, 4, 7, 10**6])
def test_entries_state_hash_and_tools_do_not_depend_on_where_the_checkpoints_fell(
    tmp_path: Path, checkpoint_interval: int
) -> None:
    reference = build(tmp_path / "reference", 10**6)
    path = tmp_path / "ledger"

    seen = build(path, checkpoint_interval)

    assert {account: facts(entries) for account, entries in seen.items()} == {
        account: facts(entries) for account, entries in reference.items()
    }
    with Ledger.open(path, checkpoint_interval=checkpoint_interval) as reopened, \
            Ledger.open(tmp_path / "reference") as original:
        assert reopened.state_hash() == original.state_hash()
        for account, entries in seen.items():
            assert reopened.entries(account) == entries
            middle = len(entries) // 2
            assert reopened.entries(account, after=middle, limit=3) == entries[middle : middle + 3]
            assert reopened.entries(account, limit=middle) == entries[:middle]
    for account, entries in seen.items():
        shown = history(str(path), account, 0)["entries"]
        assert [(item["seq"], item["transfer"], item["amount"], item["balance"], item["lsn"]) for item in shown] == [
            (*fact, entry.lsn) for fact, entry in zip(facts(entries), entries, strict=True)
        ]
        assert balance(str(path), account)["posted"] == (entries[-1].balance if entries else 0)
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        assert audit(journal).whole
    finally:
        journal.close()


def test_the_index_holds_exactly_the_entries_of_the_commits_before_the_newest_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    entries = build(path, checkpoint_interval=9)

    indexed, checkpoint_lsn = indexed_count(path)

    assert checkpoint_lsn > 0
    before = sum(1 for account in entries.values() for entry in account if entry.lsn < checkpoint_lsn)
    assert 0 < indexed == before < sum(map(len, entries.values()))


def test_without_a_checkpoint_nothing_is_indexed_and_a_recovery_checkpoint_indexes_everything(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    entries = build(path, checkpoint_interval=10**6)
    assert indexed_count(path) == (0, 0)

    checkpoint_now(path)

    assert indexed_count(path)[0] == sum(map(len, entries.values()))
    with Ledger.open(path) as reopened:
        assert {account: reopened.entries(account) for account in entries} == entries


def test_an_index_entry_that_disagrees_with_its_unindexed_commit_fails_the_audit(
    tmp_path: Path, raw_lmdb: object
) -> None:
    path = tmp_path / "ledger"
    entries = build(path, checkpoint_interval=10**6)
    last = entries["bank"][-1]
    with raw_lmdb(path) as env:  # type: ignore[operator]
        index = env.open_db(ENTRIES_INDEX.encode(), create=False)
        with env.begin(write=True, db=index) as txn:
            key = entry_key("bank", last.seq)
            wrong = encode_entry_value(last.transfer_id, last.amount + 1, 0, last.lsn, last.timestamp)
            txn.put(key, frame_index_value(index_seed(ENTRIES_INDEX), key, wrong))  # well framed, and wrong

    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        report = audit(journal)
        with journal.snapshot() as txn:
            derived = unindexed_entries(journal, txn)
    finally:
        journal.close()

    assert not report.whole
    assert report.problem is not None and repr(last.transfer_id) in report.problem
    assert [int.from_bytes(key[-8:], "big") for key, _ in derived["bank"]] == [e.seq for e in entries["bank"]]


def test_unindexed_rows_are_durable_ones_in_seq_order_and_count_once_while_a_checkpoint_is_queued() -> None:
    unindexed = UnindexedEntries({"a": dict([row("a", 1, 10), row("a", 2, 11)])})
    unindexed.carry(12)
    unindexed.add(["a", "a"], [*row("a", 3, 13), *row("a", 4, 14)])

    assert unindexed.rows("a", durable_lsn=13) == [row("a", 1, 10), row("a", 2, 11), row("a", 3, 13)]
    unindexed.release(indexed_lsn=11)  # the rows of the checkpoint at 12 are not all in the index yet: they stay
    assert unindexed.rows("a", durable_lsn=14)[:2] == [row("a", 1, 10), row("a", 2, 11)]
    unindexed.release(indexed_lsn=12)
    assert unindexed.rows("a", durable_lsn=14) == [row("a", 3, 13), row("a", 4, 14)]
    assert unindexed.all_rows(durable_lsn=13) == {"a": [row("a", 3, 13)]}
    assert unindexed.rows("nobody", durable_lsn=14) == []


def test_a_reader_racing_a_checkpoint_sees_its_rows_once() -> None:
    unindexed = UnindexedEntries({"a": dict([row("a", 1, 10)]), "b": dict([row("b", 1, 10)])})
    current = unindexed.current
    unindexed.carry(11)
    unindexed._carried = (*unindexed._carried, (11, current))  # what a reader between the swaps could meet

    assert unindexed.rows("a", durable_lsn=11) == [row("a", 1, 10)]
    assert list(unindexed.ordered()) == []


def test_a_checkpoint_carries_every_account_in_index_key_order() -> None:
    unindexed = UnindexedEntries({"bb": dict([row("bb", 1, 3)]), "a": dict([row("a", 1, 3)])})
    unindexed.add(["c", "a"], [*row("c", 1, 4), *row("a", 2, 4)])

    ordered = list(unindexed.ordered())

    # Flat, key then value; shorter ids first (a key starts with the id's length).
    assert ordered == [*row("a", 1, 3), *row("a", 2, 4), *row("c", 1, 4), *row("bb", 1, 3)]
    assert ordered[::2] == sorted(ordered[::2])


def test_with_unindexed_merges_past_the_index_from_start_up_to_limit() -> None:
    indexed = [row("a", 1, 1), row("a", 2, 2)]
    unindexed = [row("a", 2, 2), row("a", 3, 3), row("a", 4, 4)]

    assert with_unindexed(indexed, unindexed, entry_key("a", 1), None) == [*indexed, row("a", 3, 3), row("a", 4, 4)]
    assert with_unindexed(indexed, unindexed, entry_key("a", 1), 3) == [*indexed, row("a", 3, 3)]
    assert with_unindexed(indexed, unindexed, entry_key("a", 1), 2) == indexed
    assert with_unindexed([], unindexed, entry_key("a", 4), None) == [row("a", 4, 4)]


def test_a_transfer_the_journal_refused_to_queue_leaves_no_entry_behind(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("alice", currency="USD")
    ledger.transfer("t1", source="bank", destination="alice", amount=10)
    ledger._coordinator.combiner._start_in_turn = lambda tickets, wake_writer=True, held=None: tickets  # type: ignore[method-assign] # the mailbox path
    journal = ledger._journal
    append_block = journal.append_block
    refusals = [JournalTimeoutError("the journal writer is not keeping up")]

    def refuse_once(*args: object, **kwargs: object) -> int:
        if refusals:
            raise refusals.pop()
        return append_block(*args, **kwargs)  # type: ignore[arg-type]

    journal.append_block = refuse_once  # type: ignore[method-assign]
    with pytest.raises(LedgerUnavailable):
        ledger.transfer("t2", source="bank", destination="alice", amount=5)
    ledger.transfer("t3", source="bank", destination="alice", amount=7)

    assert ledger.get_transfer("t2") is None
    assert facts(ledger.entries("alice")) == [(1, "t1", 10, 10), (2, "t3", 7, 17)]
    with ledger._sequencer.lock:
        ledger._sequencer.checkpoint()
    assert facts(ledger.entries("alice")) == [(1, "t1", 10, 10), (2, "t3", 7, 17)]


def test_entries_missing_before_a_checkpoint_fail_the_audit_even_with_the_checkpoint_unindexed(
    tmp_path: Path, raw_lmdb: object
) -> None:
    path = tmp_path / "ledger"
    first = build(path, checkpoint_interval=10**6)["alice"][0]
    checkpoint_lsn = checkpoint_now(path)
    delete_key(raw_lmdb, path, ENTRIES_INDEX, entry_key("alice", first.seq))
    delete_key(raw_lmdb, path, CHECKPOINTS_INDEX, lsn_value(checkpoint_lsn))

    report = audit_of(path)

    assert not report.whole
    assert report.problem is not None and repr(first.transfer_id) in report.problem


def test_a_checkpoints_index_that_misses_the_last_checkpoint_fails_the_audit(tmp_path: Path, raw_lmdb: object) -> None:
    path = tmp_path / "ledger"
    build(path, checkpoint_interval=10**6)
    checkpoint_lsn = checkpoint_now(path)
    delete_key(raw_lmdb, path, CHECKPOINTS_INDEX, lsn_value(checkpoint_lsn))

    report = audit_of(path)

    assert not report.whole
    assert report.problem == f"the checkpoints index names LSN 0, the last checkpoint record is at LSN {checkpoint_lsn}"


def test_taking_back_a_refused_chunk_leaves_every_account_as_it_was() -> None:
    unindexed = UnindexedEntries({"a": dict([row("a", 1, 10)])})
    before = {account: dict(flat) for account, flat in unindexed.current.items()}

    unindexed.add(["a", "b", "a"], [*row("a", 2, 11), *row("b", 1, 11), *row("a", 3, 12)])
    unindexed.remove(["a", "b", "a"])

    assert unindexed.current == before


def test_entries_waiting_for_the_index_are_nothing_the_garbage_collector_walks(ledger: Ledger) -> None:
    """Each full collection visited every unindexed entry while they were kept in lists: at
    10,000 accounts a third of its pause, which single transfers beside batches wait out."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for n in range(3):
        ledger.create_account(f"a{n}", currency="USD")
    ledger.transfer_many([TransferRequest(f"t{k}", "bank", f"a{k % 3}", 1) for k in range(30)])
    ledger.transfer("t-single", source="bank", destination="a0", amount=1)

    current = ledger._sequencer.unindexed.current
    assert sorted(current) == ["a0", "a1", "a2", "bank"]
    assert len(current["bank"]) == 31
    assert not any(gc.is_tracked(rows) for rows in current.values())


def test_entries_of_a_queued_chunk_are_not_read_before_they_are_durable() -> None:
    unindexed = UnindexedEntries({"a": dict([row("a", 1, 10)])})

    unindexed.add(["a"], [*row("a", 2, 11)])

    assert unindexed.rows("a", durable_lsn=10) == [row("a", 1, 10)]
    assert unindexed.all_rows(durable_lsn=10) == {"a": [row("a", 1, 10)]}


def test_a_reader_racing_transfers_and_checkpoints_sees_every_acknowledged_entry_once(ledger_path: Path) -> None:
    transfers = 300
    acknowledged = [0]
    done = threading.Event()
    problems: list[str] = []
    with Ledger.open(ledger_path, checkpoint_interval=3) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")

        def send() -> None:
            try:
                for n in range(transfers):
                    if n % 2:
                        ledger.transfer(f"t{n}", source="bank", destination="alice", amount=1)
                    else:
                        assert isinstance(ledger.transfer_many([TransferRequest(f"t{n}", "bank", "alice", 1)])[0], Transfer)
                    acknowledged[0] = n + 1
            finally:
                done.set()

        def read() -> None:
            while not done.is_set():
                floor = acknowledged[0]  # acknowledged before the read: must be there
                seen = ledger.entries("alice")
                if [entry.seq for entry in seen] != list(range(1, len(seen) + 1)) or len(seen) < floor:
                    problems.append(f"{len(seen)} entries ({[entry.seq for entry in seen][-5:]}) after {floor} acks")
                    return

        sender, reader = threading.Thread(target=send), threading.Thread(target=read)
        sender.start()
        reader.start()
        sender.join(timeout=60)
        reader.join(timeout=60)
        assert not sender.is_alive() and not reader.is_alive()
        assert problems == []
        assert [entry.balance for entry in ledger.entries("alice")] == list(range(1, transfers + 1))


def test_entries_waiting_in_memory_bring_a_checkpoint_whatever_the_interval(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sequencer, "UNINDEXED_ENTRIES_MAX", 10)
    with Ledger.open(ledger_path, checkpoint_interval=10**9) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        for n in range(12):
            ledger.transfer(f"t{n}", source="bank", destination="alice", amount=1)
            assert ledger._sequencer.unindexed.count < 10

        assert [entry.balance for entry in ledger.entries("alice")] == list(range(1, 13))
    indexed, checkpoint_lsn = indexed_count(ledger_path)
    assert checkpoint_lsn > 0 and indexed >= 10


def test_a_checkpoints_entries_go_to_the_index_behind_it_in_slices_and_every_reader_sees_them_all_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_commits, "BEHIND_PAIRS_MIN", 4)  # a few a group commit: many commits a checkpoint
    # Only the group commits of records take them (an idle writer would take them as fast as it
    # can, and how many reads find it behind would be the machine's speed): so reads certainly
    # find the index behind a checkpoint, many times, however slow this thread runs.
    monkeypatch.setattr(journal_writer.Writer, "_behind_due", lambda self: False)
    rng = random.Random(11)
    behind_seen = 0
    with Ledger.open(tmp_path / "reference", checkpoint_interval=10**6) as reference, \
            Ledger.open(tmp_path / "ledger", checkpoint_interval=7) as ledger:
        for each in (reference, ledger):
            each.create_account("bank", currency="USD", overdraft_limit=None)
            for name in ACCOUNTS:
                each.create_account(name, currency="USD")
        for n in range(120):
            source, destination = rng.sample(("bank", *ACCOUNTS), 2)
            amount = rng.randint(1, 50)
            for each in (reference, ledger):
                try:
                    each.transfer(f"t{n}", source=source, destination=destination, amount=amount)
                except InsufficientFunds:
                    pass
            checkpoint = ledger._sequencer.rows.last
            if checkpoint is not None and ledger._journal.indexed_lsn < checkpoint[0]:
                behind_seen += 1  # read while a checkpoint's entries are still going in
            expected = {account: facts(reference.entries(account)) for account in ("bank", *ACCOUNTS)}
            assert {account: facts(ledger.entries(account)) for account in expected} == expected
        assert ledger.state_hash() == reference.state_hash()
        newest = ledger._sequencer.rows.last
    assert behind_seen > 10
    assert newest is not None and indexed_count(tmp_path / "ledger")[1] == newest[0]  # the close wrote the last slices
    with Ledger.open(tmp_path / "ledger") as reopened, Ledger.open(tmp_path / "reference") as reference:
        assert reopened.state_hash() == reference.state_hash()
    assert audit_of(tmp_path / "ledger").whole  # (readers without the writer's memory: the tests below)


def behind(path: Path, raw_lmdb: object) -> tuple[int, dict[str, list[Entry]]]:
    """A closed ledger whose newest checkpoint's entries are not all in the index yet, as a
    crash between two slices leaves one: the mark set back to the checkpoint before, and the
    last entry indexed for "alice" (from after that checkpoint) taken out. That checkpoint's
    LSN, and the entries."""
    entries = build(path, checkpoint_interval=7)
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        with journal.snapshot() as txn:
            *_, before, newest = [int.from_bytes(key, "big") for key in journal.index_keys(CHECKPOINTS_INDEX, txn)]
    finally:
        journal.close()
    with raw_lmdb(path) as env:  # type: ignore[operator]
        index = env.open_db(ENTRIES_INDEX.encode(), create=False)
        with env.begin(write=True, db=index) as txn:
            txn.put(INDEXED_TO_KEY, frame_index_value(index_seed(ENTRIES_INDEX), INDEXED_TO_KEY, lsn_value(before)))
            last = [entry for entry in entries["alice"] if before < entry.lsn < newest][-1]
            assert txn.delete(entry_key("alice", last.seq))
    return before, entries


def test_entries_not_yet_written_behind_a_checkpoint_are_read_from_the_records_and_pass_the_audit(
    tmp_path: Path, raw_lmdb: object
) -> None:
    path = tmp_path / "ledger"
    _, entries = behind(path, raw_lmdb)

    assert audit_of(path).whole
    assert all(history(str(path), account, 0)["entries"][-1]["seq"] == entries[account][-1].seq
               for account in entries if entries[account])
    with Ledger.open(path, readonly=True) as reader:
        assert {account: reader.entries(account) for account in entries} == entries
    with Ledger.open(path) as reopened:
        assert {account: reopened.entries(account) for account in entries} == entries
        with reopened._sequencer.lock:
            newest = reopened._sequencer.checkpoint()  # carries them again, with the ones after
    assert audit_of(path).whole
    assert indexed_count(path) == (sum(map(len, entries.values())), newest)


def test_an_entry_missing_behind_a_checkpoint_before_a_later_one_of_its_account_fails_the_audit(
    tmp_path: Path, raw_lmdb: object
) -> None:
    path = tmp_path / "ledger"
    before, entries = behind(path, raw_lmdb)
    first = [entry for entry in entries["bob"] if entry.lsn > before][0]
    delete_key(raw_lmdb, path, ENTRIES_INDEX, entry_key("bob", first.seq))  # bob's later ones stay indexed

    report = audit_of(path)

    assert not report.whole
    assert report.problem is not None and repr(first.transfer_id) in report.problem and "later" in report.problem


def test_an_entry_missing_before_the_checkpoint_the_mark_names_fails_the_audit(tmp_path: Path, raw_lmdb: object) -> None:
    path = tmp_path / "ledger"
    before, entries = behind(path, raw_lmdb)
    first = entries["carol"][0]
    assert first.lsn < before
    delete_key(raw_lmdb, path, ENTRIES_INDEX, entry_key("carol", first.seq))

    report = audit_of(path)

    assert not report.whole
    assert report.problem is not None and repr(first.transfer_id) in report.problem


def test_a_journal_without_the_mark_gets_it_with_the_first_checkpoint_that_writes_rows_behind_it(
    tmp_path: Path, raw_lmdb: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger"
    build(path, checkpoint_interval=7)
    delete_key(raw_lmdb, path, ENTRIES_INDEX, INDEXED_TO_KEY)  # as a release before the mark left it
    with Ledger.open(path, checkpoint_interval=10**6) as ledger:
        journal = ledger._journal
        with journal.snapshot() as txn:
            before = indexed_through(journal, txn)  # the newest checkpoint, without the mark
        ledger.transfer("late", source="bank", destination="alice", amount=3)
        monkeypatch.setattr(journal_writer.Writer, "_take_behind", lambda self, records: ({}, None, False))
        with ledger._sequencer.lock:
            newest = ledger._sequencer.checkpoint()
        journal.wait_durable(newest, 10)
        with journal.snapshot() as txn:  # its rows not written yet: the mark names the one before
            assert journal.index_get(ENTRIES_INDEX, INDEXED_TO_KEY, txn) == lsn_value(before)
            assert indexed_through(journal, txn) == before < newest
        assert ledger.entries("alice")[-1].transfer_id == "late"
        monkeypatch.undo()
    assert indexed_count(path)[1] == newest  # the close wrote them
    assert audit_of(path).whole


def test_a_checkpoint_with_no_rows_to_write_behind_it_is_marked_so_an_open_reads_no_records_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint right after another (a close's of every account, say) carries no entries:
    the mark names it at once, and the next open derives no unindexed entries from the records
    (before, it named the one before, and the open decoded the newest checkpoint's rows twice
    more to find none)."""
    path = tmp_path / "ledger"
    build(path, checkpoint_interval=10**6)
    with Ledger.open(path) as ledger, ledger._sequencer.lock:
        first = ledger._sequencer.checkpoint()  # the entries since the last, behind it
        second = ledger._sequencer.checkpoint()
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        with journal.snapshot() as txn:
            newest = newest_checkpoint_lsn(journal, txn)  # (the close's, or the second)
    finally:
        journal.close()
    assert first < second <= newest and indexed_count(path)[1] == newest
    scanned: list[int] = []
    unindexed = checkpoints_module.unindexed_by_key
    monkeypatch.setattr(checkpoints_module, "unindexed_by_key",
                        lambda *args: scanned.append(args[2]) or unindexed(*args))  # type: ignore[func-returns-value]
    with Ledger.open(path, readonly=True) as ledger:
        assert ledger.entries("alice")
    assert scanned == []
    assert audit_of(path).whole


def test_a_journal_without_the_mark_keeps_readers_off_the_rows_still_behind_a_checkpoint_after_one_with_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key yet, a checkpoint with no rows to carry, then one with rows: until those rows
    are written (held back here, as a crash before the next commit would leave them), the
    key names a checkpoint before them, and a reader derives their entries from the records.
    (With the key left for the first checkpoint's behind slice, which had not come due, readers
    took the newest checkpoint for the mark and saw no entry of the transfer.)"""
    path = tmp_path / "ledger"
    with Ledger.open(path, checkpoint_interval=10**6) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        journal = ledger._journal
        monkeypatch.setattr(journal_writer.Writer, "_take_behind", lambda self, records: ({}, None, False))
        with ledger._sequencer.lock:
            first = ledger._sequencer.checkpoint()  # nothing to carry
        ledger.transfer("late", source="bank", destination="alice", amount=3)
        with ledger._sequencer.lock:
            newest = ledger._sequencer.checkpoint()  # carries the transfer's entries
        journal.wait_durable(newest, 10)
        with journal.snapshot() as txn:  # what a reader in another process derives
            assert indexed_through(journal, txn) < newest
            assert len(unindexed_entries(journal, txn)["alice"]) == 1
        monkeypatch.undo()
    assert first < newest and indexed_count(path)[1] >= newest
    assert audit_of(path).whole


def test_a_mark_that_names_no_checkpoint_is_damage_in_the_entry_index_for_every_reader(
    tmp_path: Path, raw_lmdb: object
) -> None:
    path = tmp_path / "ledger"
    entries = build(path, checkpoint_interval=7)
    lsn = entries["alice"][-1].lsn  # a commit's, not a checkpoint's
    with raw_lmdb(path) as env:  # type: ignore[operator]
        index = env.open_db(ENTRIES_INDEX.encode(), create=False)
        with env.begin(write=True, db=index) as txn:  # well framed: only its meaning is wrong
            txn.put(INDEXED_TO_KEY, frame_index_value(index_seed(ENTRIES_INDEX), INDEXED_TO_KEY, lsn_value(lsn)))

    with pytest.raises(JournalCorrupted) as opening:
        Ledger.open(path)
    report = audit_of(path)
    shown = run_tally("verify", path)

    assert f"names LSN {lsn}, no checkpoint" in str(opening.value) and opening.value.where == "the entries index"
    assert not report.whole and report.problem is not None and f"names LSN {lsn}, no checkpoint" in report.problem
    assert shown.returncode != 0 and f"names LSN {lsn}, no checkpoint" in shown.stdout + shown.stderr
    assert "Traceback" not in shown.stderr
