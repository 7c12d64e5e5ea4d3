"""Checkpoints that hold only the open pending transfers that changed (CHECKPOINT5): what they
hold and name, how opening walks the chain back for the rest, and damage to either."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator import _checkpoint_chain, _checkpoint_rows, _checkpoints, _sequencer
from coordinator._checkpoint_chain import PENDING_LSN
from coordinator._checkpoints import Recovered
from coordinator._history import Checkpointed, typed
from coordinator._records import CHECKPOINT4, CHECKPOINT5, INDEX_NAMES, decode
from coordinator._recovery import replay
from engine import JournalCorrupted, Ledger
from engine._tools_audit import verify
from journal import Journal

ACCOUNTS = 40
"""Pending transfers go to all of them; entries (posts, transfers) touch a few each time, so
most checkpoints hold only some accounts, and their sweep of the pending transfers is short."""
SWEEP = 4


@pytest.fixture(autouse=True)
def small_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweeps of a few pending transfers (so a chain builds up from a few dozen; the suite's
    are shorter still, `tests/conftest.py`), and no checkpoint of everything at close (the
    chain as a ledger that stopped leaves it)."""
    monkeypatch.setattr(_checkpoint_rows, "CHECKPOINT_PENDING_SWEEP_MIN", SWEEP)
    monkeypatch.setattr(_sequencer, "CLOSE_CHECKPOINT_ROWS", math.inf)
    monkeypatch.setattr(_sequencer, "CLOSE_CHECKPOINT_PENDING", math.inf)


def build(path: Path, rounds: int = 12, interval: int = 7, seed: int = 5,
          note: Callable[[Ledger], None] | None = None) -> tuple[str, set[str]]:
    """A ledger with pending transfers opened, posted, voided and expired across many
    checkpoints (every `interval` records); its state hash and the ids left open."""
    rng = random.Random(seed)
    with Ledger.open(path, checkpoint_interval=interval) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for n in range(ACCOUNTS):
            ledger.create_account(f"a{n}", currency="USD")
        open_ids: list[str] = []
        made = 0
        for r in range(rounds):
            for _ in range(6):
                pending_id = f"p{made}"
                made += 1
                ledger.transfer(pending_id, source="bank", destination=f"a{rng.randrange(ACCOUNTS)}",
                                amount=rng.randint(1, 50), pending=True, timeout_s=3600)
                open_ids.append(pending_id)
            for k in range(2):  # close a few, old and new
                closing = open_ids.pop(rng.randrange(len(open_ids)))
                if k:
                    ledger.void_pending(f"v-{closing}", pending_id=closing)
                else:
                    ledger.post_pending(f"post-{closing}", pending_id=closing, amount=1)
            ledger.transfer(f"t{r}", source="bank", destination="a0", amount=3)
            if note is not None:
                note(ledger)
        for k in range(3):  # the newest checkpoint is not the last record (whose rewrite the chain's check finds first)
            ledger.transfer(f"last{k}", source="bank", destination="a1", amount=1)
        return ledger.state_hash(), set(open_ids)


def checkpoints(path: Path) -> list[tuple[int, list[object]]]:
    journal = Journal.open_readonly(str(path), index_names=INDEX_NAMES)
    try:
        return [(lsn, decode(lsn, payload)) for lsn, payload in journal.scan(0)
                if isinstance(typed(lsn, decode(lsn, payload)), Checkpointed)]
    finally:
        journal.close()


