"""Reading history: balances at an LSN or a time, snapshots, and pages of transfers.

The oracle is the ledger itself, read as it went: one thread calls it, so after each call
returns nothing is in flight and its live balances are its history at the durable end.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from coordinator import INDEX_NAMES
from coordinator._audit import CHECK_INDEXES
from coordinator._holds import holds_from
from coordinator._records import ENTRIES_INDEX, HOLDS_FROM_KEY, encode_holds, holds_key, is_hold_key
from engine import (
    Account,
    AccountNotFound,
    Balance,
    InsufficientFunds,
    InvalidRequest,
    JournalCorrupted,
    Ledger,
    LedgerClosed,
    LedgerError,
    SnapshotExpired,
    Transfer,
    TransferRequest,
)
from journal import Journal
from journal._format import frame_index_value, index_seed

from tests.support import START_NS, Clock, audit_of

ACCOUNTS = ("a", "b", "c", "d")


@dataclass
class Walk:
    """A ledger walked through every kind of record, and what it showed after each call."""

    path: Path
    clock: Clock
    seen: list[tuple[int, dict[str, Balance]]] = field(default_factory=list)
    """(durable LSN, every account's balance) after each call."""
    transfers: dict[str, Transfer] = field(default_factory=dict)


def _note(ledger: Ledger, walk: Walk) -> None:
    lsn = ledger.stats()["durable_lsn"]
    walk.seen.append((lsn, {account.id: ledger.balance(account.id) for account in ledger.accounts()}))


def walk_ledger(path: Path, steps: int, seed: int, checkpoint_interval: int = 5) -> Walk:
    """`steps` random calls of every kind (transfers, pending ones posted, voided or expired,
    linked chains, refusals) with a test clock; small checkpoints, so entries are read both
    from the index and from memory."""
    rng = random.Random(seed)
    walk = Walk(path, Clock())
    with Ledger.open(path, clock_ns=walk.clock, checkpoint_interval=checkpoint_interval) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        _note(ledger, walk)
        for account in ACCOUNTS:
            ledger.create_account(account, currency="USD")
            funded = ledger.transfer(f"fund-{account}", source="bank", destination=account, amount=1_000)
            walk.transfers[funded.id] = funded
            _note(ledger, walk)
        open_pending: list[str] = []
        for step in range(steps):
            source, destination = rng.sample(ACCOUNTS, 2)
            amount = rng.randint(1, 400)
            choice = rng.random()
            walk.clock.advance(1)
            try:
                if choice < 0.35:
                    made = ledger.transfer(f"t{step}", source=source, destination=destination, amount=amount,
                                           code=rng.randint(0, 3))
                elif choice < 0.6:
                    made = ledger.transfer(f"p{step}", source=source, destination=destination, amount=amount,
                                           pending=True, timeout_s=rng.choice([None, 3]), code=rng.randint(0, 3))
                    open_pending.append(made.id)
                elif choice < 0.8 and open_pending:
                    pending_id = open_pending.pop(rng.randrange(len(open_pending)))
                    if rng.random() < 0.5:
                        made = ledger.post_pending(f"post{step}", pending_id=pending_id,
                                                   amount=rng.choice([None, 1]))
                    else:
                        made = ledger.void_pending(f"void{step}", pending_id=pending_id)
                elif choice < 0.9:
                    legs = [TransferRequest(f"l{step}-{i}", *rng.sample(ACCOUNTS, 2), rng.randint(1, 100),
                                            pending=i == 1) for i in range(3)]
                    for leg in ledger.transfer_linked(legs):
                        walk.transfers[leg.id] = leg
                    made = None
                else:
                    walk.clock.advance(4)
                    ledger.expire_pending()
                    made = None
            except LedgerError:
                made = None
            if made is not None:
                walk.transfers[made.id] = made
            _note(ledger, walk)
    return walk


@pytest.fixture(scope="module")
def walked(tmp_path_factory: pytest.TempPathFactory) -> Walk:
    return walk_ledger(tmp_path_factory.mktemp("history") / "ledger", steps=160, seed=15)


def test_a_balance_at_an_lsn_is_what_the_ledger_showed_then(walked: Walk) -> None:
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:  # reopened: the unindexed entries re-derived
        for lsn, shown in walked.seen:
            assert {account: ledger.balance(account, at_lsn=lsn) for account in shown} == shown, lsn
        last_lsn, last = walked.seen[-1]
        assert {account: ledger.balance(account) for account in last} == last


def test_each_record_changes_the_balances_at_its_lsn_by_exactly_what_it_did(walked: Walk) -> None:
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:
        alone = [t for t in walked.transfers.values() if [u.lsn for u in walked.transfers.values()].count(t.lsn) == 1]
        assert {t.kind for t in alone} == {"single", "pending", "post", "void"}
        for made in alone:
            source = {lsn: ledger.balance(made.source, at_lsn=lsn) for lsn in (made.lsn - 1, made.lsn)}
            target = {lsn: ledger.balance(made.destination, at_lsn=lsn) for lsn in (made.lsn - 1, made.lsn)}
            moved = made.amount if made.kind in ("single", "post") else 0
            held = {"single": 0, "pending": made.amount, "post": None, "void": -made.amount}[made.kind]
            assert source[made.lsn].posted - source[made.lsn - 1].posted == -moved
            assert target[made.lsn].posted - target[made.lsn - 1].posted == moved
            if held is not None:
                assert source[made.lsn].pending - source[made.lsn - 1].pending == held
                assert target[made.lsn].incoming - target[made.lsn - 1].incoming == held


def test_a_balance_at_a_timestamp_is_the_balance_at_the_last_record_at_or_before_it(walked: Walk) -> None:
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:
        for made in [t for t in walked.transfers.values() if not t.id.startswith("fund-")][::5]:
            for account in ("a", "c"):
                assert ledger.balance(account, at_timestamp=made.timestamp) == ledger.balance(account, at_lsn=made.lsn)
                before = ledger.balance(account, at_lsn=made.lsn - 1)
                # a chain's legs share its record: one nanosecond before its first leg is the record before
                chain_start = min(t.timestamp for t in walked.transfers.values() if t.lsn == made.lsn)
                assert ledger.balance(account, at_timestamp=chain_start - 1) == before


def test_point_in_time_requests_that_make_no_sense_are_refused(walked: Walk) -> None:
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:
        end = ledger.stats()["durable_lsn"]
        for bad in (
            {"at_lsn": end + 1},
            {"at_lsn": -1},
            {"at_lsn": True},
            {"at_lsn": 1.0},
            {"at_lsn": 3, "at_timestamp": 3},
            {"at_timestamp": "yesterday"},
            {"at_timestamp": walked.clock.now_ns + 1},
        ):
            with pytest.raises(InvalidRequest):
                ledger.balance("a", **bad)  # type: ignore[arg-type]
        with pytest.raises(AccountNotFound, match="opened at LSN"):
            ledger.balance("d", at_lsn=2)
        with pytest.raises(AccountNotFound):
            ledger.balance("nobody", at_lsn=end)
        with pytest.raises(AccountNotFound):
            ledger.balance("bank", at_timestamp=0)  # before the first record: LSN 0
        assert walked.seen[0][0] == 1  # the bank's opening, stamped with the clock as it started
        assert ledger.balance("bank", at_timestamp=START_NS) == walked.seen[0][1]["bank"]
        with pytest.raises(AccountNotFound):
            ledger.balance("bank", at_timestamp=START_NS - 1)


def test_a_balance_in_the_past_reads_a_logarithmic_number_of_index_entries(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger", checkpoint_interval=50) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        made = ledger.transfer_many([TransferRequest(f"t{i}", "bank", "a", 1) for i in range(4096)])
        middle = made[1234]
        assert isinstance(middle, Transfer)
        journal = ledger._journal
        reads: list[str] = []
        for name in ("index_get", "index_last_before", "read"):
            original = getattr(journal, name)

            def counted(*args: object, _original: Callable[..., object] = original, _name: str = name) -> object:
                reads.append(_name)
                return _original(*args)

            setattr(journal, name, counted)
        journal.scan = None  # type: ignore[assignment,method-assign]  # never a scan
        assert ledger.balance("a", at_lsn=middle.lsn).posted == 1235
        assert len(reads) <= 2 * 12 + 8, reads  # log2(4096) = 12 bisection steps, each one read


# --- snapshots ----------------------------------------------------------------------------------


def test_a_snapshot_is_unaffected_by_what_lands_while_it_is_open(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    ledger.transfer("t1", source="bank", destination="a", amount=100)
    ledger.transfer("p1", source="a", destination="bank", amount=30, pending=True)
    with ledger.snapshot() as snapshot:
        before = snapshot.balances()
        assert before["a"] == Balance(100, 30, 70, 0)
        ledger.transfer("t2", source="bank", destination="a", amount=5)
        ledger.post_pending("post1", pending_id="p1")
        ledger.create_account("late", currency="USD")
        assert snapshot.balances() == before
        assert snapshot.balance("a") == before["a"]
        assert snapshot.get_transfer("t2") is None
        assert snapshot.get_transfer("p1").status == "pending"  # type: ignore[union-attr]
        assert [entry.transfer_id for entry in snapshot.entries("a")] == ["t1"]
        assert [made.id for made in snapshot.transfers(account="a")] == ["t1", "p1"]
        with pytest.raises(AccountNotFound):
            snapshot.balance("late")
        assert ledger.get_transfer("p1").status == "posted"  # type: ignore[union-attr]
        assert snapshot.timestamp == ledger.get_transfer("p1").timestamp  # type: ignore[union-attr]
    with pytest.raises(SnapshotExpired):
        snapshot.balances()


def test_a_snapshots_balances_of_accounts_the_caller_cannot_list_is_invalid_request(ledger: Ledger) -> None:
    """The iterable is the caller's code: an error reading it is bad input (as `transfer_many`
    reports its items'), not an untyped error out of the ledger."""
    ledger.create_account("a", currency="USD")

    def listing() -> Iterator[str]:
        yield "a"
        raise ValueError("the caller's listing failed")

    with ledger.snapshot() as snapshot:
        with pytest.raises(InvalidRequest, match="the caller's listing failed"):
            snapshot.balances(listing())
        assert snapshot.balances(iter(["a"])) == {"a": Balance(0, 0, 0, 0)}


def test_a_snapshot_past_its_max_age_or_its_ledger_refuses_to_answer(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine._history

    ledger.create_account("a", currency="USD")
    now = [1000.0]
    monkeypatch.setattr(engine._history.time, "monotonic", lambda: now[0])
    snapshot = ledger.snapshot(max_age_s=5)
    now[0] += 5
    assert snapshot.balance("a") == Balance(0, 0, 0, 0)
    now[0] += 0.001
    with pytest.raises(SnapshotExpired, match="max_age_s"):
        snapshot.balance("a")
    for bad in (0, -1, True, 3601, float("nan"), "1"):
        with pytest.raises(InvalidRequest):
            ledger.snapshot(max_age_s=bad)  # type: ignore[arg-type]
    fresh = ledger.snapshot()
    ledger.close()
    with pytest.raises(LedgerClosed):
        fresh.balance("a")


@pytest.mark.timeout(120)
def test_every_snapshot_taken_while_writers_move_money_balances(tmp_path: Path) -> None:
    """Jepsen's bank workload: writers move money among accounts (transfers, and pending ones
    posted or voided) while readers take snapshots; every snapshot sums to the same total and
    shows no account below its limit."""
    accounts = [f"acct-{i}" for i in range(8)]
    total = 8 * 10_000
    snapshots_wanted, writes_wanted = 2_000, 600
    taken, written = [0], [0]
    stop = threading.Event()
    failures: list[str] = []
    with Ledger.open(tmp_path / "ledger", checkpoint_interval=64) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for account in accounts:
            ledger.create_account(account, currency="USD")
            ledger.transfer(f"fund-{account}", source="bank", destination=account, amount=total // 8)

        def write(seed: int) -> None:
            rng = random.Random(seed)
            step = 0
            while not stop.is_set():
                step += 1
                source, destination = rng.sample(accounts, 2)
                try:
                    if rng.random() < 0.7:
                        ledger.transfer(f"w{seed}-{step}", source=source, destination=destination,
                                        amount=rng.randint(1, 3_000))
                    else:
                        made = ledger.transfer(f"w{seed}-{step}", source=source, destination=destination,
                                               amount=rng.randint(1, 3_000), pending=True)
                        resolve = ledger.post_pending if rng.random() < 0.5 else ledger.void_pending
                        resolve(f"w{seed}-{step}-r", pending_id=made.id)
                    written[0] += 1
                except InsufficientFunds:
                    pass

        def read() -> None:
            while not stop.is_set():
                with ledger.snapshot() as snapshot:
                    shown = snapshot.balances(accounts)
                posted = sum(balance.posted for balance in shown.values())
                below = [name for name, balance in shown.items() if balance.available < 0]
                if posted != total or below:
                    failures.append(f"LSN {snapshot.lsn}: posted {posted}, below their limit {below}")
                taken[0] += 1
                if taken[0] >= snapshots_wanted and written[0] >= writes_wanted:
                    stop.set()

        threads = [threading.Thread(target=write, args=(seed,)) for seed in range(3)]
        threads += [threading.Thread(target=read) for _ in range(2)]
        for thread in threads:
            thread.start()
        finished = stop.wait(timeout=100)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert finished and taken[0] >= snapshots_wanted and written[0] >= writes_wanted
        assert not failures, failures[:5]


# --- pages of transfers -------------------------------------------------------------------------


def _all(ledger: Ledger, walk: Walk) -> list[Transfer]:
    """Every committed transfer, in LSN order (legs of a chain in order), status as of now."""
    made = sorted(walk.transfers.values(), key=lambda t: (t.lsn, t.timestamp))
    return [ledger.get_transfer(t.id) for t in made]  # type: ignore[misc]


def _paged(ledger: Ledger, limit: int, reverse: bool = False, **filters: object) -> Iterator[list[Transfer]]:
    after, until = 0, None
    while True:
        page = ledger.transfers(limit=limit, reverse=reverse, after_lsn=after, until_lsn=until,  # type: ignore[arg-type]
                                **filters)
        if not page:
            return
        yield page
        if reverse:
            until = page[-1].lsn - 1
            if until <= 0:
                return
        else:
            after = page[-1].lsn


@pytest.mark.parametrize("limit", [1, 2, 5, 100])
def test_paging_through_transfers_gives_each_once_in_lsn_order_and_never_splits_a_chain(walked: Walk,
                                                                                        limit: int) -> None:
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:
        expected = _all(ledger, walked)
        for reverse in (False, True):
            pages = list(_paged(ledger, limit, reverse))
            flat = [made for page in pages for made in page]
            # newest record first with `reverse`; a chain's legs in their order either way
            assert flat == (sorted(expected, key=lambda t: (-t.lsn, t.timestamp)) if reverse else expected)
            for page in pages:
                lsns = [made.lsn for made in page]
                chain = len([t for t in expected if t.lsn == lsns[-1]])
                assert len(page) <= max(limit, chain)
                assert lsns.count(lsns[-1]) == chain  # the last record's legs are all here


def test_filters_pick_exactly_the_transfers_that_match(walked: Walk) -> None:
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:
        expected = _all(ledger, walked)
        journal = ledger._journal
        for account in ("bank", *ACCOUNTS):
            for kind in (None, "single", "pending", "post", "void"):
                for code in (None, 0, 2):
                    want = [t.id for t in expected if account in (t.source, t.destination)
                            and (kind is None or t.kind == kind) and (code is None or t.code == code)]
                    scan = Journal.scan
                    try:
                        Journal.scan = None  # type: ignore[assignment,method-assign]  # an account's page never scans
                        got = [t.id for page in _paged(ledger, 7, account=account, kind=kind, code=code)
                               for t in page]
                    finally:
                        Journal.scan = scan  # type: ignore[method-assign]
                    assert got == want, (account, kind, code)
            assert journal is ledger._journal
        pending = ledger.transfers(kind="pending", limit=10_000)
        assert {t.status for t in pending} >= {"posted", "voided", "expired"}


def test_every_page_shows_statuses_as_of_its_view_not_its_cursor(walked: Walk) -> None:
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:
        resolved = [t for t in ledger.transfers(kind="pending", limit=10_000) if t.status != "pending"]
        assert resolved
        for made in resolved[:10]:
            alone = ledger.transfers(kind="pending", after_lsn=made.lsn - 1, until_lsn=made.lsn)
            assert [(t.id, t.status) for t in alone] == [(made.id, made.status)]


def test_bad_queries_are_refused(ledger: Ledger) -> None:
    ledger.create_account("a", currency="USD")
    for bad in ({"limit": 0}, {"limit": 10_001}, {"limit": True}, {"kind": "refund"}, {"code": -1},
                {"code": 70_000}, {"after_lsn": -1}, {"until_lsn": 99}, {"reverse": 1}, {"account": ""}):
        with pytest.raises(InvalidRequest):
            ledger.transfers(**bad)  # type: ignore[arg-type]
    with pytest.raises(AccountNotFound):
        ledger.transfers(account="nobody")
    assert ledger.transfers(account="a") == []


# --- a ledger older than hold rows ---------------------------------------------------------------


def test_a_ledger_from_before_hold_rows_reads_its_past_from_its_records(tmp_path: Path, raw_lmdb: Callable) -> None:
    walk = walk_ledger(tmp_path / "ledger", steps=60, seed=3)
    with raw_lmdb(walk.path) as env, env.begin(write=True) as txn:  # as a release before hold rows left it
        entries = env.open_db(ENTRIES_INDEX.encode(), txn=txn, create=False)
        held = [bytes(key) for key in txn.cursor(db=entries).iternext(values=False) if is_hold_key(key)]
        assert HOLDS_FROM_KEY in held and len(held) > 10
        for key in held:
            assert txn.delete(key, db=entries)
    with Ledger.open(walk.path, clock_ns=walk.clock) as ledger:
        for lsn, shown in walk.seen:
            assert {account: ledger.balance(account, at_lsn=lsn) for account in shown} == shown, lsn
        made = ledger.transfer("after", source="a", destination="b", amount=1, pending=True)
        assert ledger.balance("a", at_lsn=made.lsn).pending == ledger.balance("a").pending
        old = [t.id for page in _paged(ledger, 5, account="b") for t in page]
        assert old == [t.id for t in _all(ledger, walk) if "b" in (t.source, t.destination)] + ["after"]


def test_an_interrupt_after_the_first_block_is_queued_marks_hold_rows_from_that_block(
        tmp_path: Path, raw_lmdb: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger from before hold rows marks where they start on the first block it appends.
    An interrupt right after that block is queued (its call raises, the block stands) must
    not leave the mark due: the next block would move it past rows already written."""
    from tests.support import interrupt_after

    walk = walk_ledger(tmp_path / "ledger", steps=40, seed=3)
    with raw_lmdb(walk.path) as env, env.begin(write=True) as txn:  # as a release before hold rows left it
        entries = env.open_db(ENTRIES_INDEX.encode(), txn=txn, create=False)
        for key in [bytes(key) for key in txn.cursor(db=entries).iternext(values=False) if is_hold_key(key)]:
            assert txn.delete(key, db=entries)
    with Ledger.open(walk.path, clock_ns=walk.clock) as ledger:
        with pytest.MonkeyPatch.context() as patch:
            interrupt_after(patch, ledger._journal, "append_block")
            with pytest.raises(KeyboardInterrupt):
                ledger.transfer("first", source="a", destination="b", amount=1, pending=True)
        first = ledger.transfer("first", source="a", destination="b", amount=1, pending=True)  # (the retry)
        later = ledger.transfer("later", source="b", destination="c", amount=1, pending=True)
        assert later.lsn > first.lsn
        assert ledger.balance("a", at_lsn=first.lsn).pending == ledger.balance("a").pending
    journal = Journal.open_readonly(walk.path, index_names=INDEX_NAMES)
    try:
        with journal.snapshot() as txn:
            assert holds_from(journal, txn) == first.lsn
    finally:
        journal.close()
    assert audit_of(walk.path).problem is None


# --- damaged hold rows ---------------------------------------------------------------------------


def _hold_rows(raw_lmdb: Callable, path: Path) -> list[tuple[bytes, bytes]]:
    with raw_lmdb(path) as env, env.begin() as txn:
        entries = env.open_db(ENTRIES_INDEX.encode(), txn=txn, create=False)
        return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=entries) if is_hold_key(k) and k != HOLDS_FROM_KEY]


def _put_framed(raw_lmdb: Callable, path: Path, key: bytes, value: bytes | None) -> None:
    """Write (or with None delete) an entry index entry, its checksum valid: damage only the
    records can tell."""
    with raw_lmdb(path) as env, env.begin(write=True) as txn:
        entries = env.open_db(ENTRIES_INDEX.encode(), txn=txn, create=False)
        if value is None:
            assert txn.delete(key, db=entries)
        else:
            txn.put(key, frame_index_value(index_seed(ENTRIES_INDEX), key, value), db=entries)


@pytest.mark.parametrize("damage", ["wrong", "missing", "extra"])
def test_a_hold_row_that_disagrees_with_the_records_fails_the_audit(tmp_path: Path, raw_lmdb: Callable,
                                                                    damage: str) -> None:
    walk = walk_ledger(tmp_path / "ledger", steps=30, seed=5)
    key, value = _hold_rows(raw_lmdb, walk.path)[3]
    if damage == "wrong":
        _put_framed(raw_lmdb, walk.path, key, encode_holds(7, 7))
    elif damage == "missing":
        _put_framed(raw_lmdb, walk.path, key, None)
    else:
        plain = next(t for t in walk.transfers.values() if t.kind == "single" and t.source == "a")
        _put_framed(raw_lmdb, walk.path, holds_key("a", plain.lsn), encode_holds(0, 0))
    report = audit_of(walk.path)
    assert report.checks[CHECK_INDEXES] is False
    assert "hold row" in (report.problem or ""), report.problem
    if damage == "extra":  # read, it is refused: its record changes no pending transfer of the account
        with Ledger.open(walk.path, clock_ns=walk.clock) as ledger, pytest.raises(JournalCorrupted,
                                                                                  match="hold row"):
            ledger.balance("a", at_lsn=plain.lsn)


# --- the command line -----------------------------------------------------------------------------


def _tally_json(*args: object) -> dict:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "engine", *map(str, args), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_tally_balance_at_an_lsn_or_a_time_reads_what_the_api_reads(walked: Walk) -> None:
    from datetime import datetime, timezone

    sample = walked.seen[:: max(1, len(walked.seen) // 6)] + [walked.seen[-1]]
    for lsn, shown in sample:
        for account in ("a", "d"):
            if account not in shown:
                continue
            report = _tally_json("balance", walked.path, account, "--at-lsn", lsn)
            want = shown[account]
            assert (report["posted"], report["pending"], report["available"], report["incoming"], report["at_lsn"]) \
                == (want.posted, want.pending, want.available, want.incoming, lsn)
    made = next(t for t in walked.transfers.values() if t.kind == "pending")
    moment = datetime.fromtimestamp(made.timestamp // 10**9, tz=timezone.utc).isoformat()  # whole seconds: at
    report = _tally_json("balance", walked.path, made.source, "--at", moment)  # or before the transfer
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:
        at = ledger.balance(made.source, at_timestamp=made.timestamp // 10**9 * 10**9)
    assert (report["posted"], report["pending"]) == (at.posted, at.pending)
    history = _tally_json("history", walked.path, "b", "--limit", "5")
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:
        assert [row["id"] for row in history["transfers"]] == [
            t.id for t in ledger.transfers(account="b", reverse=True, limit=5)]


@pytest.mark.parametrize("limit", [0, *range(1, 12)])
def test_tally_history_pages_past_a_page_s_maximum_and_keeps_a_chain_whole(walked: Walk,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          limit: int) -> None:
    """Pages of 3 (a page's maximum, patched): the transfers `tally history` lists are the
    API's newest first, every one with no limit; with one, a chain is never split, and the
    last page ends before a chain that would take it past the limit, as one page does."""
    from engine import _tools_read

    monkeypatch.setattr(_tools_read, "TRANSFERS_PAGE_MAX", 3)
    shown = [row["id"] for row in _tools_read.history(str(walked.path), "b", limit)["transfers"]]
    with Ledger.open(walked.path, clock_ns=walked.clock) as ledger:
        every = ledger.transfers(account="b", reverse=True, limit=10_000)
        want = every if not limit else ledger.transfers(account="b", reverse=True, limit=limit)
    assert any(t.lsn == u.lsn for t, u in zip(every, every[1:], strict=False)), "b has a chain's legs"
    assert shown == [t.id for t in want]


# --- found in review ---------------------------------------------------------------------------------


def test_salvage_copies_openings_and_expiries_at_their_own_timestamps(tmp_path: Path) -> None:
    from engine import _tools_salvage

    clock = Clock()  # the records are from the past: a copy made now must not restamp them
    with Ledger.open(tmp_path / "l", clock_ns=clock) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        made = ledger.transfer("t1", source="bank", destination="a", amount=100)
        ledger.transfer("p1", source="a", destination="bank", amount=5, pending=True, timeout_s=60)
        clock.advance(61)
        assert ledger.expire_pending() == 1
        events = [(e.lsn, e.timestamp, e.kind) for e in ledger.events()]
    report = _tools_salvage.salvage(str(tmp_path / "l"), str(tmp_path / "copy"))
    assert report["lost"] == []
    with Ledger.open(tmp_path / "copy", clock_ns=clock) as copy:
        assert copy.get_transfer("t1").timestamp == made.timestamp  # type: ignore[union-attr]
        assert [(e.lsn, e.timestamp, e.kind) for e in copy.events()] == events


def test_hold_rows_waiting_in_memory_make_a_checkpoint_due_as_entries_do(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import coordinator._sequencer

    monkeypatch.setattr(coordinator._sequencer, "UNINDEXED_ENTRIES_MAX", 2_000)
    with Ledger.open(tmp_path / "l") as ledger:  # the default checkpoint interval: only the bound checkpoints
        ledger.create_accounts([Account(f"s{i}", "USD", None) for i in range(100)]
                               + [Account(f"d{i}", "USD", 0) for i in range(100)])
        for chain in range(30):  # pending legs make hold rows and no entries
            ledger.transfer_linked([TransferRequest(f"c{chain}-{i}", f"s{i}", f"d{i}", 1, pending=True)
                                    for i in range(100)])
            assert ledger._sequencer.unindexed_holds.count <= 2_000 + 200
        assert ledger.balance("s7", at_lsn=ledger.stats()["durable_lsn"]).pending == 30


def test_at_timestamp_takes_every_timestamp_the_ledger_gave_though_its_clock_is_behind(tmp_path: Path) -> None:
    clock = Clock()
    with Ledger.open(tmp_path / "l", clock_ns=clock) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        first = ledger.transfer("t1", source="bank", destination="a", amount=5)
        clock.advance(-60)  # the clock steps back a minute
        second = ledger.transfer("t2", source="bank", destination="a", amount=7)
        assert second.timestamp > first.timestamp > clock.now_ns
        assert ledger.balance("a", at_timestamp=first.timestamp).posted == 5
        assert ledger.balance("a", at_timestamp=second.timestamp).posted == 12
        with pytest.raises(InvalidRequest, match="still to come"):
            ledger.balance("a", at_timestamp=second.timestamp + 1)


def test_odd_arguments_to_a_snapshot_and_a_long_history_limit(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("a", currency="USD")
        with ledger.snapshot() as snapshot:
            assert snapshot.entries("a", after=2**64 - 1) == []
            with pytest.raises(InvalidRequest):
                snapshot.balances(5)  # type: ignore[arg-type]
    assert _tally_json("history", tmp_path / "l", "a", "--limit", "20000")["transfers"] == []


def test_a_ledger_from_before_hold_rows_reads_recent_balances_without_reading_its_records(
        tmp_path: Path, raw_lmdb: Callable) -> None:
    walk = walk_ledger(tmp_path / "ledger", steps=60, seed=3, checkpoint_interval=10**6)
    with raw_lmdb(walk.path) as env, env.begin(write=True) as txn:  # as a release before hold rows left it
        entries = env.open_db(ENTRIES_INDEX.encode(), txn=txn, create=False)
        for key in [bytes(key) for key in txn.cursor(db=entries).iternext(values=False) if is_hold_key(key)]:
            assert txn.delete(key, db=entries)
    with Ledger.open(walk.path, clock_ns=walk.clock) as ledger:
        ledger.create_account("late", currency="USD")  # the first record this release writes: the mark
        end = ledger.stats()["durable_lsn"]
        scan = Journal.scan
        try:
            Journal.scan = None  # type: ignore[assignment,method-assign]  # the baseline rows answer
            for account in ACCOUNTS:
                assert ledger.balance(account, at_lsn=end) == ledger.balance(account)
        finally:
            Journal.scan = scan  # type: ignore[method-assign]
    assert audit_of(walk.path).whole


def test_replay_keeps_every_timestamp(tmp_path: Path) -> None:
    """Openings, single transfers (which replay copies in batches) each at its own time, a
    batch's consecutive ones, pending transfers, posts, a chain and an expiry: the copy's
    events carry the original's timestamps, every one."""
    from engine import _tools_copy

    clock = Clock()
    with Ledger.open(tmp_path / "l", clock_ns=clock) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        clock.advance(5)
        first = ledger.transfer("t1", source="bank", destination="a", amount=100)
        for k in range(2, 6):  # apart in time: one batch of the replay
            clock.advance(k)
            ledger.transfer(f"t{k}", source="bank", destination="a", amount=k, code=k)
        ledger.transfer_many([TransferRequest(f"m{k}", "a", "bank", 1) for k in range(3)])
        clock.advance(1)
        ledger.transfer("p1", source="a", destination="bank", amount=7, pending=True, timeout_s=60)
        ledger.transfer("p2", source="a", destination="bank", amount=8, pending=True)
        clock.advance(1)
        ledger.transfer("t6", source="bank", destination="a", amount=6)
        ledger.post_pending("q2", pending_id="p2")
        ledger.transfer_linked([TransferRequest("l1", "bank", "a", 1), TransferRequest("l2", "a", "bank", 1)])
        clock.advance(120)
        assert ledger.expire_pending() == 1
        ledger.transfer("t7", source="bank", destination="a", amount=7)
        original = [(e.kind, e.timestamp) for e in ledger.events()]
        assert len({timestamp for _, timestamp in original}) == len(original) > 15
        with pytest.raises(InvalidRequest):
            next(iter(ledger.events(2**64)))
    assert _tools_copy.replay(str(tmp_path / "l"), str(tmp_path / "copy"))["verdict"] == "identical"
    with Ledger.open(tmp_path / "copy", clock_ns=clock) as copy:
        assert [(e.kind, e.timestamp) for e in copy.events()] == original
        assert copy.balance("a", at_timestamp=first.timestamp - 1).posted == 0
        assert copy.balance("a", at_timestamp=first.timestamp).posted == 100


def test_replay_keeps_the_timestamps_a_clock_at_its_end_stamped_past_it(tmp_path: Path) -> None:
    """A clock stuck at the last nanosecond it may read: each decision is stamped the last
    + 1, past the clock's range. The replay's clock cannot read those; it reads the end, and
    the copy stamps them the same way."""
    from engine import _tools_copy

    end = 2**63 - 1
    with Ledger.open(tmp_path / "l", clock_ns=lambda: end) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        ledger.transfer("t1", source="bank", destination="a", amount=5)
        ledger.transfer("p1", source="bank", destination="a", amount=3, pending=True, timeout_s=60)
        ledger.post_pending("q1", pending_id="p1")
        ledger.transfer_many([TransferRequest(f"m{k}", "a", "bank", 1) for k in range(3)])
        original = [(e.kind, e.timestamp) for e in ledger.events()]
        assert original[-1][1] > end
    assert _tools_copy.replay(str(tmp_path / "l"), str(tmp_path / "copy"))["verdict"] == "identical"
    with Ledger.open(tmp_path / "copy", clock_ns=lambda: end) as copy:
        assert [(e.kind, e.timestamp) for e in copy.events()] == original


def test_a_point_in_time_balance_after_a_partial_post_shows_the_whole_hold_released_after_reopening(
        tmp_path: Path) -> None:
    """A post of part of a pending transfer releases all of its hold: the hold rows journaled
    with it (which a reopened ledger reads the past from) must say so."""
    path = tmp_path / "ledger"
    with Ledger.open(path, clock_ns=Clock()) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.create_account("bob", currency="USD")
        ledger.transfer("fund", source="bank", destination="alice", amount=100)
        ledger.transfer("p-1", source="alice", destination="bob", amount=60, pending=True)
        post = ledger.post_pending("q-1", pending_id="p-1", amount=10)
        ledger.transfer("later", source="bank", destination="bob", amount=1)
        live = [ledger.balance(account, at_lsn=post.lsn) for account in ("alice", "bob")]
    assert live == [Balance(90, 0, 90, 0), Balance(10, 0, 10, 0)]
    with Ledger.open(path, clock_ns=Clock()) as reopened:
        assert [reopened.balance(account, at_lsn=post.lsn) for account in ("alice", "bob")] == live


@pytest.fixture
def paused(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The calls between two chunks of a read that a `Ledger` makes (`journal._chunks.Pause`),
    counted by the name of the thread that made them, instead of made."""
    import journal._journal_reads

    made: list[str] = []
    monkeypatch.setattr(journal._journal_reads, "Pause", lambda: lambda: made.append(threading.current_thread().name))
    return made


def _busy_ledger(path: Path, transfers: int) -> Ledger:
    ledger = Ledger.open(path, checkpoint_interval=100)  # entries read from the index, not memory
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    ledger.transfer_many([TransferRequest(f"m{k}", "bank", "a", 1) for k in range(transfers)])
    for k in range(transfers):
        ledger.transfer(f"s{k}", source="a", destination="bank", amount=1)
    ledger.transfer_linked([TransferRequest(f"l{k}", "bank", "a", 1) for k in range(transfers)])
    return ledger


READS: dict[str, Callable[[Ledger], object]] = {
    "transfers": lambda ledger: ledger.transfers(limit=10_000),
    "transfers of an account": lambda ledger: ledger.transfers(account="a", limit=10_000),
    "entries": lambda ledger: ledger.entries("a"),
    "events": lambda ledger: list(ledger.events()),
    "snapshot": lambda ledger: ledger.snapshot().transfers(limit=10_000),
    "state_hash": lambda ledger: ledger.state_hash(),
}


@pytest.mark.parametrize("read", list(READS))
@pytest.mark.parametrize("readonly", [False, True])
def test_a_long_read_lets_go_of_the_interpreter_between_two_chunks_of_its_records(
        tmp_path: Path, paused: list[str], read: str, readonly: bool) -> None:
    """py-lmdb lets go of the GIL at each get and takes it back at once, so a thread reading
    record after record kept the writer and every caller deciding transfers out until it was
    done (16 threads of single transfers fell from ~11,000/s to ~20/s beside one thread reading
    pages of 10,000). A read may pause between two chunks of `READ_CHUNK_RECORDS` records, on
    the reading thread; writing, the engine never does (it reads under locks others need)."""
    from journal._limits import READ_CHUNK_RECORDS

    transfers = 3 * READ_CHUNK_RECORDS
    ledger = _busy_ledger(tmp_path / "l", transfers)
    try:
        assert paused == []  # writes, decisions and commits: never
        if readonly:
            ledger.close()
            ledger = Ledger.open(tmp_path / "l", readonly=True)
            paused.clear()  # (the open's own replay of the records)
        thread = threading.current_thread().name
        READS[read](ledger)
        assert len(paused) >= 2 and set(paused) == {thread}
        before = len(paused)
        ledger.balance("a")
        ledger.get_transfer("l0")  # a leg of a chain of 384: one record
        assert len(paused) == before  # short reads: no chunk filled
    finally:
        ledger.close()


def test_a_read_inside_another_chunked_read_keeps_the_outer_function(tmp_path: Path, paused: list[str]) -> None:
    """A `Ledger` read made where a caller already reads in chunks with a function of its own
    (`AsyncLedger`: a turn of its loop) calls that function, not the pause."""
    from journal._limits import READ_CHUNK_RECORDS

    with _busy_ledger(tmp_path / "l", 2 * READ_CHUNK_RECORDS) as ledger:
        outer: list[int] = []
        with ledger._journal.reading_in_chunks(lambda: outer.append(1)):
            ledger.transfers(limit=10_000)
        assert outer and paused == []
        ledger.transfers(limit=10_000)
        assert paused


def test_a_balance_that_reads_many_records_lets_go_of_the_interpreter_between_two_chunks(
        tmp_path: Path, raw_lmdb: Callable, paused: list[str]) -> None:
    """A balance is a read of a few records only where it has hold rows and a live journal:
    at an LSN in a past from before hold rows it reads the records since the newest checkpoint
    (up to a checkpoint interval of them), and once the journal failed it replays them; both
    pause between two chunks as any long read does."""
    from journal._limits import READ_CHUNK_RECORDS

    path = tmp_path / "l"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        for k in range(3 * READ_CHUNK_RECORDS):
            ledger.transfer(f"t{k}", source="bank", destination="a", amount=1)
        last = ledger.head().lsn
    with raw_lmdb(path) as env, env.begin(write=True) as txn:  # as a release before hold rows left it
        entries = env.open_db(ENTRIES_INDEX.encode(), txn=txn, create=False)
        for key in [bytes(key) for key in txn.cursor(db=entries).iternext(values=False) if is_hold_key(key)]:
            assert txn.delete(key, db=entries)
    with Ledger.open(path) as ledger:
        paused.clear()
        assert ledger.balance("a", at_lsn=last).posted == 3 * READ_CHUNK_RECORDS
        assert len(paused) >= 2
        paused.clear()
        ledger._journal.refuse_writes("a test fails the journal")
        assert ledger.balance("a").posted == 3 * READ_CHUNK_RECORDS
        assert len(paused) >= 2
