"""Checkpoints that hold only what changed (CHECKPOINT4): what they hold, how opening walks
back the chain, and how the pair checks catch one that misses an account."""

from __future__ import annotations

import gc
import math
import random
import weakref
from collections.abc import Iterable
from pathlib import Path

import pytest

from coordinator import _checkpoint_rows, _checkpoints, _recovery, _sequencer
from coordinator._history import Checkpointed, typed
from coordinator._limits import CLOSE_CHECKPOINT_ROWS
from coordinator._records import INDEX_NAMES, decode
from engine import Account, InsufficientFunds, Ledger, LedgerError
from engine._tools_audit import verify
from journal import Journal

ACCOUNTS = 60
BUSY = 6
"""Transfers move among the first few accounts only: most accounts never change."""


@pytest.fixture(autouse=True)
def chain_left_at_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chain of checkpoints as a ledger that stopped without closing leaves it: closing
    writes no checkpoint of every account here (`Sequencer.checkpoint_on_close`), but in the
    tests of that checkpoint, which ask for it (`closing_checkpoints`)."""
    monkeypatch.setattr(_sequencer, "CLOSE_CHECKPOINT_ROWS", math.inf)


@pytest.fixture
def closing_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sequencer, "CLOSE_CHECKPOINT_ROWS", CLOSE_CHECKPOINT_ROWS)


def build(path: Path, transfers: int = 150, interval: int = 10) -> tuple[dict[str, object], str]:
    """A ledger whose checkpoints hold a few of its accounts each; every balance and the state hash."""
    rng = random.Random(3)
    with Ledger.open(path, checkpoint_interval=interval) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for n in range(ACCOUNTS):
            ledger.create_account(f"a{n}", currency="USD")
        for k in range(transfers):
            source, destination = rng.sample(range(BUSY), 2)
            try:
                ledger.transfer(f"t{k}", source="bank" if k % 4 == 0 else f"a{source}",
                                destination=f"a{destination}", amount=rng.randint(1, 40))
            except InsufficientFunds:  # a refusal is part of the history (nothing else is)
                pass
        balances = {account.id: ledger.balance(account.id) for account in ledger.accounts()}
        return balances, ledger.state_hash()


def checkpoints(path: Path) -> list[tuple[int, list[object]]]:
    journal = Journal.open_readonly(str(path), index_names=INDEX_NAMES)
    try:
        found = []
        for lsn, payload in journal.scan(0):
            record = decode(lsn, payload)
            if isinstance(typed(lsn, record), Checkpointed):
                found.append((lsn, record))
        return found
    finally:
        journal.close()


def _walked_back(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The LSNs of the checkpoints the opens from now on read on their walk back."""
    read: list[int] = []
    real = _checkpoints.checkpoint_before

    def counted(journal: Journal, lsn: int, at: int, previous: object) -> list[object]:
        read.append(at)
        return real(journal, lsn, at, previous)  # type: ignore[arg-type]

    monkeypatch.setattr(_checkpoints, "checkpoint_before", counted)
    return read


def test_a_checkpoint_holds_the_accounts_that_changed_and_a_slice_of_the_others(ledger_path: Path) -> None:
    build(ledger_path)
    made = checkpoints(ledger_path)
    assert len(made) > 5
    first_lsn, first = made[0]
    assert first[3] == 0 and len(first[6]) == first[4]  # the first holds every account
    # Once every account is open, each holds the few that changed, and its sweep's.
    later = [record for _, record in made if record[4] == ACCOUNTS + 1][1:]
    assert len(later) > 5
    assert all(record[3] != 0 and len(record[6]) <= 2 * BUSY + 2 for record in later)
    # Each builds on the one before it (or, while it would hold most of them, holds every account).
    assert all(record[3] in (0, before) for (before, _), (_, record) in zip(made, made[1:], strict=False))
    # The sweeps walk the accounts in creation order, so every account has a row in the last few.
    sweeps = [record[5] for _, record in made[1:]]
    assert len(set(sweeps)) > 1