def checkpoints_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The LSNs of the checkpoints before the newest that the opens from now on read (for the
    accounts or the pending transfers)."""
    read: list[int] = []
    real = _checkpoint_chain.checkpoint_before

    def counted(journal: Journal, lsn: int, at: int, previous: int, txn: object = None) -> list[object]:
        read.append(previous)
        return real(journal, lsn, at, previous, txn)

    monkeypatch.setattr(_checkpoint_chain, "checkpoint_before", counted)
    monkeypatch.setattr(_checkpoints, "checkpoint_before", counted)
    return read


def last_lsn(path: Path) -> int:
    journal = Journal.open_readonly(str(path), index_names=INDEX_NAMES)
    try:
        return journal.last_lsn
    finally:
        journal.close()


def full_replay(path: Path) -> Recovered:
    journal = Journal.open_readonly(str(path), index_names=INDEX_NAMES)
    try:
        return replay(journal, Recovered())
    finally:
        journal.close()


def test_a_checkpoint_holds_the_pending_transfers_opened_since_and_names_those_closed(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, open_ids = build(ledger_path)
    made = checkpoints(ledger_path)
    partial = [(lsn, record) for lsn, record in made if record[0] == CHECKPOINT5 and record[8]]
    assert len(partial) >= 5, [record[8] for _, record in made]
    named_closed: set[str] = set()
    for (before_lsn, _), (_, record) in zip(made[:-1], made[1:], strict=True):
        if not record[8]:
            assert len(record[7]) == record[10] and record[9] == []
            continue
        assert record[8] == before_lsn
        held = {row[0] for row in record[7]}  # type: ignore[index, union-attr]
        assert len(held) == len(record[7]) < record[10]  # some, each once: not every open one
        named = set(record[9])  # type: ignore[arg-type]
        assert not held & named and not named & open_ids and not named & named_closed
        named_closed |= named
    # A pending transfer closed after the first checkpoint is named closed by exactly one.
    assert len(named_closed) >= 10
    # The sweeps go round: an open reads back only part of the chain.
    read = checkpoints_read(monkeypatch)
    with Ledger.open(ledger_path) as ledger:
        assert set(ledger._sequencer.pending) == open_ids
    assert 0 < len(read) < len(made) - 1


def test_opening_rebuilds_every_open_pending_transfer_from_the_chain(ledger_path: Path) -> None:
    """The open reads the chain back (the newest checkpoint holds only some), and what it
    rebuilds equals a replay of every record from the first: the same open pending transfers,
    in the order they opened, the same holds, the same state hash."""
    digest, open_ids = build(ledger_path)
    assert checkpoints(ledger_path)[-1][1][8]  # the newest holds only some
    replayed = full_replay(ledger_path)
    with Ledger.open(ledger_path) as ledger:
        sequencer = ledger._sequencer
        assert set(sequencer.pending) == open_ids
        assert sequencer.pending == replayed.pending
        assert list(sequencer.pending) == list(replayed.pending)
        assert sequencer.held == replayed.held and sequencer.incoming == replayed.incoming
        assert ledger.state_hash() == digest
        for pending_id in sorted(open_ids)[:3]:  # still open: they post
            ledger.post_pending(f"later-{pending_id}", pending_id=pending_id)
        closed = ledger.transfer("after", source="bank", destination="a1", amount=1)
        assert closed.status == "posted"
    assert verify(str(ledger_path))["verdict"] == "whole"
    with Ledger.open(ledger_path) as again:
        assert set(again._sequencer.pending) == open_ids - set(sorted(open_ids)[:3])


def test_a_pending_transfer_expired_between_checkpoints_is_named_closed(ledger_path: Path) -> None:
    clock = [10**18]
    with Ledger.open(ledger_path, checkpoint_interval=4, clock_ns=lambda: clock[0]) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        for n in range(ACCOUNTS):  # never moving: the checkpoints' accounts are a chain too
            ledger.create_account(f"still{n}", currency="USD")
        for n in range(3 * SWEEP):
            ledger.transfer(f"keep{n}", source="bank", destination="a", amount=1, pending=True, timeout_s=3600)
        ledger.transfer("soon", source="bank", destination="a", amount=7, pending=True, timeout_s=1)
        for n in range(6):
            ledger.transfer(f"t{n}", source="bank", destination="a", amount=1)
        clock[0] += 2 * 10**9
        assert ledger.expire_pending() == 1
        for n in range(12):
            ledger.transfer(f"u{n}", source="bank", destination="a", amount=1)
        assert ledger.get_transfer("soon").status == "expired"  # type: ignore[union-attr]
    named = [record for _, record in checkpoints(ledger_path) if record[0] == CHECKPOINT5 and "soon" in record[9]]
    assert named, "no checkpoint names the expired one closed"
    with Ledger.open(ledger_path, clock_ns=lambda: clock[0]) as reopened:
        assert "soon" not in reopened._sequencer.pending
        assert len(reopened._sequencer.pending) == 3 * SWEEP
        assert reopened.balance("a").incoming == 3 * SWEEP
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_a_read_of_the_holds_at_an_lsn_takes_the_pending_transfers_from_the_chain(ledger_path: Path) -> None:
    """A point-in-time balance starts from the checkpoint before the LSN and its open pending
    transfers (all of them, from the chain), then the records after it: it reads what the
    ledger answered then."""
    seen: list[tuple[int, dict[str, tuple[int, int, int]]]] = []

    def note(ledger: Ledger) -> None:
        seen.append((ledger.head().lsn, {f"a{n}": _funds(ledger.balance(f"a{n}")) for n in range(ACCOUNTS)}))

    build(ledger_path, note=note)
    assert len(seen) >= 10
    with Ledger.open(ledger_path) as ledger:
        for lsn, balances in seen:
            assert {account: _funds(ledger.balance(account, at_lsn=lsn)) for account in balances} == balances, lsn


def _funds(balance: object) -> tuple[int, int, int]:
    return balance.posted, balance.pending, balance.incoming  # type: ignore[attr-defined]


def _rewrite(raw_lmdb, path: Path, lsn: int, change) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the payload of the checkpoint at `lsn` by `change(record)`, under a valid CRC."""
    import msgpack

    from tests.test_chain import reframe, rewrite, split, stored

    record = dict(checkpoints(path))[lsn]
    digest, _ = split(stored(raw_lmdb, path)[lsn])
    rewrite(raw_lmdb, path, {lsn: reframe(lsn, digest, msgpack.packb(change(list(record)), use_bin_type=True))})


