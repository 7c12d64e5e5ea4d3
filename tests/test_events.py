"""`Ledger.events`: the stream of business events, in-process and read-only from another process.

No sleeps synchronise anything here: a follower reports what it got through a queue or a
pipe, and every wait for it is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from coordinator import INDEX_NAMES, Checkpointed, Opened, _events, account_timestamp, records
from engine import (
    Account,
    AsyncLedger,
    Event,
    InsufficientFunds,
    InvalidRequest,
    Ledger,
    LedgerClosed,
    LedgerLocked,
    LinkedTransferFailed,
    NotALedger,
    ReadOnlyLedger,
    Transfer,
    TransferRequest,
)
from engine import _follow, jsonable
from journal import LSN_MAX, Journal

from tests.support import Clock

ROOT = Path(__file__).resolve().parents[1]
MAP_SIZE_BYTES_SMALL = 1 << 20
WAIT_S = 30.0
"""Bound on every wait for a follower (never reached when all is well)."""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _files(path: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of each file of a ledger but LMDB's lock file (its table of readers,
    which every reader writes its slot into)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.name != "lock.mdb"}


def _every_kind(path: Path, clock: Clock) -> Ledger:
    """A ledger holding one event of each kind and shape; open, with the test's clock."""
    ledger = Ledger.open(path, clock_ns=clock)
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("alice", currency="USD", metadata={"tier": 1})
    ledger.transfer("t-1", source="bank", destination="alice", amount=100)
    ledger.transfer("p-1", source="alice", destination="bank", amount=30, pending=True, timeout_s=60)
    ledger.transfer("p-2", source="alice", destination="bank", amount=20, pending=True, timeout_s=60)
    ledger.transfer("p-3", source="alice", destination="bank", amount=10, pending=True, timeout_s=5)
    ledger.post_pending("post-1", pending_id="p-1", amount=25)
    ledger.void_pending("void-2", pending_id="p-2")
    with pytest.raises(InsufficientFunds):
        ledger.transfer("x-1", source="alice", destination="bank", amount=1_000)
    with pytest.raises(LinkedTransferFailed):
        ledger.transfer_linked([TransferRequest("lx-1", "bank", "alice", 5), TransferRequest("lx-2", "alice", "bank", 999)])
    ledger.transfer_linked([TransferRequest("l-1", "bank", "alice", 5), TransferRequest("l-2", "alice", "bank", 7)])
    clock.advance(10)
    assert ledger.expire_pending() == 1
    return ledger


