"""Reads that must agree with each other while records land: nothing committed but not yet
released shows in one read and not another; a read-only ledger's `get_transfer`
and `outcome` follow the writer as its other reads do; `transfers(account=...)` knows the
accounts `balance` and `entries` know, at the same LSN; a balance at a timestamp the clock has
passed never changes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine import AccountNotFound, Balance, InvalidRequest, Ledger, LinkedTransferFailed, Transfer, TransferRequest
from engine._directory import SNAPSHOT, AccountHandle
from support import NS_PER_S, Clock, hold_after_commit, wait_until

WAIT_S = 10.0


def test_a_record_committed_but_not_yet_released_is_shown_by_no_read(ledger_path: Path) -> None:
    """Between LMDB's commit of a record and its release to the callers waiting on it (the
    durable LSN advanced), no read shows it: not `get_transfer` or `outcome` while `entries`
    does not, which would show a transfer whose entries are missing. Once released, all do."""
    ledger = Ledger.open(ledger_path)
    try:
        for name in ("a", "b"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        committed, release = hold_after_commit(ledger)
        results: list[Any] = []
        caller = threading.Thread(
            target=lambda: results.append(ledger.transfer("t-1", source="a", destination="b", amount=10)))
        caller.start()
        try:
            assert committed.wait(WAIT_S)
            assert ledger._journal.durable_lsn < ledger._journal.last_lsn
            assert ledger.get_transfer("t-1") is None
            assert ledger.outcome("t-1") is None
            assert ledger.entries("a") == []  # (`balance` waits for the release)
        finally:
            release.set()
            caller.join(WAIT_S)
        assert [type(result) for result in results] == [Transfer]
        assert ledger.get_transfer("t-1") == results[0] == ledger.outcome("t-1")
        assert [entry.transfer_id for entry in ledger.entries("a")] == ["t-1"]
        assert ledger.balance("b").posted == 10
    finally:
        ledger.close()


def test_a_read_only_ledger_shows_a_transfer_made_after_it_opened(tmp_path: Path) -> None:
    path = tmp_path / "l"
    with Ledger.open(path) as ledger:
        ledger.create_account("a", currency="USD", overdraft_limit=None)
        ledger.create_account("b", currency="USD")
    with Ledger.open(path, readonly=True) as reader:
        script = f"""
            from engine import Ledger
            with Ledger.open({str(path)!r}) as ledger:
                ledger.transfer("t-1", source="a", destination="b", amount=7)
        """
        subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, timeout=60)
        assert [entry.transfer_id for entry in reader.entries("b")] == ["t-1"]
        found = reader.get_transfer("t-1")
        assert found is not None and found.amount == 7
        assert reader.outcome("t-1") == found


def test_transfers_of_an_account_opened_after_a_snapshot_are_refused_as_its_balance_is(ledger_path: Path) -> None:
    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("a", currency="USD")
        with ledger.snapshot() as snapshot:
            ledger.create_account("x", currency="USD")
            with pytest.raises(AccountNotFound):
                snapshot.balance("x")
            with pytest.raises(AccountNotFound):
                snapshot.transfers(account="x")
        assert ledger.transfers(account="x") == []


def test_no_read_shows_an_account_committed_but_not_yet_released(ledger_path: Path) -> None:
    ledger = Ledger.open(ledger_path)
    try:
        committed, release = hold_after_commit(ledger)
        opening = threading.Thread(target=lambda: ledger.create_account("y", currency="USD"))
        opening.start()
        try:
            assert committed.wait(WAIT_S)
            assert "y" not in {account.id for account in ledger.accounts()}
            with pytest.raises(AccountNotFound):
                ledger.transfers(account="y")
        finally:
            release.set()
            opening.join(WAIT_S)
        assert ledger.transfers(account="y") == []
    finally:
        ledger.close()


def test_a_balance_at_a_timestamp_the_clock_passed_never_changes(ledger_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger.open(ledger_path)
    try:
        for name in ("a", "b"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        journal = ledger._journal
        wait_durable, waiting = journal.wait_durable, threading.Event()
        results: list[Any] = []
        reading = threading.Thread(target=lambda: results.append(ledger.balance("b", at_timestamp=at)))

        def watched(lsn: int, timeout_s: float) -> None:
            if threading.current_thread() is reading:
                waiting.set()
            wait_durable(lsn, timeout_s)

        monkeypatch.setattr(journal, "wait_durable", watched)
        committed, release = hold_after_commit(ledger)
        caller = threading.Thread(target=lambda: ledger.transfer("t-1", source="a", destination="b", amount=10))
        caller.start()
        try:
            assert committed.wait(WAIT_S)
            at = time.time_ns()  # after t-1 was stamped, before it is released
            reading.start()
            assert wait_until(lambda: waiting.is_set() or not reading.is_alive())  # it waits for t-1, or answered
        finally:
            release.set()
            caller.join(WAIT_S)
            if reading.ident is not None:  # (started)
                reading.join(WAIT_S)
        assert not caller.is_alive() and not reading.is_alive()
        assert [balance.posted for balance in results] == [10]
        assert ledger.balance("b", at_timestamp=at).posted == 10
    finally:
        ledger.close()


def test_a_balance_at_a_timestamp_answered_never_changes_when_the_clock_steps_back(ledger_path: Path) -> None:
    """Answered for a time the clock had passed, then the clock steps back (NTP, a restored
    VM): the next transfer is stamped after that time all the same, and the question gets
    the same answer, at once and later (it was refused "still to come", then answered with
    the new transfer in)."""
    clock = Clock()
    with Ledger.open(ledger_path, clock_ns=clock) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        first = ledger.transfer("t-1", source="bank", destination="a", amount=100)
        at = first.timestamp + 500 * NS_PER_S
        clock.advance(1000)
        answered = ledger.balance("a", at_timestamp=at)
        assert answered.posted == 100
        clock.advance(-990)  # back to 10 s after t-1
        second = ledger.transfer("t-2", source="bank", destination="a", amount=7)
        assert second.timestamp > at
        assert ledger.balance("a", at_timestamp=at) == answered
        clock.advance(990)
        assert ledger.balance("a", at_timestamp=at) == answered
        assert ledger.balance("a", at_timestamp=second.timestamp).posted == 107


def test_a_balance_at_any_stamp_of_a_chain_stamped_ahead_of_a_stopped_clock_is_answered(ledger_path: Path) -> None:
    """A chain's legs are stamped one nanosecond apart, ahead of a clock that stands still: each
    leg's timestamp has come (the last record's last stamp), and reads as after that leg."""
    clock = Clock()
    with Ledger.open(ledger_path, clock_ns=clock) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        legs = ledger.transfer_linked([TransferRequest(f"t{i}", "bank", "a", 1) for i in range(3)])
        assert [leg.timestamp for leg in legs] == [legs[0].timestamp + i for i in range(3)]
        assert legs[-1].timestamp > clock()
        assert [ledger.balance("a", at_timestamp=leg.timestamp).posted for leg in legs] == [3, 3, 3]  # one record
        with pytest.raises(InvalidRequest, match="still to come"):
            ledger.balance("a", at_timestamp=legs[-1].timestamp + 1)


def test_a_refused_chain_hands_back_its_reservations_before_a_balance_can_see_the_refusal(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of two sources on the mailbox path, refused by the second: the first source's
    reservation is handed back in the same hold of the sequencer lock as the refusal is
    queued, so a balance asked once `outcome` shows the refusal does not still count it (it
    waits for the hand-back, which the deciding thread runs once it is done)."""
    ledger = Ledger.open(ledger_path, dispatcher_threads=2)
    try:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in ("a", "b", "c", "d"):
            ledger.create_account(name, currency="USD")
        for name in ("a", "b", "d"):
            ledger.transfer(f"f-{name}", source="bank", destination=name, amount=100)
        coordinator = ledger._coordinator
        held = coordinator.participants.take_turns(["c", "d"], all_or_none=True)  # so chains go by the mailboxes
        assert held is not None
        outcomes: list[Any] = []

        def chain(*requests: TransferRequest) -> None:
            try:
                outcomes.append(ledger.transfer_linked(list(requests)))
            except LinkedTransferFailed as error:
                outcomes.append(error)

        # k: b's 100 reserved, waiting for d's vote (d's turn is held here)
        keeping = threading.Thread(target=chain, args=(TransferRequest("k1", "b", "c", 100),
                                                       TransferRequest("k2", "d", "c", 1)))
        refused = threading.Thread(target=chain, args=(TransferRequest("l1", "a", "c", 10),
                                                       TransferRequest("l2", "b", "c", 50)))
        real = coordinator.sequencer.reject
        paused, go = threading.Event(), threading.Event()

        def reject(ticket: Any, *args: Any) -> int:
            lsn = real(ticket, *args)
            if ticket.request.id == "l1":  # its refusal queued: hold the voter there
                paused.set()
                assert go.wait(WAIT_S)
            return lsn

        seen: list[Balance] = []
        asking = threading.Thread(target=lambda: seen.append(ledger.balance("a")))
        asked = threading.Event()

        def snapshot(handle: Any, timeout_s: float) -> tuple[int, int, int, int]:
            answer = handle._ref.ask(SNAPSHOT, block=False)
            if threading.current_thread() is asking:
                asked.set()  # in a's mailbox now
            return answer.get(timeout=timeout_s)  # type: ignore[no-any-return]

        monkeypatch.setattr(coordinator.sequencer, "reject", reject)
        monkeypatch.setattr(AccountHandle, "snapshot", snapshot)
        keeping.start()
        try:
            assert wait_until(lambda: ledger.balance("b").pending == 100)
            refused.start()  # a reserves 10, then b refuses 50 (it has 0 available)
            assert paused.wait(WAIT_S)
            ledger._journal.wait_durable(ledger._journal.last_lsn, WAIT_S)
            assert isinstance(ledger.outcome("l1"), LinkedTransferFailed)
            asking.start()
            assert asked.wait(WAIT_S)
        finally:
            go.set()
            refused.join(WAIT_S)
            coordinator.participants.give_back_turns(held)
            keeping.join(WAIT_S)
            if asking.ident is not None:  # (started)
                asking.join(WAIT_S)
        assert not refused.is_alive() and not keeping.is_alive() and not asking.is_alive()
        assert seen == [Balance(100, 0, 100, 0)]
        assert [type(outcome) for outcome in outcomes] == [LinkedTransferFailed, list]
        assert ledger.balance("b") == Balance(0, 0, 0, 0) and ledger.balance("c").posted == 101
    finally:
        ledger.close()