@pytest.mark.parametrize("damage", ["count", "closed-not-ids", "row-not-a-row", "previous-ahead", "next-position"])
def test_a_checkpoint_whose_pending_transfers_do_not_add_up_is_damage_at_its_lsn(
    ledger_path: Path, raw_lmdb, damage: str  # type: ignore[no-untyped-def]
) -> None:
    build(ledger_path)
    lsn, record = checkpoints(ledger_path)[-1]
    assert record[8] and lsn < last_lsn(ledger_path)

    def change(record: list[object]) -> list[object]:
        if damage == "count":
            record[10] = record[10] + 1  # type: ignore[operator]
        elif damage == "closed-not-ids":
            record[9] = [[1]]
        elif damage == "row-not-a-row":
            record[7] = [5] + record[7]  # type: ignore[operator]
        elif damage == "previous-ahead":
            record[8] = 10**9
        else:
            record[11] = -2
        return record

    _rewrite(raw_lmdb, ledger_path, lsn, change)
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn == lsn and "checkpoint" in str(caught.value)


def test_a_checkpoint_that_names_an_open_pending_transfer_closed_is_damage(
    ledger_path: Path, raw_lmdb  # type: ignore[no-untyped-def]
) -> None:
    """One named closed that is still open has no row anywhere the walk may take it from: the
    chain holds fewer than the newest says are open, and opening says so at the newest."""
    _, open_ids = build(ledger_path)
    made = checkpoints(ledger_path)
    newest_lsn, newest = made[-1]
    held_newest = {row[0] for row in newest[7]}  # type: ignore[index, union-attr]
    victim = next(pending_id for pending_id in sorted(open_ids) if pending_id not in held_newest)

    def named_closed(record: list[object]) -> list[object]:
        record[9] = list(record[9]) + [victim]  # type: ignore[call-overload]
        return record

    _rewrite(raw_lmdb, ledger_path, newest_lsn, named_closed)
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn == newest_lsn and "open pending transfers" in str(caught.value)
    assert verify(str(ledger_path))["verdict"] != "whole"