def test_opening_takes_each_accounts_row_from_the_newest_checkpoint_holding_it(ledger_path: Path) -> None:
    balances, state_hash = build(ledger_path)
    with Ledger.open(ledger_path) as reopened:
        assert {account.id: reopened.balance(account.id) for account in reopened.accounts()} == balances
        assert [account.id for account in reopened.accounts()] == ["bank", *(f"a{n}" for n in range(ACCOUNTS))]
        assert reopened.state_hash() == state_hash
        reopened.transfer("after", source="bank", destination="a59", amount=5)
        assert reopened.balance("a59").posted == balances["a59"].posted + 5  # type: ignore[attr-defined]
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_opening_reads_the_chain_back_only_as_far_as_the_sweeps_reach(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk back stops once the sweeps have passed over every account, well before the
    first checkpoint, and still finds each account's newest row."""
    balances, state_hash = build(ledger_path, transfers=400)
    made = checkpoints(ledger_path)
    read = _walked_back(monkeypatch)
    with Ledger.open(ledger_path) as reopened:
        assert {account.id: reopened.balance(account.id) for account in reopened.accounts()} == balances
        assert reopened.state_hash() == state_hash
    assert 0 < len(read) < len(made) - 2


@pytest.mark.parametrize("sweeps_say", ["all", "nothing"])
def test_when_the_sweeps_misguide_the_walk_it_still_finds_every_row(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, sweeps_say: str
) -> None:
    """The sweeps only tell the walk where to stop reading ahead: told every account was swept
    after one checkpoint, it goes on back for the accounts still missing a row; told none
    ever was, it reads back to a checkpoint of every account. Either way, the same books."""
    balances, state_hash = build(ledger_path, transfers=400)
    made = dict(checkpoints(ledger_path))
    read = _walked_back(monkeypatch)
    told: list[int] = []

    def misguiding(record: list[object], older: list[object]) -> object:
        told.append(1)  # the walk asks here (`_walk_back` looks it up in `coordinator._checkpoints`)
        return record[4] if sweeps_say == "all" else 0

    monkeypatch.setattr(_checkpoints, "_sweep_length", misguiding)
    with Ledger.open(ledger_path) as reopened:
        assert {account.id: reopened.balance(account.id) for account in reopened.accounts()} == balances
        assert [account.id for account in reopened.accounts()] == ["bank", *(f"a{n}" for n in range(ACCOUNTS))]
        assert reopened.state_hash() == state_hash
    assert told and read
    if sweeps_say == "nothing":  # told no sweep passed anywhere, it read back to a checkpoint of every account
        oldest = made[read[-1]][3]  # (`read` holds the LSN each older checkpoint was asked for from)
        assert made[oldest][3] == 0  # type: ignore[index]


def test_a_checkpoint_after_reopening_makes_the_rows_of_the_accounts_it_holds_only(ledger_path: Path) -> None:
    """Reopened, the first checkpoint must not build a row start for every account under
    the lock (most of a second at a million), only for those it holds."""
    build(ledger_path)
    with Ledger.open(ledger_path, checkpoint_interval=10) as reopened:
        sequencer = reopened._sequencer
        opened_at = sequencer.last_lsn
        for k in range(12):
            reopened.transfer(f"after-{k}", source="bank", destination=f"a{k % BUSY}", amount=1)
        assert sequencer.rows.last is not None and sequencer.rows.last[0] > opened_at  # one was written
        assert 0 < len(sequencer.rows.fixed) < ACCOUNTS // 2
        balances = {account.id: reopened.balance(account.id) for account in reopened.accounts()}
        state_hash = reopened.state_hash()
    with Ledger.open(ledger_path) as again:
        assert {account.id: again.balance(account.id) for account in again.accounts()} == balances
        assert again.state_hash() == state_hash
    assert verify(str(ledger_path))["verdict"] == "whole"


@pytest.mark.skipif(not _recovery._UNWALKED_MOVES or gc.get_freeze_count() != 0,
                    reason="moves objects on CPython 3.11 and 3.13 with the GIL, and with nothing frozen")
def test_a_large_open_leaves_what_it_loaded_in_the_collectors_oldest_generation(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left young, the accounts a large open loads are walked by the collections right after
    it (0.4 s inside `Ledger.open` at a million); a host's own frozen objects stay frozen."""
    balances, _ = build(ledger_path)
    monkeypatch.setattr(_recovery, "AGED_AFTER_OPEN_MIN", 1)  # this ledger's load counts as large
    gc.collect()  # no collection of the middle generation during the open could promote them instead
    with Ledger.open(ledger_path) as reopened:
        account = reopened._sequencer.accounts["a7"]
        assert gc.get_freeze_count() == 0
        assert any(found is account for found in gc.get_objects(generation=2))
    kept = [object() for _ in range(3)]  # the host's, frozen (a list: tracked by the collector)
    gc.freeze()
    try:
        with Ledger.open(ledger_path) as reopened:
            assert reopened.balance("a7").posted == balances["a7"].posted  # type: ignore[attr-defined]
            assert not any(found is kept for found in gc.get_objects())  # still in the permanent generation
    finally:
        gc.unfreeze()
    assert any(found is kept for found in gc.get_objects())


class _Cycle:
    """Garbage only the cyclic collector frees."""

    def __init__(self) -> None:
        self.itself = self


def test_a_small_open_leaves_the_hosts_young_garbage_to_the_next_young_collection(ledger_path: Path) -> None:
    """Opened often, a small ledger must not send the host's young garbage to the oldest
    generation, where only a full collection would free it (and its count start again)."""
    build(ledger_path, transfers=20)
    assert gc.isenabled()
    gc.collect()  # no collection comes while the cycle is alive (it would promote it)
    cycle = _Cycle()
    freed = weakref.ref(cycle)
    del cycle
    for _ in range(3):
        with Ledger.open(ledger_path) as reopened:
            assert reopened.balance("a1") is not None
    gc.collect(1)  # the young generations only
    assert freed() is None


def test_accounts_keep_their_code_and_metadata_through_the_chain(ledger_path: Path) -> None:
    """Rows made on demand (`CheckpointRows._fixed_row`) and loaded back from several checkpoints
    keep every field of the account, metadata a read-only mapping again."""
    from engine import Account

    with Ledger.open(ledger_path, checkpoint_interval=5) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for n in range(20):
            ledger.create_account(f"m{n}", currency="USD", code=n, metadata={"n": n, "tier": "gold"} if n % 3 else None)
        for k in range(60):
            ledger.transfer(f"t{k}", source="bank", destination=f"m{k % 20}", amount=k + 1)
        made = list(ledger.accounts())
    assert len(checkpoints(ledger_path)) > 3
    with Ledger.open(ledger_path) as reopened:
        again = list(reopened.accounts())
        assert again == made
        assert all(isinstance(account, Account) for account in again)
        assert again[2].metadata == {"n": 1, "tier": "gold"} and again[1].metadata is None
        with pytest.raises(TypeError):
            again[2].metadata["n"] = 2  # type: ignore[index]


def _rewritten_newest_checkpoint(raw_lmdb, path: Path, change, back: int = 0) -> int:  # type: ignore[no-untyped-def]
    """Rewrite the payload of the newest checkpoint (or the one `back` before it) by
    `change(record)` (under a valid CRC, as anyone with the file could); its LSN."""
    import msgpack

    from tests.test_chain import reframe, rewrite, split, stored

    lsn, record = checkpoints(path)[-1 - back]
    digest, _ = split(stored(raw_lmdb, path)[lsn])
    rewrite(raw_lmdb, path, {lsn: reframe(lsn, digest, msgpack.packb(change(list(record)), use_bin_type=True))})
    return lsn


@pytest.mark.parametrize("field, value", [(4, "31"), (5, None), (6, None), (6, [["a1", 1]]), (3, -1)])
def test_a_checkpoint_of_the_wrong_shape_is_damage_at_its_lsn(
    ledger_path: Path, raw_lmdb, field: int, value: object  # type: ignore[no-untyped-def]
) -> None:
    """An account count, a sweep position, rows or a previous LSN that no checkpoint could
    hold is `JournalCorrupted` naming the checkpoint, not a `TypeError` at open or later."""
    from engine import JournalCorrupted

    build(ledger_path)

    def damage(record: list[object]) -> list[object]:
        record[field] = value
        return record

    lsn = _rewritten_newest_checkpoint(raw_lmdb, ledger_path, damage)
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn == lsn and "checkpoint" in str(caught.value)


def test_a_checkpoint_that_drops_an_account_and_says_so_is_damage_at_its_lsn(
    ledger_path: Path, raw_lmdb  # type: ignore[no-untyped-def]
) -> None:
    """A checkpoint whose rows and count agree without one account (every field in shape)
    would open as a ledger without it: the accounts index, which holds every account
    opened, disagrees, and opening says so."""
    from engine import JournalCorrupted

    with Ledger.open(ledger_path, checkpoint_interval=5) as ledger:  # full checkpoints: no chain to walk
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for n in range(4):
            ledger.create_account(f"a{n}", currency="USD")
        for k in range(12):
            ledger.transfer(f"t{k}", source="bank", destination=f"a{k % 3}", amount=1)  # a3 never moves

    def drop_one(record: list[object]) -> list[object]:
        rows = [row for row in record[6] if row[0] != "a3"]  # type: ignore[attr-defined, index]
        assert len(rows) == record[4] - 1 and record[3] == 0  # type: ignore[operator]
        record[6], record[4], record[5] = rows, len(rows), 0
        return record

    lsn = _rewritten_newest_checkpoint(raw_lmdb, ledger_path, drop_one)
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn == lsn and "accounts index holds 5 accounts" in str(caught.value)


@pytest.mark.parametrize("field, value", [(5, "x"), (4, 5), (0, 12345)])
def test_a_row_that_does_not_load_is_damage_at_the_checkpoint_holding_it(
    ledger_path: Path, raw_lmdb, field: int, value: object  # type: ignore[no-untyped-def]
) -> None:
    """A row of the right length whose opening LSN, metadata or id no checkpoint holds, in a
    checkpoint before the newest, is reported there, not at the newest."""
    from engine import JournalCorrupted

    build(ledger_path)
    made = checkpoints(ledger_path)
    seen = {row[0] for row in made[-1][1][6]}  # type: ignore[attr-defined, index]
    chosen = None
    for back_by, (at, record) in enumerate(made[-2::-1], 1):  # the first before the newest with a row it takes
        unseen = [row[0] for row in record[6] if row[0] not in seen]  # type: ignore[attr-defined, index]
        if unseen:
            chosen = (back_by, at, record, unseen[0])
            break
    assert chosen is not None
    back, older_lsn, older, taken = chosen
    assert older[3] != 0 and made[-back][1][3] == older_lsn  # in the chain the newest builds on

    def damage(record: list[object]) -> list[object]:
        for row in record[6]:  # type: ignore[attr-defined]
            if row[0] == taken:
                row[field] = value
        return record

    assert _rewritten_newest_checkpoint(raw_lmdb, ledger_path, damage, back=back) == older_lsn
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn == older_lsn, caught.value


def test_a_lost_accounts_index_entry_is_damage_in_the_indexes_not_the_checkpoint(
    ledger_path: Path, raw_lmdb  # type: ignore[no-untyped-def]
) -> None:
    from coordinator._records import id_key
    from engine import JournalCorrupted
    from tests.test_entries import delete_key

    build(ledger_path)
    delete_key(raw_lmdb, ledger_path, "accounts", id_key("a3"))
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.where == "the indexes" and caught.value.lsn is None


def test_with_a_large_sweep_every_checkpoint_holds_every_account(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_checkpoint_rows, "CHECKPOINT_SWEEP_MIN", 1_000)
    build(ledger_path)
    assert all(record[3] == 0 and len(record[6]) == record[4] for _, record in checkpoints(ledger_path))


def test_a_checkpoint_missing_an_account_that_changed_is_damage_at_its_lsn(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that left a changed account out would have opening load its old row: the full
    replay of the audit pairs every checkpoint with the records before it, and says where."""
    real, real_journaled = _checkpoint_rows.CheckpointRows._included, _checkpoint_rows.CheckpointRows.journaled
    dropped: list[int | None] = []

    def missing_one(self: _checkpoint_rows.CheckpointRows, total: int, changed: Iterable[str]) -> tuple[object, int, int]:
        changed = list(changed)
        included, previous, sweep_next = real(self, total, changed)
        if previous and not dropped and changed:
            kept = dict.fromkeys(included)
            del kept[changed[0]]
            dropped.append(None)  # the LSN it is journaled at, below
            return kept, previous, sweep_next
        return included, previous, sweep_next

    def journaled(self: _checkpoint_rows.CheckpointRows, lsn: int, *counts: int) -> None:
        if dropped and dropped[-1] is None:
            dropped[-1] = lsn
        real_journaled(self, lsn, *counts)

    monkeypatch.setattr(_checkpoint_rows.CheckpointRows, "_included", missing_one)
    monkeypatch.setattr(_checkpoint_rows.CheckpointRows, "journaled", journaled)
    build(ledger_path)
    report = verify(str(ledger_path))
    assert report["verdict"] == "NOT WHOLE"
    assert dropped and f"LSN {dropped[0]}" in str(report["problem"]) and "checkpoint" in str(report["problem"])


def test_a_checkpoint_the_journal_had_no_room_for_changes_nothing_and_comes_again(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint that cannot be queued in time (the writer not keeping up) must leave the
    books as they were, its index entry uncounted, or every later checkpoint would count one
    entry the indexes never got, and the next open would call the ledger damaged."""
    from coordinator._records import CHECKPOINTS_INDEX
    from journal import Journal as JournalClass
    from journal import JournalTimeoutError

    real = JournalClass.append_block
    refused: list[int] = []

    def no_room_once(self: JournalClass, payloads: object, index: dict[str, object], *args: object,
                     **kwargs: object) -> int:
        if CHECKPOINTS_INDEX in index and not refused:
            refused.append(1)
            raise JournalTimeoutError("the journal writer is not keeping up")
        return real(self, payloads, index, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(JournalClass, "append_block", no_room_once)
    balances, state_hash = build(ledger_path)
    assert refused
    with Ledger.open(ledger_path) as reopened:
        assert reopened.state_hash() == state_hash
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_closing_after_a_long_chain_writes_a_checkpoint_of_every_account_that_opening_reads_alone(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, closing_checkpoints: None
) -> None:
    """Each checkpoint holds a few accounts, so an open would read back many; the close
    writes one of every account, last, and the next open reads it alone, to the same books.
    A close with no checkpoint since writes none."""
    balances, state_hash = build(ledger_path, transfers=400)
    made = checkpoints(ledger_path)
    newest_lsn, newest = made[-1]
    assert made[-2][1][3] != 0  # the chain a crash would have left
    assert newest[3] == 0 and newest[5] == 0 and [row[0] for row in newest[6]] == [  # type: ignore[attr-defined, index]
        "bank", *(f"a{n}" for n in range(ACCOUNTS))]
    read = _walked_back(monkeypatch)
    taken: list[bool] = []
    in_order = _checkpoints._in_creation_order

    def as_is(rows: list[object], total: int) -> object:
        found = in_order(rows, total)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(_checkpoints, "_in_creation_order", as_is)
    with Ledger.open(ledger_path) as reopened:
        assert taken == [True]  # as it is: nothing merged, nothing sorted
        assert reopened._journal.last_lsn == newest_lsn  # the close's checkpoint is the last record
        assert reopened.recovered.chain_read == ((ACCOUNTS + 1, ACCOUNTS + 1),)
        assert [account.id for account in reopened.accounts()] == ["bank", *(f"a{n}" for n in range(ACCOUNTS))]
        assert {account.id: reopened.balance(account.id) for account in reopened.accounts()} == balances
        assert reopened.state_hash() == state_hash
    assert read == []
    assert checkpoints(ledger_path)[-1][0] == newest_lsn  # nothing to shorten: none written
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_the_chain_goes_on_from_a_closing_checkpoint(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, closing_checkpoints: None
) -> None:
    """Reopened from a checkpoint of every account, the next checkpoints build on it, hold what
    changed, and the close after them writes a whole one again only once the chain is long."""
    build(ledger_path, transfers=400)
    whole_lsn = checkpoints(ledger_path)[-1][0]
    with Ledger.open(ledger_path, checkpoint_interval=10) as reopened:
        for k in range(40):
            reopened.transfer(f"after-{k}", source="bank", destination=f"a{k % BUSY}", amount=1)
        state_hash = reopened.state_hash()
    after = [record for lsn, record in checkpoints(ledger_path) if lsn > whole_lsn]
    assert after[0][3] == whole_lsn and len(after[0][6]) < ACCOUNTS // 2  # type: ignore[arg-type]
    grown = [len(rows) for previous, _, _, rows, _ in (record[3:8] for record in after) if previous]  # type: ignore[arg-type]
    assert ACCOUNTS + 1 + sum(grown) > CLOSE_CHECKPOINT_ROWS * (ACCOUNTS + 1)  # the chain an open would read
    assert after[-1][3] == 0 and len(after[-1][6]) == ACCOUNTS + 1  # type: ignore[arg-type]
    with Ledger.open(ledger_path) as again:
        assert again.state_hash() == state_hash
    assert verify(str(ledger_path))["verdict"] == "whole"


@pytest.mark.parametrize("damage", ["reversed", "an id twice", "a row short", "a row that is no row"])
def test_a_closing_checkpoint_out_of_shape_is_merged_or_reported_as_any_other(
    ledger_path: Path, raw_lmdb, closing_checkpoints: None, damage: str  # type: ignore[no-untyped-def]
) -> None:
    """Opening takes a checkpoint of every account as it is only if its rows are its accounts,
    each once, in creation order; else it walks it as any other: the same books from rows
    in another order, `JournalCorrupted` at its LSN from rows no checkpoint holds."""
    from engine import JournalCorrupted

    build(ledger_path, transfers=400)
    with Ledger.open(ledger_path) as reopened:  # records after it (a rewritten last record breaks the hash chain)
        for k in range(3):
            reopened.transfer(f"after-{k}", source="bank", destination="a1", amount=1)
        state_hash = reopened.state_hash()

    def change(record: list[object]) -> list[object]:
        rows = record[6]
        assert record[3] == 0 and isinstance(rows, list)
        if damage == "reversed":
            rows.reverse()
        elif damage == "an id twice":
            rows[1] = list(rows[2])
        elif damage == "a row short":
            rows[3] = rows[3][:7]
        else:
            rows[3] = "a3"
        return record

    lsn = _rewritten_newest_checkpoint(raw_lmdb, ledger_path, change)
    if damage == "reversed":
        with Ledger.open(ledger_path) as reopened:
            assert [account.id for account in reopened.accounts()] == ["bank", *(f"a{n}" for n in range(ACCOUNTS))]
            assert reopened.state_hash() == state_hash
        return
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn == lsn and "checkpoint" in str(caught.value)


def test_closing_writes_no_checkpoint_of_every_account_when_the_open_would_read_few_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closing_checkpoints: None
) -> None:
    """What counts is what the next open would read: the newest checkpoints back to where
    their sweeps have passed over every account, not every checkpoint since the last open."""
    monkeypatch.setattr(_checkpoint_rows, "CHECKPOINT_SWEEP_MIN", 1_000)
    monkeypatch.setattr(_sequencer, "CLOSE_CHECKPOINT_ROWS", math.inf)
    accounts = 5_000
    with Ledger.open(tmp_path / "l", checkpoint_interval=10) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_accounts([Account(f"a{n}", "USD", 0) for n in range(accounts - 1)])
        for k in range(200):  # twenty checkpoints of a few accounts and a sweep of 1,000 each
            ledger.transfer(f"s{k}", source="bank", destination=f"a{k % 3}", amount=1)
    monkeypatch.setattr(_sequencer, "CLOSE_CHECKPOINT_ROWS", CLOSE_CHECKPOINT_ROWS)
    with Ledger.open(tmp_path / "l", checkpoint_interval=10) as ledger:
        read = sum(rows for rows, _ in ledger.recovered.chain_read)
        assert accounts < read <= CLOSE_CHECKPOINT_ROWS * accounts
        for k in range(10):  # one more checkpoint
            ledger.transfer(f"t{k}", source="bank", destination=f"a{k % 3}", amount=1)
    newest = checkpoints(tmp_path / "l")[-1][1]
    assert newest[3] != 0 and len(newest[6]) < accounts  # type: ignore[arg-type]
    with Ledger.open(tmp_path / "l") as ledger:
        assert sum(rows for rows, _ in ledger.recovered.chain_read) <= CLOSE_CHECKPOINT_ROWS * accounts


@pytest.mark.parametrize("raised", [KeyboardInterrupt, MemoryError])
def test_a_close_whose_checkpoint_fails_still_closes_the_journal(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, closing_checkpoints: None, raised: type[BaseException]
) -> None:
    """The checkpoint a close writes is for speed only: one that fails (no memory for its
    rows) is logged and the close goes on; an interrupt in it goes up, after the journal
    has closed and let go of the directory. Either way nothing is lost."""
    build(ledger_path, transfers=400)
    ledger = Ledger.open(ledger_path, checkpoint_interval=10)
    for k in range(40):
        ledger.transfer(f"after-{k}", source="bank", destination=f"a{k % BUSY}", amount=1)
    state_hash = ledger.state_hash()

    def failing(self: _checkpoint_rows.CheckpointRows) -> list[object]:
        raise raised

    real = _checkpoint_rows.CheckpointRows._every_row
    monkeypatch.setattr(_checkpoint_rows.CheckpointRows, "_every_row", failing)
    if raised is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            ledger.close()
    else:
        ledger.close()
    assert ledger.closed and not ledger._journal._open
    monkeypatch.setattr(_checkpoint_rows.CheckpointRows, "_every_row", real)
    with Ledger.open(ledger_path) as reopened:  # the directory is free; the books as they were
        assert reopened.state_hash() == state_hash
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_a_stamp_no_record_carries_never_reaches_a_checkpoint(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, closing_checkpoints: None
) -> None:
    """A decision stamped and not queued (the writer not keeping up), or a time a read answered
    for, moves the next stamp on, but a checkpoint holds the last stamp a record carries: the
    audit pairs each checkpoint with the records before it."""
    from journal import JournalTimeoutError
    from support import Clock

    monkeypatch.setattr(_sequencer, "CLOSE_CHECKPOINT_ROWS", 0)  # the close writes one, whatever the chain
    clock = Clock()
    with Ledger.open(ledger_path, checkpoint_interval=10, clock_ns=clock) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for n in range(BUSY):
            ledger.create_account(f"a{n}", currency="USD")
        ledger.transfer("p", source="bank", destination="a0", amount=5, pending=True, timeout_s=1)
        for k in range(30):
            ledger.transfer(f"t{k}", source="bank", destination=f"a{k % BUSY}", amount=1)
        clock.advance(5)
        ledger.balance("a0", at_timestamp=clock())  # a read's time, past every stamp
        journal, real = ledger._journal, ledger._journal.append_block

        def timing_out(*args: object, **kwargs: object) -> int:
            journal.append_block = real  # type: ignore[method-assign]
            raise JournalTimeoutError("the journal writer is not keeping up")

        journal.append_block = timing_out  # type: ignore[method-assign]
        with pytest.raises(LedgerError):
            ledger.expire_pending()  # stamped, not queued
    journal = Journal.open_readonly(str(ledger_path), index_names=INDEX_NAMES)
    last_lsn = journal.last_lsn
    journal.close()
    assert checkpoints(ledger_path)[-1][0] == last_lsn  # the close's
    report = verify(str(ledger_path))
    assert report["verdict"] == "whole", report["problem"]


@pytest.mark.parametrize("where", ["transfer", "create_account"])
def test_a_record_queued_as_an_interrupt_lands_counts_for_the_closing_checkpoints_timestamp(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, closing_checkpoints: None, where: str
) -> None:
    """An interrupt right after a record was queued (its call raises, the record stands): the
    checkpoint the close writes holds that record's stamp, not the one before it."""
    from support import interrupt_after

    ledger = Ledger.open(ledger_path, checkpoint_interval=1)
    try:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for n in range(20):
            ledger.create_account(f"a{n}", currency="USD")
        for n in range(20):
            ledger.transfer(f"t{n}", source="bank", destination=f"a{n}", amount=1)
        with pytest.MonkeyPatch.context() as patch:
            if where == "transfer":
                interrupt_after(patch, ledger._journal, "append_block")
                with pytest.raises(KeyboardInterrupt):
                    ledger.transfer("x", source="bank", destination="a0", amount=1)
            else:
                interrupt_after(patch, ledger._journal, "append")
                with pytest.raises(KeyboardInterrupt):
                    ledger.create_account("late", currency="USD")
    finally:
        ledger.close()
    assert checkpoints(ledger_path)[-1][1][3] == 0  # the close's, of every account
    report = verify(str(ledger_path))
    assert report["verdict"] == "whole", report["problem"]


def test_a_checkpoint_holds_its_open_pending_transfers_as_the_lists_a_replay_compares(ledger_path: Path) -> None:
    """The sequencer hands the packer the open pending transfers themselves (NamedTuples), not a
    list made of each (made by the hundred thousand, those cost the collector ~1 us apiece, under
    the sequencer's lock): the bytes are the same, and the checkpoint reads back as the lists
    replay compares with its books."""
    from coordinator._records import CHECKPOINT5, encode
    from coordinator._state import Pending

    pending = Pending("p", "a", "b", 5, 123, 7, 9)
    assert encode([CHECKPOINT5, [pending]]) == encode([CHECKPOINT5, [list(pending)]])
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("a", currency="USD", overdraft_limit=None)
        ledger.create_account("b", currency="USD")
        made = ledger.transfer("p", source="a", destination="b", amount=5, pending=True, timeout_s=60)
        with ledger._sequencer.lock:
            lsn = ledger._sequencer.checkpoint()
        ledger._journal.wait_durable(lsn, 10)
        record = decode(lsn, ledger._journal.read(lsn))
        assert record[0] == CHECKPOINT5
        assert record[7] == [["p", "a", "b", 5, made.timestamp + 60 * 10**9, made.lsn, 0]]
        assert record[8:] == [0, [], 1, 0]  # every open one (it builds on none): none named closed, one open
    with Ledger.open(ledger_path) as reopened:
        assert reopened.get_transfer("p").status == "pending"  # type: ignore[union-attr]
        assert reopened.balance("a").pending == 5
    assert verify(str(ledger_path))["verdict"] == "whole"