def _written_by_another_process(path: Path, body: str, interval: int = 100_000) -> None:
    script = f"""
        from engine import Ledger
        with Ledger.open({str(path)!r}, checkpoint_interval={interval}) as ledger:
        """ + textwrap.indent(textwrap.dedent(body), " " * 12)
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, timeout=60)


@pytest.mark.parametrize("window", ["after_memory_before_snapshot", "after_snapshot_opened"])
@pytest.mark.parametrize("read", ["balance_at_lsn", "transfers", "snapshot_balance", "snapshot_entries"])
def test_a_read_only_history_read_misses_no_row_its_catch_up_drops_once_the_index_holds_it(
    tmp_path: Path, window: str, read: str
) -> None:
    """A read-only ledger's history reads copy the rows in memory, then open their snapshot
    (`engine._history`); a catch-up on another thread drops rows from memory once an index
    snapshot holds them. Paused in either window while the writer (another process) indexes a
    checkpoint and the reader catches up past it, each read still finds every row: what
    memory no longer holds, its later snapshot's index does. (Opening the snapshot first, then
    copying, fails this test: the rows are then in neither.)"""
    from contextlib import contextmanager

    path = tmp_path / "l"
    _written_by_another_process(path, """
        ledger.create_account("a", currency="USD", overdraft_limit=None)
        ledger.create_account("b", currency="USD")
        ledger.transfer("t-1", source="a", destination="b", amount=10)
        ledger.transfer("p-1", source="a", destination="b", amount=3, pending=True)
    """)
    reader = Ledger.open(path, readonly=True)
    try:
        books = reader._books  # type: ignore[attr-defined]
        assert books.unindexed and "b" in books.unindexed, "t-1's rows start unindexed"
        end = books.last_lsn
        history = reader._history  # type: ignore[attr-defined]
        paused, go = threading.Event(), threading.Event()
        hooked, armed = threading.local(), threading.local()

        def pause() -> None:
            if getattr(hooked, "on", False):
                hooked.on = False
                paused.set()
                assert go.wait(WAIT_S)

        holds = history._holds

        def holds_then_pause(account: str, until: int) -> Any:  # the last rows copied from memory
            found = holds(account, until)
            if window == "after_memory_before_snapshot":
                pause()
            else:
                armed.on = getattr(hooked, "on", False)
            return found

        history._holds = holds_then_pause
        if window == "after_snapshot_opened":
            journal = reader._journal  # type: ignore[attr-defined]
            snapshot = journal.snapshot

            @contextmanager
            def snapshot_then_pause():  # type: ignore[no-untyped-def]
                with snapshot() as txn:
                    if getattr(armed, "on", False):
                        armed.on = False
                        pause()
                    yield txn

            journal.snapshot = snapshot_then_pause
        results: list[Any] = []

        def run() -> None:
            hooked.on = True
            try:
                if read == "balance_at_lsn":
                    results.append(reader.balance("b", at_lsn=end))
                elif read == "transfers":
                    results.append([t.id for t in reader.transfers(account="b", until_lsn=end)])
                else:
                    with reader.snapshot() as view:
                        hooked.on = True
                        results.append([e.transfer_id for e in view.entries("b")] if read == "snapshot_entries"
                                       else view.balance("b"))
            except BaseException as error:
                results.append(error)
                paused.set()

        caller = threading.Thread(target=run)
        caller.start()
        try:
            assert paused.wait(WAIT_S)
            _written_by_another_process(path, """
                ledger.transfer("t-2", source="a", destination="b", amount=1)
                ledger.transfer("t-3", source="a", destination="b", amount=1)
            """, interval=1)
            held_before = set(books.unindexed or {})
            reader.stats()  # catches up on this thread: past a checkpoint whose rows the index holds
            assert books.indexed_through > 0 and "b" in held_before and not books.unindexed.get("b")
        finally:
            go.set()
            caller.join(WAIT_S)
        assert not caller.is_alive()
        if read in ("balance_at_lsn", "snapshot_balance"):
            got = results[0]
            assert isinstance(got, Balance) and (got.posted, got.pending, got.incoming) == (10, 0, 3), got
        else:
            assert results == [["t-1", "p-1"] if read == "transfers" else ["t-1"]], results
    finally:
        reader.close()