def test_the_walk_stops_at_a_checkpoint4_which_holds_every_open_pending_transfer(
    ledger_path: Path, raw_lmdb  # type: ignore[no-untyped-def]
) -> None:
    """A ledger written before CHECKPOINT5 ends its chain in CHECKPOINT4s, each holding every
    open pending transfer: the walk takes them from the first it meets."""
    digest, open_ids = build(ledger_path)
    made = checkpoints(ledger_path)
    whole = [lsn for lsn, record in made if not record[8]]
    assert len(whole) >= 1
    # The first checkpoint holds every account and every open pending transfer: as CHECKPOINT4.
    first_lsn = whole[0]
    _rewrite(raw_lmdb, ledger_path, first_lsn, lambda record: [CHECKPOINT4] + record[1:8])
    assert dict(checkpoints(ledger_path))[first_lsn][0] == CHECKPOINT4
    replayed = full_replay(ledger_path)  # its pair checks pass: the CHECKPOINT5s after it build on it
    with Ledger.open(ledger_path) as ledger:
        assert ledger._sequencer.pending == replayed.pending
        assert set(ledger._sequencer.pending) == open_ids
        assert ledger.state_hash() == digest  # (`tally verify` would find the rewrite: the hash chain)


def test_every_pending_row_the_open_took_is_in_opening_order(ledger_path: Path) -> None:
    """Whatever checkpoint of the chain a row came from, the open pending transfers are laid
    back in the order they opened (their LSNs), as the ledger that made them held them."""
    build(ledger_path, rounds=20, seed=11)
    with Ledger.open(ledger_path) as ledger:
        rows = [list(found) for found in ledger._sequencer.pending.values()]
    assert len(rows) > 3 * SWEEP
    assert rows == sorted(rows, key=PENDING_LSN)


def test_a_record_of_a_kind_newer_than_this_version_says_so(ledger_path: Path, raw_lmdb) -> None:  # type: ignore[no-untyped-def]
    """A journal a newer version wrote (a kind of record this one does not know) is refused at
    its LSN as this version's to not read, not as bytes gone bad, and nothing is written."""
    import msgpack

    from coordinator._records import KIND_NEWEST
    from tests.test_chain import split, stored

    build(ledger_path, rounds=2)
    lsn, _ = checkpoints(ledger_path)[-1]
    _rewrite(raw_lmdb, ledger_path, lsn, lambda record: [KIND_NEWEST + 1] + record[1:])
    before = stored(raw_lmdb, ledger_path)
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn == lsn and "newer version" in str(caught.value)
    assert stored(raw_lmdb, ledger_path) == before  # nothing written
    assert msgpack.unpackb(split(before[lsn])[1])[0] == KIND_NEWEST + 1


def open_at_each_checkpoint(path: Path) -> dict[int, set[str]]:
    """The ids of the pending transfers open at each checkpoint, from the records alone."""
    from coordinator._history import Committed, Expired, records

    opened: set[str] = set()
    at: dict[int, set[str]] = {}
    journal = Journal.open_readonly(str(path), index_names=INDEX_NAMES)
    try:
        for record in records(journal):
            if isinstance(record, Committed):
                for transfer in record.transfers:
                    if transfer.kind == "pending":
                        opened.add(transfer.id)
                    elif transfer.pending_id is not None:
                        opened.discard(transfer.pending_id)
            elif isinstance(record, Expired):
                opened -= set(record.pending_ids)
            elif isinstance(record, Checkpointed):
                at[record.lsn] = set(opened)
    finally:
        journal.close()
    return at


def test_the_holds_read_at_an_lsn_start_from_every_pending_transfer_open_at_the_checkpoint_before(
    ledger_path: Path,
) -> None:
    """`coordinator._holds.checkpoint_before` (where a read of the holds at an LSN, and an open
    whose hold rows are not all indexed, start) gives every pending transfer open at that
    checkpoint, from the chain, for a checkpoint that holds only some of them."""
    from coordinator._holds import checkpoint_before

    build(ledger_path)
    expected = open_at_each_checkpoint(ledger_path)
    partial = [lsn for lsn, record in checkpoints(ledger_path) if record[8]]
    assert len(partial) >= 5
    journal = Journal.open_readonly(str(ledger_path), index_names=INDEX_NAMES)
    try:
        with journal.snapshot() as txn:
            for lsn in partial:
                found, pendings = checkpoint_before(journal, lsn + 1, txn)
                assert found == lsn
                assert {row[0] for row in pendings} == expected[lsn], lsn
    finally:
        journal.close()