def test_every_record_is_one_event_with_its_kind_and_fields(tmp_path: Path) -> None:
    clock = Clock()
    with _every_kind(tmp_path / "l", clock) as ledger:
        events = list(ledger.events())
    kinds = [(event.kind, [t.id for t in event.transfers]) for event in events]
    assert kinds == [
        ("account", []), ("account", []), ("transfer", ["t-1"]), ("transfer", ["p-1"]), ("transfer", ["p-2"]),
        ("transfer", ["p-3"]), ("transfer", ["post-1"]), ("transfer", ["void-2"]), ("refusal", ["x-1"]),
        ("refusal", ["lx-1", "lx-2"]), ("transfer", ["l-1", "l-2"]), ("expiry", ["p-3"]),
    ]
    assert [event.lsn for event in events] == list(range(1, 13))
    assert all(isinstance(event, Event) for event in events)
    bank, alice = events[0], events[1]
    assert bank.account == Account("bank", "USD", None) and bank.code is None
    assert 0 < bank.timestamp < alice.timestamp < events[2].timestamp  # an opening has its own timestamp
    assert alice.account is not None and alice.account.metadata == {"tier": 1}
    assert bank.transfers == bank.entries == ()

    single = events[2]
    assert single.account is None and single.code is None
    (made,) = single.transfers
    assert isinstance(made, Transfer) and (made.source, made.destination, made.amount, made.lsn) == ("bank", "alice", 100, 3)
    assert single.timestamp == made.timestamp == clock.now_ns - 10 * 10**9 + 2  # after the two openings
    assert [(e.account, e.amount, e.balance) for e in single.entries] == [("bank", -100, -100), ("alice", 100, 100)]

    pending = events[3]
    assert pending.transfers[0].status == "pending" and pending.entries == ()  # its status as of the event
    post = events[6]
    assert (post.transfers[0].kind, post.transfers[0].pending_id, post.transfers[0].amount) == ("post", "p-1", 25)
    assert [(e.account, e.balance) for e in post.entries] == [("alice", 75), ("bank", -75)]
    void = events[7]
    assert (void.transfers[0].kind, void.transfers[0].status, void.entries) == ("void", "voided", ())

    refusal = events[8]
    assert refusal.code == "insufficient_funds" and refusal.entries == ()
    assert refusal.transfers == (TransferRequest("x-1", "alice", "bank", 1_000),)
    chain_refused = events[9]
    assert chain_refused.code == "insufficient_funds"
    assert chain_refused.transfers == (TransferRequest("lx-1", "bank", "alice", 5), TransferRequest("lx-2", "alice", "bank", 999))
    chain = events[10]
    assert [t.timestamp - chain.timestamp for t in chain.transfers] == [0, 1]
    assert [(e.account, e.amount, e.balance) for e in chain.entries] == [
        ("bank", -5, -80), ("alice", 5, 80), ("alice", -7, 73), ("bank", 7, -73)]

    expiry = events[11]
    (expired,) = expiry.transfers
    assert isinstance(expired, Transfer)
    assert (expired.id, expired.status, expired.kind, expired.amount, expired.lsn) == ("p-3", "expired", "pending", 10, 6)
    assert expiry.timestamp == clock.now_ns and expiry.entries == () and expiry.code is None
    timestamps = [event.timestamp for event in events]
    assert timestamps == sorted(timestamps)


def test_a_consumer_resumes_after_the_last_lsn_it_processed_across_a_reopen(tmp_path: Path) -> None:
    clock = Clock()
    _every_kind(tmp_path / "l", clock).close()
    with Ledger.open(tmp_path / "l", clock_ns=clock) as ledger:
        everything = list(ledger.events())
        for after in (0, 1, 5, 11, 12, 99):
            assert list(ledger.events(after)) == [event for event in everything if event.lsn > after]


def test_checkpoints_are_skipped_and_account_events_carry_their_openings_timestamp(tmp_path: Path) -> None:
    clock = Clock()
    with Ledger.open(tmp_path / "l", clock_ns=clock, checkpoint_interval=3) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for n in range(6):
            ledger.create_account(f"a{n}", currency="USD")
            ledger.transfer(f"t{n}", source="bank", destination=f"a{n}", amount=n + 1)
            clock.advance(1)
        ledger.create_accounts([Account(f"b{n}", "USD", 0) for n in range(8)])
        stored = list(records(ledger._journal))
        everything = list(ledger.events())
        checkpoints = {record.lsn for record in stored if isinstance(record, Checkpointed)}
        assert checkpoints, "the test meant to meet checkpoints"
        assert [event.lsn for event in everything] == [r.lsn for r in stored if r.lsn not in checkpoints]
        openings = {record.lsn: record.timestamp for record in stored if isinstance(record, Opened)}
        last_stamp = 0
        for event in everything:
            assert event.timestamp > last_stamp, event
            if event.kind == "account":
                assert event.timestamp == openings[event.lsn]
            last_stamp = event.timestamp + len(event.transfers) - 1 if event.kind == "transfer" else event.timestamp
        # an opening journaled before openings had timestamps takes the latest stamped before it
        chain = ledger.transfer_linked([TransferRequest("l-1", "bank", "a0", 1), TransferRequest("l-2", "bank", "a1", 1)])
        assert account_timestamp(ledger._journal, chain[0].lsn + 1) == chain[1].timestamp
        # resumed in the middle of the run of accounts, past a checkpoint: the same timestamps
        for after in sorted(checkpoints | {everything[-3].lsn}):
            assert [e for e in ledger.events(after) if e.lsn <= everything[-1].lsn] == [
                event for event in everything if event.lsn > after]