def test_a_ledger_of_few_accounts_keeps_its_pending_transfers_chain(ledger_path: Path) -> None:
    """With few accounts every checkpoint holds every account (`previous_lsn` 0), yet only some
    of the open pending transfers: their chain is their own (`pending_previous_lsn`)."""
    with Ledger.open(ledger_path, checkpoint_interval=5) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("shop", currency="USD")
        for n in range(60):
            ledger.transfer(f"p{n}", source="bank", destination="shop", amount=n + 1, pending=True)
            if n % 3 == 2:
                ledger.post_pending(f"post{n}", pending_id=f"p{n - 2}")
        digest = ledger.state_hash()
    made = checkpoints(ledger_path)
    assert all(record[3] == 0 for _, record in made)  # every account, each time
    assert sum(1 for _, record in made if record[8]) >= 5  # and not every pending transfer
    replayed = full_replay(ledger_path)
    with Ledger.open(ledger_path) as reopened:
        assert reopened._sequencer.pending == replayed.pending and len(replayed.pending) == 40
        assert reopened.balance("shop").incoming == sum(p.amount for p in replayed.pending.values())
        assert reopened.state_hash() == digest


def test_the_walk_back_for_pending_transfers_is_bounded_however_few_change(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many open pending transfers and checkpoints that change none of them: each still takes
    1/`CHECKPOINT_PENDING_CHAIN` of them into its sweep, so an open reads back that many or so."""
    monkeypatch.setattr(_checkpoint_rows, "CHECKPOINT_PENDING_CHAIN", 4)
    monkeypatch.setattr(_checkpoint_rows, "CHECKPOINT_PENDING_SWEEP_MIN", 1)
    with Ledger.open(ledger_path, checkpoint_interval=3) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("shop", currency="USD")
        for n in range(80):
            ledger.transfer(f"p{n}", source="bank", destination="shop", amount=1, pending=True)
        for n in range(120):  # 40 checkpoints with nothing pending changed
            ledger.transfer(f"t{n}", source="bank", destination="shop", amount=1)
    assert len(checkpoints(ledger_path)) > 40
    read = checkpoints_read(monkeypatch)
    with Ledger.open(ledger_path) as reopened:
        assert len(reopened._sequencer.pending) == 80
    assert len(read) <= 4


def test_a_bad_row_in_a_checkpoint_only_the_pending_walk_reads_is_damage_there(
    ledger_path: Path, raw_lmdb  # type: ignore[no-untyped-def]
) -> None:
    build(ledger_path)
    made = checkpoints(ledger_path)
    newest = made[-1][1]
    assert newest[8] == made[-2][0]  # the newest builds on the one before it, which the walk reads
    lsn = made[-2][0]
    _rewrite(raw_lmdb, ledger_path, lsn, lambda record: record[:7] + [[*record[7], ["x", "a", "b", 1, 0, "lsn", 0]]]
             + record[8:])
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(ledger_path)
    assert caught.value.lsn == lsn and "pending" in str(caught.value)


@pytest.mark.parametrize("rows", [[5], [["a1"]], [[["not", "an", "id"], "USD", None, 0, None, 1, 0, 0, 0]]])
def test_a_checkpoint_whose_account_rows_are_no_rows_fails_the_audit_at_its_lsn(
    ledger_path: Path, raw_lmdb, rows: list[object]  # type: ignore[no-untyped-def]
) -> None:
    """The audit's pair check of a checkpoint with rows that are no accounts' rows says it
    disagrees (damage at its LSN), never a raw `TypeError`."""
    from coordinator._recovery import replay as replay_all

    build(ledger_path)
    lsn = checkpoints(ledger_path)[-1][0]
    _rewrite(raw_lmdb, ledger_path, lsn, lambda record: record[:6] + [rows] + record[7:])
    journal = Journal.open_readonly(str(ledger_path), index_names=INDEX_NAMES)
    try:
        with pytest.raises(JournalCorrupted) as caught:
            replay_all(journal, Recovered())
    finally:
        journal.close()
    assert caught.value.lsn == lsn
    report = verify(str(ledger_path))
    assert report["verdict"] != "whole"


def test_closing_writes_a_checkpoint_of_every_open_pending_transfer_that_the_next_open_reads_alone(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the newest checkpoint holds only some of many open pending transfers, closing
    journals one of every one; opening then reads no checkpoint behind it for them, and a
    second close, with nothing new, journals none."""
    monkeypatch.setattr(_sequencer, "CLOSE_CHECKPOINT_PENDING", 10)
    _, open_ids = build(ledger_path)
    made = checkpoints(ledger_path)
    assert not made[-1][1][8] and made[-2][1][8]  # the close's holds every one; the one before, some
    assert {row[0] for row in made[-1][1][7]} == open_ids  # type: ignore[union-attr]
    walks: list[list[int]] = []
    real = _checkpoints.open_pending_at

    def noted(*args: object) -> tuple[list[list[object]], list[int]]:
        rows, walked = real(*args)  # type: ignore[arg-type]
        walks.append(walked)
        return rows, walked

    monkeypatch.setattr(_checkpoints, "open_pending_at", noted)
    with Ledger.open(ledger_path) as ledger:
        assert set(ledger._sequencer.pending) == open_ids
    assert walks == [[made[-1][0]]]  # the newest alone
    assert len(checkpoints(ledger_path)) == len(made)
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_inspect_says_how_many_of_the_open_pending_transfers_a_checkpoint_holds(
    ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine import _cli_render
    from engine._tools_read import record_row

    build(ledger_path)
    lsn, record = checkpoints(ledger_path)[-1]
    assert record[8] and len(record[7]) < record[10]  # type: ignore[arg-type]
    row = record_row(typed(lsn, record))
    assert (row["pending"], row["ledger_pending"]) == (len(record[7]), record[10])  # type: ignore[arg-type]
    _cli_render.render_inspect({"records": [row], "problem": None})
    assert f", {len(record[7])} of {record[10]} open pending transfers (those opened since, and its sweep's)\n" in \
        capsys.readouterr().out  # type: ignore[arg-type]


@pytest.mark.parametrize("opened", [100, 104, 108])
def test_the_walk_back_stays_bounded_when_the_oldest_close_first(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, opened: int
) -> None:
    """Pending transfers posted (or expired) in the order they opened move every open one a
    place back in the sweep's order each: the sweep goes on from where it stopped by the LSN
    there, so it still passes over every open one within about `CHECKPOINT_PENDING_CHAIN`
    checkpoints and the walk back is that long, not the pending transfers' whole life."""
    monkeypatch.setattr(_checkpoint_rows, "CHECKPOINT_PENDING_CHAIN", 4)
    monkeypatch.setattr(_checkpoint_rows, "CHECKPOINT_PENDING_SWEEP_MIN", 1)
    with Ledger.open(ledger_path, checkpoint_interval=4) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("shop", currency="USD")
        for n in range(opened):
            ledger.transfer(f"p{n}", source="bank", destination="shop", amount=1, pending=True)
        for n in range(3 * opened):  # one opens, the oldest is posted
            ledger.transfer(f"p{opened + n}", source="bank", destination="shop", amount=1, pending=True)
            ledger.post_pending(f"post{n}", pending_id=f"p{n}")
    walks: list[int] = []
    real = _checkpoints.open_pending_at

    def noted(*args: object) -> tuple[list[list[object]], list[int]]:
        rows, walked = real(*args)  # type: ignore[arg-type]
        walks.append(len(walked))
        return rows, walked

    monkeypatch.setattr(_checkpoints, "open_pending_at", noted)
    with Ledger.open(ledger_path) as reopened:
        assert set(reopened._sequencer.pending) == {f"p{n}" for n in range(3 * opened, 4 * opened)}
    assert walks and walks[0] <= 4 + 2, walks