def test_a_follower_sees_new_events_and_ends_when_the_ledger_closes(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l")
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("alice", currency="USD")
    seen: queue.Queue[Event | None] = queue.Queue()

    def follow() -> None:
        for event in ledger.events(2, follow=True):
            seen.put(event)
        seen.put(None)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    for n in range(3):
        ledger.transfer(f"t{n}", source="bank", destination="alice", amount=1)
        event = seen.get(timeout=WAIT_S)
        assert event is not None and event.transfers[0].id == f"t{n}"
    ledger.close()
    assert seen.get(timeout=WAIT_S) is None  # ended by the close: it follows with no timeout_s
    follower.join(timeout=WAIT_S)
    assert not follower.is_alive()


def test_a_follower_ends_after_timeout_s_without_a_new_event(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        started = time.monotonic()
        assert [event.lsn for event in ledger.events(follow=True, timeout_s=0.05)] == [1]  # (ended: no hang)
        assert time.monotonic() - started >= 0.05  # it waited its timeout for a next event first
        assert list(ledger.events(1, follow=True, timeout_s=0)) == []


def test_a_follower_counts_timeout_s_from_the_last_event_it_gave_when_a_full_chunk_ends_in_a_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk read in full (not caught up) and then a read with nothing but a checkpoint:
    a consumer slower than `timeout_s` over the chunk's events had the follower end at once,
    its idle time counted from the start. The clock is the test's: the consumer's slowness
    is a step of it, and the next event comes from the follower's own wait."""
    monkeypatch.setattr(_events, "EVENTS_PER_READ_MAX", 2)
    now = [0.0]
    monkeypatch.setattr(_follow, "time", SimpleNamespace(monotonic=lambda: now[0]))
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        with ledger._sequencer.lock:
            ledger._sequencer.checkpoint()  # LSN 3, the last record: not an event
        ledger._journal.wait_durable(3, 30.0)
        waits: list[float] = []

        def a_transfer_comes(after_lsn: int, wait_s: float) -> None:
            waits.append(wait_s)
            if len(waits) == 1:
                ledger.transfer("late", source="bank", destination="alice", amount=5)

        monkeypatch.setattr(ledger, "_await_records", a_transfer_comes)
        seen = []
        for event in ledger.events(follow=True, timeout_s=1.0):
            seen.append(event.lsn)
            if event.lsn == 2:
                now[0] += 10.0  # the consumer took 10 s over the chunk
            if event.lsn == 4:
                break

    assert seen == [1, 2, 4]
    assert waits == [_follow.FOLLOW_WAIT_S_MAX]  # (less than the second of `timeout_s` left)


def test_events_of_a_closed_ledger_raise_ledger_closed(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l")
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    stream = ledger.events()
    ledger.close()
    with pytest.raises(LedgerClosed):
        ledger.events()
    with pytest.raises(LedgerClosed):
        next(stream)


def test_a_readonly_ledger_refuses_every_write_and_writes_nothing(tmp_path: Path) -> None:
    clock = Clock()
    _every_kind(tmp_path / "l", clock).close()
    files = _files(tmp_path / "l")
    writes = [
        lambda r: r.create_account("c", currency="USD"),
        lambda r: r.create_accounts([Account("c", "USD", 0)]),
        lambda r: r.transfer("n-1", source="bank", destination="alice", amount=1),
        lambda r: r.transfer_many([TransferRequest("n-2", "bank", "alice", 1)]),
        lambda r: r.transfer_linked([TransferRequest("n-3", "bank", "alice", 1)]),
        lambda r: r.post_pending("n-4", pending_id="p-1"),
        lambda r: r.void_pending("n-5", pending_id="p-1"),
        lambda r: r.expire_pending(),
    ]
    with Ledger.open(tmp_path / "l", readonly=True) as reader:
        assert isinstance(reader, Ledger)
        for write in writes:
            with pytest.raises(ReadOnlyLedger) as refused:
                write(reader)
            assert refused.value.code == "read_only_ledger"
        assert reader.balance("alice").posted == 73
        assert [e.balance for e in reader.entries("alice")] == [100, 75, 80, 73]
        assert [a.id for a in reader.accounts()] == ["bank", "alice"]
        assert reader.get_transfer("p-3") is not None and reader.get_transfer("p-3").status == "expired"
        readonly_hash = reader.state_hash()
        readonly_events = list(reader.events())
    assert _files(tmp_path / "l") == files
    with Ledger.open(tmp_path / "l", clock_ns=clock) as ledger:
        assert ledger.state_hash() == readonly_hash
        assert list(ledger.events()) == readonly_events


READS_INHERITED = {"open", "close", "closed", "failure", "events", "get_transfer", "snapshot", "transfers", "account", "outcome"}
"""Public `Ledger` methods a read-only ledger inherits as they are: each reads only the journal."""


def test_every_other_public_ledger_method_is_answered_or_refused_by_the_readonly_ledger() -> None:
    """A method added to `Ledger` must be decided for read-only ledgers: inherited (a read of the
    journal alone: add it above), or overridden (a read from the books it keeps, or a refusal)."""
    from engine._readonly import ReadingLedger

    public = {name for name in dir(Ledger) if not name.startswith("_")}
    undecided = public - READS_INHERITED - set(vars(ReadingLedger))
    assert not undecided, f"decide these for ReadingLedger: {sorted(undecided)}"


def test_opening_readonly_where_no_ledger_is_raises_not_a_ledger(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotALedger):
        Ledger.open(tmp_path / "empty", readonly=True)
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotALedger):
        Ledger.open(tmp_path / "file")
    with pytest.raises(NotALedger):
        Ledger.open(tmp_path / "file", readonly=True)


def test_one_process_opens_a_ledger_once_whether_read_only_or_not(tmp_path: Path) -> None:
    """Refused before a file is touched: a second open of one LMDB environment in a process
    would drop the locks of the first."""
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        with pytest.raises(LedgerLocked):
            Ledger.open(tmp_path / "l", readonly=True)
    with Ledger.open(tmp_path / "l", readonly=True) as reader:
        with pytest.raises(LedgerLocked):
            Ledger.open(tmp_path / "l")
        with pytest.raises(LedgerLocked):
            Ledger.open(tmp_path / "l", readonly=True)
        with pytest.raises(LedgerLocked):
            Ledger.open(tmp_path / "l" / ".." / "l", readonly=True)
        assert [a.id for a in reader.accounts()] == ["bank"]


def test_the_journal_wakes_a_follower_when_a_record_is_durable_and_when_it_closes(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l")
    journal = ledger._journal
    assert not journal.wait_past(0, 0.01)
    woken = threading.Event()

    def wait() -> None:
        if journal.wait_past(0, WAIT_S):
            woken.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    assert woken.wait(WAIT_S)
    waiter.join(timeout=WAIT_S)
    answered: list[bool] = []
    # It waits far longer than the test: only the close can end its wait in time.
    closing = threading.Thread(target=lambda: answered.append(journal.wait_past(1, 3600)), daemon=True)
    closing.start()
    ledger.close()
    closing.join(timeout=WAIT_S)
    assert not closing.is_alive() and answered == [False]
    assert not journal.wait_past(1, WAIT_S)  # closed: at once


READER = """
import json, sys
from engine import Ledger
with Ledger.open(sys.argv[1], readonly=True) as reader:
    print("ready", flush=True)
    for event in reader.events(follow=True, timeout_s=30):
        ids = [t.id for t in event.transfers]
        print(json.dumps({"lsn": event.lsn, "ids": ids}), flush=True)
        if "last" in ids:
            break
    bob = reader.entries("bob")
    print(json.dumps({"balance": reader.balance("alice").posted, "hash": reader.state_hash(),
                      "bob": [len(bob), bob[-1].balance, [e.seq for e in bob] == list(range(1, len(bob) + 1))],
                      "accounts": [a.id for a in reader.accounts()]}), flush=True)
"""


def test_a_readonly_ledger_in_another_process_follows_a_live_writer(tmp_path: Path) -> None:
    path = tmp_path / "l"
    with Ledger.open(path, map_size_bytes=MAP_SIZE_BYTES_SMALL, checkpoint_interval=500) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.create_account("bob", currency="USD")
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline() == "ready\n", reader.stderr.read() if reader.stderr else ""
            for n in range(20):
                ledger.transfer(f"t{n}", source="bank", destination="alice", amount=n + 1)
            for first in range(0, 6_000, 1_000):  # enough to grow the map under the reader, past checkpoints
                made = ledger.transfer_many([TransferRequest(f"m{k}", "bank", "bob", 1) for k in range(first, first + 1_000)])
                assert all(isinstance(outcome, Transfer) for outcome in made), made
            ledger.create_account("carol", currency="USD")
            ledger.transfer("last", source="bank", destination="alice", amount=1)
            out, err = reader.communicate(timeout=WAIT_S)
            expected_hash = ledger.state_hash()
            assert ledger._journal._store.env.info()["map_size"] > MAP_SIZE_BYTES_SMALL, "meant to grow the map"
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait(timeout=WAIT_S)
        assert reader.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        followed = [i for line in lines[:-1] for i in line["ids"]]
        assert followed == [f"t{n}" for n in range(20)] + [f"m{k}" for k in range(6_000)] + ["last"], (out[-2000:], err)
        assert lines[-1] == {"balance": 211, "hash": expected_hash, "bob": [6_000, 6_000, True],
                             "accounts": ["bank", "alice", "bob", "carol"]}, err


NO_POSITIONS = [-1, True, 1.0, "3", LSN_MAX + 1, 2**70]
"""Values no read of history takes as a position (`test_every_history_read_...`)."""


def _cursor_reads(ledger: Ledger) -> dict[str, object]:
    """Every read of a ledger that takes a position to read after, by name."""
    return {"events": lambda lsn: list(ledger.events(lsn)),
            "events following": lambda lsn: list(ledger.events(lsn, follow=True, timeout_s=0.001)),
            "transfers": lambda lsn: ledger.transfers(after_lsn=lsn),
            "an account's transfers": lambda lsn: ledger.transfers(account="a", after_lsn=lsn, reverse=True)}


def _check_positions(reads: dict[str, object], end: int, bounds: dict[str, object]) -> None:
    """Each of `reads` answers nothing for a position past `end`, up to the last LSN a key
    holds, and refuses what is no position; each of `bounds` refuses both."""
    for name, read in reads.items():
        for lsn in (end, end + 1, 10**9, LSN_MAX):
            assert read(lsn) == [], (name, lsn)  # type: ignore[operator]
    for name, read in {**reads, **bounds}.items():
        for value in NO_POSITIONS:
            with pytest.raises(InvalidRequest):
                read(value)  # type: ignore[operator]
                pytest.fail(f"{name} took {value!r}")


def test_every_history_read_takes_a_position_past_the_end_as_nothing_yet_and_refuses_what_is_no_position(
        tmp_path: Path) -> None:
    """One rule, every door: a follower starts from where it is, even past the journal's end;
    a value that is no LSN (an int in 0..2**64-1) is `InvalidRequest`, never an empty page."""
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        end = ledger.transfer("t-1", source="bank", destination="a", amount=5).lsn
        with ledger.snapshot() as snapshot:
            reads = {**_cursor_reads(ledger), "a snapshot's transfers": lambda lsn: snapshot.transfers(after_lsn=lsn)}
            _check_positions(reads, end, {
                "until_lsn": lambda lsn: ledger.transfers(until_lsn=lsn),
                "at_lsn": lambda lsn: ledger.balance("a", at_lsn=lsn),
                "a snapshot's until_lsn": lambda lsn: snapshot.transfers(until_lsn=lsn)})
    with Ledger.open(tmp_path / "l", readonly=True) as reader:
        _check_positions(_cursor_reads(reader), end, {})

    async def main() -> None:
        async with AsyncLedger.open(tmp_path / "l") as ledger:
            async def events(lsn: object, follow: bool) -> list[Event]:
                return [event async for event in ledger.events(lsn, follow=follow, timeout_s=0.001)]  # type: ignore[arg-type]

            reads = {"events": lambda lsn: events(lsn, False), "events following": lambda lsn: events(lsn, True),
                     "transfers": lambda lsn: ledger.transfers(after_lsn=lsn),
                     "an account's transfers": lambda lsn: ledger.transfers(account="a", after_lsn=lsn)}
            for name, read in reads.items():
                for lsn in (end, end + 1, LSN_MAX):
                    assert await read(lsn) == [], (name, lsn)
                for value in NO_POSITIONS:
                    with pytest.raises(InvalidRequest):
                        await read(value)
                        pytest.fail(f"async {name} took {value!r}")

    asyncio.run(main())
    journal = Journal.open_readonly(tmp_path / "l", index_names=INDEX_NAMES)
    try:
        assert journal.read(LSN_MAX + 1) is None and list(journal.scan(LSN_MAX)) == []
    finally:
        journal.close()
    for position, code, lines in ((LSN_MAX, 0, ""), (LSN_MAX + 1, 2, None)):
        done = subprocess.run([sys.executable, "-m", "engine", "tail", str(tmp_path / "l"), "--from-lsn", str(position)],
                              capture_output=True, text=True, timeout=WAIT_S, env=_env(), cwd=ROOT)
        assert done.returncode == code and (lines is None or done.stdout == lines), done.stderr


def test_tally_tail_prints_each_event_as_a_json_line(tmp_path: Path) -> None:
    clock = Clock()
    _every_kind(tmp_path / "l", clock).close()
    with Ledger.open(tmp_path / "l", readonly=True) as reader:
        expected = [jsonable(event) for event in reader.events()]
    done = subprocess.run([sys.executable, "-m", "engine", "tail", str(tmp_path / "l"), "--json"],
                          capture_output=True, text=True, timeout=WAIT_S, env=_env(), cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == expected
    assert {"lsn", "timestamp", "kind"} <= set(lines[0])
    assert lines[2]["transfers"][0]["id"] == "t-1" and lines[2]["entries"][1]["balance"] == 100
    assert lines[1]["account"]["metadata"] == {"tier": 1}
    assert lines[8]["code"] == "insufficient_funds"
    resumed = subprocess.run([sys.executable, "-m", "engine", "tail", str(tmp_path / "l"), "--from-lsn", "10"],
                             capture_output=True, text=True, timeout=WAIT_S, env=_env(), cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert [line.split()[0] for line in resumed.stdout.splitlines()] == ["11", "12"]
    assert "l-1 bank -> alice 5; l-2 alice -> bank 7" in resumed.stdout


def test_tally_tail_follow_ends_on_ctrl_c_every_time_while_events_arrive_and_while_idle(tmp_path: Path) -> None:
    """Ctrl-C at any moment (mid-stream, or while it waits) ends `tally tail --follow` with
    exit 0 and nothing on stderr: the interrupt sets a flag, never an exception landing
    inside a lock, which once left closing waiting forever."""
    path = tmp_path / "l"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
    rng = random.Random(5)
    for attempt in range(8):
        tail = subprocess.Popen([sys.executable, "-m", "engine", "tail", str(path), "--follow", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            assert tail.stdout is not None and json.loads(tail.stdout.readline())["lsn"] == 1
            if attempt % 2:  # events arriving as Ctrl-C comes
                with Ledger.open(path) as ledger:
                    for k in range(rng.randint(1, 40)):
                        ledger.transfer(f"t-{attempt}-{k}", source="bank", destination="alice", amount=1)
            time.sleep(rng.random() / 20)
            tail.send_signal(signal.SIGINT)
            _, err = tail.communicate(timeout=WAIT_S)
            assert (tail.returncode, err) == (0, ""), (attempt, err)
        finally:
            if tail.poll() is None:
                tail.kill()
                tail.wait(timeout=WAIT_S)
